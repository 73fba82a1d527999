"""The decode loop: prefill once, then one token per step until every row has stopped.

Timing is split the way serving systems report it: *prefill* covers everything up to the first
generated token (vision encoder, prompt forward, first sample); *decode* covers the remaining
steps. Decode tokens/s counts the tokens of rows still generating, so a batch in which one row has
stopped is not credited for the padding it keeps computing.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from nvlcore.generation.sampling import SamplingParams, sample_next_token

if TYPE_CHECKING:
    import torch

StepCallback = Callable[[int, list[int], list[bool]], Any]
"""``on_step(step, tokens, active)``: ``tokens[r]`` is row ``r``'s token of this step and
``active[r]`` whether the row was still generating (a row that emits its stop token is active at
that step and inactive afterwards)."""


@dataclass
class GenerationOutput:
    """What :func:`generate_tokens` returns.

    ``token_ids[r]`` are row ``r``'s generated tokens, including the stop token when one ended
    the row (as transformers' ``generate`` does) and nothing after it.
    """

    token_ids: list[list[int]]
    finish_reasons: list[str]
    prompt_tokens: int
    prefill_seconds: float
    decode_seconds: float
    decode_tokens: int
    steps: int
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def generated_tokens(self) -> int:
        return sum(len(t) for t in self.token_ids)

    @property
    def prefill_tokens_per_s(self) -> float:
        """Prompt tokens (padding excluded) per second of prefill."""
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds > 0 else float("nan")

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens produced by decode steps (the first token comes from prefill) per second."""
        if self.decode_tokens == 0 or self.decode_seconds <= 0:
            return float("nan")
        return self.decode_tokens / self.decode_seconds


def _sync(device: torch.device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def left_pad(
    sequences: Sequence[torch.Tensor | Sequence[int]], pad_token_id: int, *, device: Any = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack 1-D token sequences into ``input_ids [B, L]`` and ``attention_mask [B, L]``, padding on
    the left so every row's last prompt token sits in the last column."""
    import torch

    rows = [torch.as_tensor(s, dtype=torch.long).reshape(-1) for s in sequences]
    if not rows:
        raise ValueError("left_pad: no sequences")
    if any(r.numel() == 0 for r in rows):
        raise ValueError("left_pad: an empty prompt cannot be generated from")
    length = max(r.numel() for r in rows)
    ids = torch.full((len(rows), length), int(pad_token_id), dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, length - r.numel() :] = r
        mask[i, length - r.numel() :] = 1
    if device is not None:
        ids, mask = ids.to(device), mask.to(device)
    return ids, mask


def generate_tokens(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    max_new_tokens: int,
    sampling: SamplingParams | None = None,
    stop_token_ids: Iterable[int] = (),
    pad_token_id: int = 0,
    model_inputs: dict[str, Any] | None = None,
    cache_dtype: torch.dtype | None = None,
    on_step: StepCallback | None = None,
) -> GenerationOutput:
    """Decode up to ``max_new_tokens`` tokens per row with a model implementing
    :class:`~nvlcore.generation.protocol.DecodableModel`.

    :param input_ids: ``[B, L]`` prompt ids, left-padded (see :func:`left_pad`).
    :param attention_mask: ``[B, L]``, 1 on real tokens; all ones when omitted.
    :param sampling: greedy when omitted.
    :param stop_token_ids: a row stops after emitting one of these (the end-of-turn token).
    :param pad_token_id: fed to finished rows while others continue (their output is discarded).
    :param model_inputs: extra prefill inputs (``pixel_values``, ...).
    :param cache_dtype: dtype of the cache buffers; defaults to the model's first floating
        parameter's dtype (float32 for a model without parameters).
    :param on_step: called after every step with the step's tokens (streaming).
    """
    import torch

    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, length], got shape {tuple(input_ids.shape)}")
    sampling = sampling or SamplingParams()
    device = input_ids.device
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape {tuple(input_ids.shape)}"
        )
    if not bool((attention_mask[:, -1] != 0).all()):
        raise ValueError("prompts must be left-padded: every row's last column must be a real token")
    if cache_dtype is None:
        cache_dtype = next(
            (p.dtype for p in getattr(model, "parameters", lambda: iter(()))() if p.is_floating_point()),
            torch.float32,
        )
    stops = torch.tensor(sorted(set(int(t) for t in stop_token_ids)), dtype=torch.long, device=device)
    batch, prompt_len = input_ids.shape
    generator = sampling.make_generator(device)

    out: list[list[int]] = [[] for _ in range(batch)]
    reasons = ["length"] * batch
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    decode_tokens = 0

    with torch.inference_mode():
        _sync(device)
        t0 = time.perf_counter()
        cache = model.allocate_cache(batch, prompt_len + max_new_tokens, dtype=cache_dtype, device=device)
        logits = model.prefill(input_ids, attention_mask=attention_mask, cache=cache, **(model_inputs or {}))
        _check_logits(logits, batch)
        token = sample_next_token(logits, sampling, generator)
        _sync(device)
        t1 = time.perf_counter()
        step = 0
        while True:
            active = ~finished
            token = torch.where(active, token, torch.full_like(token, pad_token_id))
            if stops.numel():
                finished = finished | (active & torch.isin(token, stops))
            # One host transfer per step: the stream and the stop decision both need the tokens.
            host = torch.stack([token, active.long(), finished.long()]).tolist()
            toks, act, fin = host[0], [bool(a) for a in host[1]], host[2]
            for r in range(batch):
                if act[r]:
                    out[r].append(toks[r])
                    if fin[r]:
                        reasons[r] = "stop"
            if step > 0:
                decode_tokens += sum(act)
            if on_step is not None:
                on_step(step, toks, act)
            step += 1
            if all(fin) or step >= max_new_tokens:
                break
            logits = model.decode_step(token, cache)
            token = sample_next_token(logits, sampling, generator)
        _sync(device)
        t2 = time.perf_counter()

    return GenerationOutput(
        token_ids=out,
        finish_reasons=reasons,
        prompt_tokens=int(attention_mask.sum().item()),
        prefill_seconds=t1 - t0,
        decode_seconds=t2 - t1,
        decode_tokens=decode_tokens,
        steps=step,
    )


def _check_logits(logits: torch.Tensor, batch: int) -> None:
    if logits.dim() != 2 or logits.shape[0] != batch:
        raise ValueError(
            f"model.prefill must return next-token logits of shape [batch={batch}, vocab], got {tuple(logits.shape)}"
        )
