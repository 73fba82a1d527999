"""LLaVA-Video-178K metrics.

A question is **multiple choice** when its reference answer is an option letter (``"C"``, ``"C."``,
``"(C) ..."``, as in the source's ``multi_choice`` split); it is scored by ``mc_accuracy`` (the
answer picks the same letter, read with :func:`nvlcore.eval.metrics.option_letter`). Every other
question is **open-ended** and scored by ``token_f1`` (normalised tokens) and ``rouge_l``
(``rouge-score``'s ROUGE-L F-measure). Each summary metric is the mean over its kind of question,
so a split without multiple-choice questions has no ``mc_accuracy``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, ClassVar

_LETTER_ANSWER = re.compile(r"^\s*\(?[A-Z]\)?\s*(?:[.):]|$)")


def is_multiple_choice(reference: str) -> bool:
    """True when the reference is an option letter, alone or followed by ``.``, ``)`` or ``:``."""
    return bool(_LETTER_ANSWER.match(reference))


class LlavaVideoMetrics:
    names: ClassVar[tuple[str, ...]] = ("mc_accuracy", "token_f1", "rouge_l")
    max_new_tokens: ClassVar[int] = 128

    def score(self, prediction: str, reference: str, sample: Mapping[str, Any] | None = None) -> dict[str, float]:
        from nvlcore.eval.metrics import option_letter, rouge_l, token_f1

        if is_multiple_choice(reference):
            return {"mc_accuracy": float(option_letter(prediction) == option_letter(reference))}
        return {"token_f1": token_f1(prediction, reference), "rouge_l": rouge_l(prediction, reference)}
