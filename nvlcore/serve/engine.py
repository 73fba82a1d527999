"""Requests in flight share a generate batch: one worker thread owns the model.

Every request becomes a :class:`Job` in one queue. The worker takes the oldest job and every queued
job that can share its batch (up to ``max_batch_size``): greedy jobs go together; sampled jobs only
with the same temperature / top-p / top-k and no seed (a seeded request is decoded alone, so its
seed alone decides its tokens). The batch is left-padded by the generator, which the model makes
invisible (a model plugin's tests check a padded row's logits and tokens against the row alone),
so a greedy answer equals the request decoded alone up to the kernels' batch-size dependence
(none on CPU; ``--max-batch-size 1`` rules it out on a GPU).

Each job finishes at its own end-of-turn token, stop string or ``max_tokens`` (its answer and usage go
back at once, not when the batch's longest row ends; the batch ends when every job has its answer);
streamed jobs get their text piece by piece, the pieces joining to the non-streamed text
(:class:`~nvlcore.generation.IncrementalDetokenizer`; text that may begin a stop string is held back
until it cannot). A stop string ends the answer before it, as OpenAI's API does.

The worker also runs the model's ``prepare`` (the processor and the tokenizer are not shared with
another thread), and turns a prompt that does not fit the context into a 400 for that job alone.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from nvlcore.serve.protocol import ChatRequest, RequestError, remove_files


@dataclass
class Answer:
    """One finished job: the text and what the response's ``usage`` and ``finish_reason`` say."""

    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str
    batch_size: int = 1


@dataclass
class Job:
    """A request waiting for, or in, a batch.

    :param events: the streamed pieces (``("text", str)``, then ``("done", Answer)`` or
        ``("error", exc)``); None when the request does not stream.
    """

    request: ChatRequest
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    events: asyncio.Queue | None = None
    prepared: dict[str, Any] | None = None
    prompt_tokens: int = 0
    max_tokens: int = 0
    tokens: list[int] = field(default_factory=list)
    detok: Any = None
    text: str = ""
    sent: int = 0
    done: bool = False

    def sampling_key(self) -> tuple | None:
        """Jobs with equal keys may share a batch; None: decoded alone."""
        r = self.request
        if r.temperature == 0.0:
            return ("greedy",)
        return None if r.seed is not None else (r.temperature, r.top_p, r.top_k)

    def emit(self, kind: str, value: Any) -> None:
        """Hand a piece / the answer / an error to the request's event loop (from the worker thread)."""
        def deliver() -> None:
            if self.events is not None:  # a streamed request reads only its events
                self.events.put_nowait((kind, value))
            elif kind == "done" and not self.future.done():
                self.future.set_result(value)
            elif kind == "error" and not self.future.done():
                self.future.set_exception(value)

        self.loop.call_soon_threadsafe(deliver)


