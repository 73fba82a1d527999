"""Generate answers for a dataset split and score them: the engine of ``nvl eval`` and of the
trainer's generation-based validation.

* :func:`eval_samples` turns a maker's conversations into prompts (every turn before the last
  assistant turn) and references (the last assistant turn's text).
* :func:`generate_predictions` decodes them with a :class:`nvlcore.generation.Generator` in batches
  of prompts of similar length (longest first, so memory problems show up at once), optionally on
  this data-parallel rank's shard only.
* :func:`score_records` scores predictions with the maker's metrics (:mod:`nvlcore.eval.metrics`).

torch is imported inside the functions that need it.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nvlcore.eval.metrics import aggregate_scores

#: Prepared prompts (pixels included) kept between the length pass and generation, per process.
PREPARED_CACHE_BYTES = 2 * 1024**3


class EvalError(ValueError):
    """A problem with the evaluation's inputs (names the file, line or sample at fault)."""


@dataclass
class EvalSample:
    """One prompt to answer.

    :param id: the example's index in the split.
    :param prompt: the conversation to answer (its last turn is the user's).
    :param reference: the expected answer (the last assistant turn's text).
    :param question: the last user turn's text (kept in prediction files; some metrics read it).
    :param row: the source row (``made.row_index(i)``) when the maker tells it.
    """

    id: int
    prompt: dict[str, Any]
    reference: str
    question: str = ""
    row: int | None = None


@dataclass
class EvalRecord:
    """One scored answer: a line of ``nvl eval --output``."""

    id: Any
    prediction: str
    reference: str
    question: str = ""
    row: int | None = None
    num_tokens: int = 0
    finish_reason: str = ""
    scores: dict[str, float] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "prediction": self.prediction, "reference": self.reference,
                               "scores": {k: v for k, v in self.scores.items() if not k.startswith("_")}}
        if self.question:
            out["question"] = self.question
        if self.row is not None:
            out["row"] = self.row
        if self.finish_reason:
            out["num_tokens"] = self.num_tokens
            out["finish_reason"] = self.finish_reason
        return out


@dataclass
class EvalReport:
    """What an evaluation produced: the summary (``nvl eval --json``) and the records."""

    metrics: dict[str, float]
    records: list[EvalRecord]
    seconds: float = 0.0
    generated_tokens: int = 0

    @property
    def num_samples(self) -> int:
        return len(self.records)

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def samples_per_s(self) -> float:
        return self.num_samples / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> dict[str, Any]:
        return {"metrics": dict(self.metrics), "num_samples": self.num_samples,
                "tokens_per_s": round(self.tokens_per_s, 3), "samples_per_s": round(self.samples_per_s, 4),
                "generated_tokens": self.generated_tokens, "seconds": round(self.seconds, 3)}


def _text_of(turn: Mapping[str, Any]) -> str:
    content = turn.get("content")
    if isinstance(content, str):
        return content
    return "".join(item.get("text", "") for item in content or () if item.get("type") == "text")


def split_conversation(conversation: Mapping[str, Any], *, where: str = "example") -> tuple[dict[str, Any], str, str]:
    """``(prompt, reference, question)``: the turns before the last assistant turn, that turn's text,
    and the text of the user turn that asked it.

    :raises EvalError: when the conversation has no assistant turn with text.
    """
    turns = list(conversation.get("conversation") or ())
    last = max((i for i, t in enumerate(turns) if t.get("role") == "assistant"), default=None)
    if last is None or not _text_of(turns[last]).strip():
        raise EvalError(f"{where}: no assistant turn with text to compare against (the reference answer)")
    prompt_turns = turns[:last]
    users = [t for t in prompt_turns if t.get("role") == "user"]
    if not users:
        raise EvalError(f"{where}: no user turn before the answer")
    return {"conversation": prompt_turns}, _text_of(turns[last]).strip(), _text_of(users[-1]).strip()


def with_system_prompt(conversation: Mapping[str, Any], system_prompt: str | None) -> dict[str, Any]:
    """The conversation with a system turn in front when it has none and ``system_prompt`` is set."""
    turns = list(conversation["conversation"])
    if system_prompt and not (turns and turns[0].get("role") == "system"):
        turns.insert(0, {"role": "system", "content": [{"type": "text", "text": system_prompt}]})
    return {"conversation": turns}


