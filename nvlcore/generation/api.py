"""The Python API for generation: conversations in, text out.

:class:`Generator` ties a decodable model (see :mod:`nvlcore.generation.protocol`), its tokenizer
and a *prepare* function (conversation -> prompt token ids and media tensors, normally the model
bridge's processor with the generation prompt appended) together::

    gen = Generator(model, tokenizer, prepare, stop_token_ids=[eos], pad_token_id=pad, device="cuda")
    results = gen.generate([conv1, conv2], max_new_tokens=64)        # greedy, batched
    results[0].text, results[0].token_ids, results[0].decode_tokens_per_s

Model bridges provide ready-made constructors (their ``generator()``). :func:`build_conversation` makes a conversation
in the project's schema from the command line's pieces the way the original Megatron-Bridge script did (``"Image-1:
<image>\\nImage-2: <image>\\n<prompt>"`` for several images).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from nvlcore.data.schema import Conversation
from nvlcore.generation.loop import GenerationOutput, StepCallback, generate_tokens, left_pad
from nvlcore.generation.sampling import SamplingParams
from nvlcore.generation.streaming import IncrementalDetokenizer, TextStreamer

if TYPE_CHECKING:
    import torch

PrepareFn = Callable[[Conversation], Mapping[str, Any]]
"""``prepare(conversation) -> {"input_ids": 1-D ids of the prompt incl. generation prompt, **media}``."""


def build_conversation(
    prompt: str,
    *,
    images: Sequence[Any] = (),
    video: str | Path | None = None,
    system_prompt: str | None = None,
) -> Conversation:
    """A single-turn conversation (schema of :mod:`nvlcore.data.schema`) ready for generation.

    One image: ``[image, prompt]``. Several images: ``"Image-1: ", image, "\\nImage-2: ", image, ...,
    "\\n" + prompt``. A video: ``[video, "\\n" + prompt]``. No media: ``[prompt]``. A non-empty
    ``system_prompt`` becomes a system turn (some models' chat templates read switches there, e.g. ``"/no_think"``).
    """
    if images and video is not None:
        raise ValueError("give images or a video, not both")
    content: list[dict[str, Any]] = []
    if len(images) == 1:
        content = [{"type": "image", "image": _media(images[0])}, {"type": "text", "text": prompt}]
    elif len(images) > 1:
        for i, img in enumerate(images):
            content.append({"type": "text", "text": f"Image-{i + 1}: " if i == 0 else f"\nImage-{i + 1}: "})
            content.append({"type": "image", "image": _media(img)})
        content.append({"type": "text", "text": "\n" + prompt})
    elif video is not None:
        content = [{"type": "video", "path": str(Path(video).resolve())}, {"type": "text", "text": "\n" + prompt}]
    else:
        content = [{"type": "text", "text": prompt}]
    turns: list[dict[str, Any]] = []
    if system_prompt:
        turns.append({"role": "system", "content": [{"type": "text", "text": system_prompt}]})
    turns.append({"role": "user", "content": content})
    return {"conversation": turns}


def _media(item: Any) -> Any:
    return str(Path(item).resolve()) if isinstance(item, (str, Path)) else item


@dataclass
class GenerationResult:
    """One conversation's generation (the ``nvl generate --json`` object)."""

    text: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    finish_reason: str
    prefill_tokens_per_s: float
    decode_tokens_per_s: float

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def merge_model_inputs(items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Batch the media inputs of several prepared prompts.

    Tensors are concatenated along dim 0 and lists are chained, in row order: media tensors list
    tiles / frames in the order their context tokens appear when the batch is read row by row
    (the :data:`nvlcore.contracts.Batch` convention). ``None`` values and empty tensors are
    dropped; a key present in only some rows is fine.
    """
    import torch

    merged: dict[str, Any] = {}
    keys: list[str] = []
    for it in items:
        keys.extend(k for k in it if k not in keys)
    for key in keys:
        vals = [it[key] for it in items if it.get(key) is not None]
        if not vals:
            continue
        if all(isinstance(v, torch.Tensor) for v in vals):
            vals = [v for v in vals if v.numel() > 0]
            if vals:
                merged[key] = torch.cat(vals, dim=0)
        elif all(isinstance(v, (list, tuple)) for v in vals):
            merged[key] = [x for v in vals for x in v]
        else:
            raise TypeError(f"cannot batch model input {key!r}: values of types {[type(v).__name__ for v in vals]}")
    return merged


def _both(first: StepCallback | None, second: StepCallback | None) -> StepCallback | None:
    """One step callback calling ``first`` then ``second`` (either may be None)."""
    if first is None or second is None:
        return first or second

    def call(step: int, tokens: list[int], active: list[bool]) -> None:
        first(step, tokens, active)
        second(step, tokens, active)

    return call


class ContextLengthError(ValueError):
    """A prompt does not fit the model's context with the tokens asked for."""


class Generator:
    """Batched, streamed generation from conversations.

    :param model: implements :class:`~nvlcore.generation.protocol.DecodableModel`.
    :param tokenizer: decodes generated ids to text.
    :param prepare: conversation -> ``{"input_ids": ..., **media}`` (see :data:`PrepareFn`).
    :param stop_token_ids: the end-of-turn token(s).
    :param pad_token_id: left-padding id.
    :param device: where inputs are moved.
    :param media_dtype: floating media tensors (pixels) are cast to this dtype (the vision
        tower's); ``None`` leaves them alone.
    :param max_length: the model's context in tokens (prompt + generated); a prompt that does not fit
        with ``max_new_tokens`` is refused with :class:`ContextLengthError`. ``None``: no limit known.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        prepare: PrepareFn,
        *,
        stop_token_ids: Iterable[int],
        pad_token_id: int,
        device: torch.device | str = "cpu",
        media_dtype: torch.dtype | None = None,
        max_length: int | None = None,
    ) -> None:
        import torch

        self.model = model
        self.tokenizer = tokenizer
        self.prepare = prepare
        self.stop_token_ids = [int(t) for t in stop_token_ids]
        if not self.stop_token_ids:
            raise ValueError("Generator needs at least one stop token id (the model's end-of-turn token)")
        self.pad_token_id = int(pad_token_id)
        self.device = torch.device(device)
        self.media_dtype = media_dtype
        self.max_length = max_length

    def check_length(self, prompt_tokens: int, max_new_tokens: int, *, index: int = 0) -> None:
        """Refuse a prompt that, with ``max_new_tokens``, does not fit the model's context (:attr:`max_length`).

        :raises ContextLengthError: one line saying by how much and what to lower.
        """
        limit = self.max_length
        if limit is None:
            return
        which = f"prompt {index}" if index else "the prompt"
        if prompt_tokens >= limit:
            raise ContextLengthError(f"{which} is {prompt_tokens} tokens, longer than the model's context of {limit} "
                                     "tokens; shorten it")
        if prompt_tokens + max_new_tokens > limit:
            raise ContextLengthError(
                f"{which} is {prompt_tokens} tokens and max_new_tokens={max_new_tokens} would run past the model's "
                f"context of {limit} tokens; lower max_new_tokens to {limit - prompt_tokens} or shorten the prompt"
            )

    def _to_device(self, value: Any) -> Any:
        import torch

        if isinstance(value, torch.Tensor):
            if value.is_floating_point() and self.media_dtype is not None:
                value = value.to(self.media_dtype)
            return value.to(self.device)
        return value

    def generate(
        self,
        conversations: Conversation | Sequence[Conversation],
        *,
        max_new_tokens: int = 100,
        sampling: SamplingParams | None = None,
        batch_size: int | None = None,
        stream: TextIO | None = None,
        on_output: Callable[[GenerationOutput], Any] | None = None,
    ) -> list[GenerationResult]:
        """Generate a reply to each conversation (its last turn must be the user's).

        :param batch_size: rows decoded together (default: all at once). Prompts of different
            lengths are left-padded; the results equal one-by-one generation.
        :param stream: when given, the first row of each batch is written there token by token.
        :param on_output: receives each batch's raw :class:`GenerationOutput` (timings, steps).
        """
        convs = [conversations] if isinstance(conversations, Mapping) else list(conversations)
        if not convs:
            return []
        size = batch_size or len(convs)
        if size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        results: list[GenerationResult] = []
        for start in range(0, len(convs), size):
            prepared = [self.prepare(c) for c in convs[start : start + size]]
            results += self.generate_prepared(
                prepared, max_new_tokens=max_new_tokens, sampling=sampling, stream=stream, on_output=on_output,
                first_index=start,
            )
        return results

    def generate_prepared(
        self,
        prepared: Sequence[Mapping[str, Any]],
        *,
        max_new_tokens: int = 100,
        sampling: SamplingParams | None = None,
        stream: TextIO | None = None,
        on_output: Callable[[GenerationOutput], Any] | None = None,
        first_index: int = 0,
        on_step: StepCallback | None = None,
    ) -> list[GenerationResult]:
        """Decode one batch of prompts already made by ``prepare`` (left-padded together).

        Callers that pick the batches themselves (``nvl eval`` batches prompts of similar length)
        prepare each conversation once and call this per batch.

        :param first_index: index of the first prompt, for error messages.
        :param on_step: called after every decode step with every row's token (``nvl serve`` streams
            and finishes each request from it); see :data:`~nvlcore.generation.loop.StepCallback`.
        """
        import torch

        items = [dict(p) for p in prepared]
        if not items:
            return []
        prompts: list[list[int]] = []
        for i, p in enumerate(items):
            if "input_ids" not in p:
                raise KeyError(f"prepare() returned no 'input_ids' for conversation {first_index + i}")
            prompts.append(torch.as_tensor(p.pop("input_ids")).reshape(-1).tolist())
            self.check_length(len(prompts[-1]), max_new_tokens, index=first_index + i)
        media = {k: self._to_device(v) for k, v in merge_model_inputs(items).items()}
        ids, mask = left_pad(prompts, self.pad_token_id, device=self.device)
        streamer = (
            TextStreamer(self.tokenizer, stream, skip_token_ids=self.stop_token_ids) if stream is not None else None
        )
        out = generate_tokens(
            self.model,
            ids,
            mask,
            max_new_tokens=max_new_tokens,
            sampling=sampling,
            stop_token_ids=self.stop_token_ids,
            pad_token_id=self.pad_token_id,
            model_inputs=media,
            on_step=_both(streamer, on_step),
        )
        if streamer is not None:
            streamer.end()
        if on_output is not None:
            on_output(out)
        results: list[GenerationResult] = []
        for r, prompt in enumerate(prompts):
            toks = out.token_ids[r]
            body = toks[:-1] if toks and toks[-1] in self.stop_token_ids else toks
            results.append(
                GenerationResult(
                    text=self.tokenizer.decode(body, skip_special_tokens=True),
                    prompt_token_ids=prompt,
                    token_ids=toks,
                    finish_reason=out.finish_reasons[r],
                    prefill_tokens_per_s=out.prefill_tokens_per_s,
                    decode_tokens_per_s=out.decode_tokens_per_s,
                )
            )
        return results


__all__ = [
    "ContextLengthError",
    "GenerationResult",
    "Generator",
    "IncrementalDetokenizer",
    "build_conversation",
    "merge_model_inputs",
]