class BatchEngine:
    """The queue and the worker thread in front of a :class:`~nvlcore.generation.Generator`.

    :param generator: the model's generator (``prepare``, ``generate_prepared``, ``tokenizer``,
        ``stop_token_ids``, ``check_length``, ``max_length``).
    :param max_batch_size: requests decoded together at most.
    :param default_max_tokens: the budget of a request that gives none (capped by the context).
    :param on_batch: called with each batch's size (a log line).
    """

    def __init__(self, generator: Any, *, max_batch_size: int = 8, default_max_tokens: int = 1024,
                 on_batch: Callable[[int], None] | None = None) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.generator = generator
        self.max_batch_size = max_batch_size
        self.default_max_tokens = default_max_tokens
        self.on_batch = on_batch
        self._jobs: deque[Job] = deque()
        self._cv = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._work, name="nvl-serve-worker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Let the worker finish its batch and exit."""
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout=60)

    def submit(self, request: ChatRequest) -> Job:
        """Queue a request (call from the event loop); await ``job.future`` or read ``job.events``."""
        loop = asyncio.get_running_loop()
        job = Job(request, loop, loop.create_future(), asyncio.Queue() if request.stream else None)
        with self._cv:
            self._jobs.append(job)
            self._cv.notify()
        return job

    def _take(self) -> list[Job] | None:
        """The next batch: the oldest job and the queued jobs that can share its batch."""
        with self._cv:
            while not self._jobs and not self._stopping:
                self._cv.wait()
            if self._stopping:
                return None
            first = self._jobs.popleft()
            batch, key = [first], first.sampling_key()
            if key is not None:
                for job in list(self._jobs):
                    if len(batch) >= self.max_batch_size:
                        break
                    if job.sampling_key() == key:
                        self._jobs.remove(job)
                        batch.append(job)
            return batch

    def _work(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            ready = [job for job in batch if self._prepare(job)]
            if ready:
                self._decode(ready)

    def _prepare(self, job: Job) -> bool:
        """The job's prompt, or its 400 (a prompt the processor refuses, or past the context)."""
        from nvlcore.generation import ContextLengthError

        gen, req = self.generator, job.request
        try:
            prepared = dict(gen.prepare(req.conversation))
            job.prompt_tokens = int(prepared["input_ids"].numel())
            budget = req.max_tokens
            if budget is None:
                budget = self.default_max_tokens
                if gen.max_length is not None:  # a default budget shrinks to the context; an asked one is checked
                    budget = max(1, min(budget, gen.max_length - job.prompt_tokens))
            try:
                gen.check_length(job.prompt_tokens, budget)
            except ContextLengthError as exc:
                param = "messages" if job.prompt_tokens >= (gen.max_length or 0) else "max_tokens"
                message = str(exc).replace("max_new_tokens", "max_tokens")  # the request's name of the budget
                raise RequestError(message, param=param, code="context_length_exceeded") from None
            job.prepared, job.max_tokens = prepared, budget
            return True
        except RequestError as exc:
            job.emit("error", exc)
        except (OSError, ValueError, RuntimeError, KeyError) as exc:  # the processor's one-line refusals
            text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            job.emit("error", RequestError(f"the model's processor refused the messages: {text}", param="messages"))
        finally:
            remove_files(req.cleanup)
        return False

    def _decode(self, batch: list[Job]) -> None:
        from nvlcore.generation import IncrementalDetokenizer, SamplingParams

        gen = self.generator
        r = batch[0].request
        sampling = SamplingParams(temperature=r.temperature, top_p=r.top_p, top_k=r.top_k, seed=r.seed)
        stops = set(gen.stop_token_ids)
        for job in batch:
            job.detok = IncrementalDetokenizer(gen.tokenizer) if job.request.stream or job.request.stop else None
        if self.on_batch is not None:
            self.on_batch(len(batch))

        def on_step(step: int, tokens: list[int], active: list[bool]) -> None:
            for row, job in enumerate(batch):
                if not job.done and active[row]:
                    self._step(job, tokens[row], tok_is_stop=tokens[row] in stops, batch_size=len(batch))
            if all(job.done for job in batch):
                raise _BatchDone  # every request has its answer (a stop string ends a row the loop cannot end)

        try:
            gen.generate_prepared([job.prepared for job in batch], max_new_tokens=max(j.max_tokens for j in batch),
                                  sampling=sampling, on_step=on_step)
        except _BatchDone:
            pass
        except Exception as exc:  # out of memory, a kernel error: these requests fail, the server goes on
            failure = RequestError(f"generation failed: {type(exc).__name__}: {str(exc)[:300]}", status=500,
                                   type="server_error", code="generation_failed")
            for job in batch:
                if not job.done:
                    job.done = True
                    job.emit("error", failure)
            return
        for job in batch:  # a row the loop ended without a stop token or a full budget (cannot happen today)
            if not job.done:
                self._finish(job, "length", len(batch))

    def _step(self, job: Job, tok: int, *, tok_is_stop: bool, batch_size: int) -> None:
        """One generated token of one job: the end of turn, a stop string, the budget, or more text."""
        job.tokens.append(tok)
        if tok_is_stop:
            self._finish(job, "stop", batch_size)
            return
        if job.detok is not None:
            job.text += job.detok.push(tok)
            cut = first_stop(job.text, job.request.stop)
            if cut is not None:  # the answer ends before the stop string, which is not part of it
                self._finish(job, "stop", batch_size, text=job.text[:cut])
                return
            if job.request.stream:  # hold back what may be the start of a stop string
                safe = len(job.text) - held_back(job.text, job.request.stop)
                if safe > job.sent:
                    job.emit("text", job.text[job.sent:safe])
                    job.sent = safe
        if len(job.tokens) >= job.max_tokens:
            self._finish(job, "length", batch_size)

    def _finish(self, job: Job, reason: str, batch_size: int, text: str | None = None) -> None:
        """Send the job's answer; ``text``: the answer cut at a stop string (else the tokens decoded)."""
        job.done = True
        if text is None:
            body = job.tokens[:-1] if reason == "stop" else job.tokens
            text = self.generator.tokenizer.decode(body, skip_special_tokens=True)
        if job.request.stream and len(text) > job.sent:
            job.emit("text", text[job.sent:])  # what was held back, and the detokenizer's tail
        job.prepared = None  # the pixels go as soon as the answer does
        job.emit("done", Answer(text, list(job.tokens), job.prompt_tokens, reason, batch_size))


class _BatchDone(Exception):
    """Raised from the step callback to end a batch whose every request is answered."""


def first_stop(text: str, stops: tuple[str, ...]) -> int | None:
    """Where the earliest stop string starts in ``text`` (None: none occurs)."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


def held_back(text: str, stops: tuple[str, ...]) -> int:
    """How many characters at the end of ``text`` may begin a stop string (streamed only once they cannot)."""
    longest = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:n]):
                longest = n
                break
    return longest