def eval_samples(made: Any, *, limit: int | None = None, system_prompt: str | None = "/no_think",
                 indices: Iterable[int] | None = None, name: str = "dataset") -> list[EvalSample]:
    """The prompts and references of a made dataset (first ``limit`` examples, or ``indices``).

    :param system_prompt: added as a system turn to conversations without one (``/no_think``: the
        model answers directly, rendered exactly as in training).
    """
    n = len(made)
    chosen = list(indices) if indices is not None else list(range(n if limit is None else min(limit, n)))
    row_index = getattr(made, "row_index", None)
    out = []
    for i in chosen:
        prompt, reference, question = split_conversation(made[i], where=f"{name}[{i}]")
        row = None
        if callable(row_index):
            try:
                row = int(row_index(i))
            except Exception:  # makers without source rows
                row = None
        out.append(EvalSample(i, with_system_prompt(prompt, system_prompt), reference, question, row))
    return out


def shard(items: Sequence[Any], rank: int, world: int) -> list[Any]:
    """This data-parallel rank's share: every ``world``-th item starting at ``rank``."""
    return list(items[rank::world])


def _tensor_bytes(item: Mapping[str, Any]) -> int:
    import torch

    return sum(v.numel() * v.element_size() for v in item.values() if isinstance(v, torch.Tensor))


def generate_predictions(
    generator: Any,
    samples: Sequence[EvalSample],
    *,
    batch_size: int = 8,
    max_new_tokens: int = 128,
    sampling: Any = None,
    sort_by_length: bool = True,
    progress: Callable[[str], None] | None = None,
    cache_bytes: int = PREPARED_CACHE_BYTES,
) -> tuple[list[EvalRecord], dict[str, float]]:
    """Answer every sample; returns the (unscored) records in the samples' order and timings.

    Each prompt is prepared once to learn its length (kept for generation while the prepared
    tensors fit in ``cache_bytes``, prepared again otherwise); batches hold prompts of similar
    length, longest first.
    """
    import torch

    t0 = time.perf_counter()
    prepared: dict[int, Mapping[str, Any]] = {}
    lengths: list[int] = []
    used = 0
    for k, s in enumerate(samples):
        try:
            p = generator.prepare(s.prompt)
        except Exception as exc:
            raise EvalError(f"sample {s.id}: the model's processor refused it: {type(exc).__name__}: {exc}") from exc
        lengths.append(int(torch.as_tensor(p["input_ids"]).numel()))
        size = _tensor_bytes(p)
        if used + size <= cache_bytes:
            prepared[k] = p
            used += size
    order = sorted(range(len(samples)), key=lambda k: -lengths[k]) if sort_by_length else list(range(len(samples)))
    texts: dict[int, Any] = {}
    tokens = 0
    done = 0
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        items = [prepared.pop(k) if k in prepared else generator.prepare(samples[k].prompt) for k in batch]
        results = generator.generate_prepared(items, max_new_tokens=max_new_tokens, sampling=sampling)
        for k, res in zip(batch, results, strict=True):
            texts[k] = res
            tokens += len(res.token_ids)
        done += len(batch)
        if progress is not None:
            dt = time.perf_counter() - t0
            progress(f"nvl eval: {done}/{len(samples)} samples, {done / dt:.2f} samples/s, {tokens / dt:.1f} tokens/s")
    seconds = time.perf_counter() - t0
    records = [
        EvalRecord(id=s.id, prediction=texts[k].text.strip(), reference=s.reference, question=s.question, row=s.row,
                   num_tokens=len(texts[k].token_ids), finish_reason=texts[k].finish_reason)
        for k, s in enumerate(samples)
    ]
    return records, {"seconds": seconds, "generated_tokens": float(tokens)}


