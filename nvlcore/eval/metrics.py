"""Task metrics: the contract a dataset maker's metrics follow, and the generic fallback.

A dataset maker owns its metrics (:func:`metrics_for` finds them on the maker's ``metrics``
attribute); a maker without one is scored with :class:`GenericMetrics` (exact match and token F1
after :func:`normalize_answer`). Everything here is plain Python: importing it is cheap, and ROUGE
(``rouge-score``) is imported only when :func:`rouge_l` runs.

The contract (:class:`TaskMetrics`)::

    class MyMetrics:
        names = ("accuracy",)              # summary metrics, in table order
        max_new_tokens = 16                # optional: the generation budget nvl eval uses by default
        def score(self, prediction: str, reference: str, sample: Mapping | None = None) -> dict[str, float]:
            ...                            # per-sample scores; keys starting with "_" are private
        def aggregate(self, scores: Sequence[Mapping[str, float]]) -> dict[str, float]:   # optional
            ...                            # default: each name's mean over the samples that have it

``sample`` carries what the prediction file keeps of the example (``question``: the last user text),
so scoring a predictions file later gives the same numbers.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

__all__ = [
    "GenericMetrics",
    "TaskMetrics",
    "aggregate_scores",
    "exact_match",
    "levenshtein",
    "mean_scores",
    "metrics_for",
    "normalize_answer",
    "option_letter",
    "rouge_l",
    "token_f1",
]


@runtime_checkable
class TaskMetrics(Protocol):
    """What a dataset maker's ``metrics`` attribute provides (see the module docstring)."""

    names: Sequence[str]

    def score(self, prediction: str, reference: str, sample: Mapping[str, Any] | None = None) -> dict[str, float]:
        ...


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower case, punctuation and the articles a/an/the removed, whitespace collapsed (SQuAD's rule)."""
    text = "".join(ch for ch in str(text).lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when the normalised texts are equal, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(reference))


def token_f1(prediction: str, reference: str) -> float:
    """F1 of the normalised tokens (bag of words, SQuAD's definition).

    Two empty answers score 1.0; one empty answer scores 0.0.
    """
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


_ROUGE: Any = None


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure of Google's ``rouge-score`` package (its tokenizer, Porter stemming).

    Identical texts score 1.0 even when the tokenizer keeps no token of them (non-Latin text).
    """
    if prediction.strip() == reference.strip():
        return 1.0 if reference.strip() else 0.0
    global _ROUGE
    if _ROUGE is None:
        try:
            from rouge_score import rouge_scorer
        except ImportError as exc:  # pragma: no cover - the plugins that need it depend on it
            raise ImportError("ROUGE-L needs the rouge-score package: pip install rouge-score") from exc
        _ROUGE = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return float(_ROUGE.score(reference, prediction)["rougeL"].fmeasure)


def levenshtein(a: str, b: str) -> int:
    """Edit distance between two strings (insertions, deletions, substitutions cost 1)."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


_OPTION_PATTERNS = (
    re.compile(r"^\s*\(?([A-Z])\)?\s*(?:[.):]|$)"),               # "B", "B.", "(B)", "B) text", "B: text"
    re.compile(r"\b(?i:answer|option|choice)\s*(?i:is)?\s*:?\s*\(?([A-Z])\)?(?![A-Za-z])"),
)


def option_letter(text: str, letters: str = string.ascii_uppercase) -> str | None:
    """The option letter an answer picks: ``"B"``, ``"B."``, ``"(B) a cat"``, ``"Answer: B"``,
    ``"The answer is (B)."``; ``None`` when there is none (``"A man waves."`` picks nothing)."""
    for pattern in _OPTION_PATTERNS:
        m = pattern.search(text)
        if m and m.group(1).upper() in letters:
            return m.group(1).upper()
    return None


def mean_scores(scores: Sequence[Mapping[str, float]], names: Sequence[str]) -> dict[str, float]:
    """Each name's mean over the samples whose scores have it (names no sample has are left out)."""
    out: dict[str, float] = {}
    for name in names:
        values = [float(s[name]) for s in scores if name in s]
        if values:
            out[name] = sum(values) / len(values)
    return out


def aggregate_scores(metrics: Any, scores: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """The summary of per-sample scores: ``metrics.aggregate`` when it has one, else :func:`mean_scores`."""
    agg = getattr(metrics, "aggregate", None)
    if agg is not None:
        return dict(agg(scores))
    return mean_scores(scores, list(metrics.names))


class GenericMetrics:
    """The fallback for makers without metrics: exact match and token F1 after normalisation."""

    names: tuple[str, ...] = ("exact_match", "token_f1")
    max_new_tokens = 128

    def score(self, prediction: str, reference: str, sample: Mapping[str, Any] | None = None) -> dict[str, float]:
        return {"exact_match": exact_match(prediction, reference), "token_f1": token_f1(prediction, reference)}


def metrics_for(maker: Any) -> Any:
    """The metrics of a dataset maker (class or instance): its ``metrics`` attribute, which may be an
    object with ``score``, a class (instantiated without arguments) or a lazy ``"module:Attr"``
    string; :class:`GenericMetrics` when it has none.

    :raises TypeError: naming the maker when ``metrics`` is set but has no ``score`` method.
    """
    target = getattr(maker, "metrics", None)
    if target is None:
        return GenericMetrics()
    if isinstance(target, str):
        from nvlcore.registry import import_target

        target = import_target(target, what=f"metrics of dataset maker {_name(maker)}")
    if isinstance(target, type):
        target = target()
    if not callable(getattr(target, "score", None)) or not getattr(target, "names", None):
        raise TypeError(
            f"dataset maker {_name(maker)}: its metrics {target!r} need a score(prediction, reference, sample) "
            "method and a names tuple (see docs/eval.md)"
        )
    return target


def _name(maker: Any) -> str:
    cls = maker if isinstance(maker, type) else type(maker)
    return getattr(cls, "name", None) or f"{cls.__module__}.{cls.__qualname__}"
