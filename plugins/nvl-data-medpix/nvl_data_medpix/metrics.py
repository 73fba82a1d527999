"""MedPix-VQA metrics: exact match and token F1 after normalisation (lower case, punctuation and
articles removed), and ROUGE-L (F-measure of Google's ``rouge-score``, with stemming): answers are
free text, from one word to a sentence."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar


class MedPixMetrics:
    names: ClassVar[tuple[str, ...]] = ("exact_match", "token_f1", "rouge_l")
    max_new_tokens: ClassVar[int] = 128

    def score(self, prediction: str, reference: str, sample: Mapping[str, Any] | None = None) -> dict[str, float]:
        from nvlcore.eval.metrics import exact_match, rouge_l, token_f1

        return {"exact_match": exact_match(prediction, reference), "token_f1": token_f1(prediction, reference),
                "rouge_l": rouge_l(prediction, reference)}