def gather_records(records: list[EvalRecord], timings: Mapping[str, float], *, contribute: bool = True
                   ) -> tuple[list[EvalRecord], dict[str, float]]:
    """All ranks' records (sorted by id) and timings (longest time, summed tokens) on every rank.

    :param contribute: False on ranks whose records another rank already holds (tensor-parallel
        ranks other than the first of their group).
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return sorted(records, key=lambda r: r.id), dict(timings)
    mine = (records if contribute else [], dict(timings) if contribute else {})
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    allrecs = [r for recs, _ in gathered for r in recs]
    secs = max((t.get("seconds", 0.0) for _, t in gathered if t), default=0.0)
    toks = sum(t.get("generated_tokens", 0.0) for _, t in gathered if t)
    return sorted(allrecs, key=lambda r: r.id), {"seconds": secs, "generated_tokens": toks}


def score_records(metrics: Any, records: Sequence[EvalRecord]) -> dict[str, float]:
    """Score each record in place (``record.scores``) and return the summary metrics."""
    for r in records:
        r.scores = {k: float(v) for k, v in metrics.score(r.prediction, r.reference,
                                                        {"question": r.question, "id": r.id}).items()}
    return aggregate_scores(metrics, [r.scores for r in records]) if records else {}


def read_predictions(path: str | Path) -> list[EvalRecord]:
    """Records from a JSON-lines file with ``prediction`` and ``reference`` per line (``id`` and
    ``question`` optional), such as ``nvl eval --output`` writes.

    :raises EvalError: naming the file and line of a malformed record.
    """
    p = Path(path)
    if not p.is_file():
        raise EvalError(f"{p}: no such predictions file")
    out = []
    for n, line in enumerate(p.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise EvalError(f"{p}:{n}: not valid JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise EvalError(f"{p}:{n}: each line must be a JSON object with 'prediction' and 'reference'")
        for key in ("prediction", "reference"):
            if not isinstance(row.get(key), str):
                raise EvalError(f"{p}:{n}: '{key}' is missing or not a string")
        out.append(EvalRecord(id=row.get("id", len(out)), prediction=row["prediction"], reference=row["reference"],
                              question=str(row.get("question") or ""), row=row.get("row")))
    if not out:
        raise EvalError(f"{p}: no predictions in the file")
    return out


def write_records(path: str | Path, records: Sequence[EvalRecord]) -> Path:
    """Write one JSON line per record (atomically: a temporary file renamed into place)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    with tmp.open("w") as fh:
        for r in records:
            fh.write(json.dumps(r.as_json(), ensure_ascii=False) + "\n")
    tmp.replace(p)
    return p


def format_table(metrics: Mapping[str, float], *, num_samples: int, title: str = "") -> str:
    """The metrics as an aligned two-column table."""
    rows = [("metric", "value")] + [(k, f"{v:.4f}") for k, v in metrics.items()] + [("samples", str(num_samples))]
    width = max(len(r[0]) for r in rows)
    lines = [title] if title else []
    lines += [f"  {a:<{width}}  {b:>8}" for a, b in rows]
    return "\n".join(lines)


Predict = Callable[[Sequence[EvalSample], int], "tuple[list[EvalRecord], dict[str, float]]"]
"""``predict(samples, max_new_tokens) -> (records, timings)``: an answer source of :func:`evaluate_split`
(the in-process generator's :func:`generate_predictions`, or an endpoint's answers)."""


def evaluate_split(
    predict: Predict,
    made: Any,
    metrics: Any,
    *,
    limit: int | None = None,
    max_new_tokens: int | None = None,
    system_prompt: str | None = "/no_think",
    rank: int = 0,
    world: int = 1,
    contribute: bool = True,
    name: str = "dataset",
) -> EvalReport:
    """This rank's share of the split answered by ``predict``, gathered (when ``world > 1``) and scored.

    Every rank returns the same report (the gather is collective when ``world > 1``).
    """
    indices = shard(range(min(limit, len(made)) if limit is not None else len(made)), rank, world)
    samples = eval_samples(made, indices=indices, system_prompt=system_prompt, name=name)
    budget = max_new_tokens or int(getattr(metrics, "max_new_tokens", 128))
    records, timings = predict(samples, budget)
    if world > 1:
        records, timings = gather_records(records, timings, contribute=contribute)
    summary = score_records(metrics, records)
    return EvalReport(summary, records, seconds=timings["seconds"], generated_tokens=int(timings["generated_tokens"]))


def evaluate_generator(
    generator: Any,
    made: Any,
    metrics: Any,
    *,
    limit: int | None = None,
    batch_size: int = 8,
    max_new_tokens: int | None = None,
    sampling: Any = None,
    system_prompt: str | None = "/no_think",
    rank: int = 0,
    world: int = 1,
    contribute: bool = True,
    name: str = "dataset",
    progress: Callable[[str], None] | None = None,
) -> EvalReport:
    """Generate, gather (when ``world > 1``) and score: the whole evaluation of one split
    (:func:`evaluate_split` with the generator as the answer source)."""

    def predict(samples: Sequence[EvalSample], budget: int) -> tuple[list[EvalRecord], dict[str, float]]:
        return generate_predictions(generator, samples, batch_size=batch_size, max_new_tokens=budget,
                                    sampling=sampling, progress=progress)

    return evaluate_split(predict, made, metrics, limit=limit, max_new_tokens=max_new_tokens,
                          system_prompt=system_prompt, rank=rank, world=world, contribute=contribute, name=name)


def echo_err(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
