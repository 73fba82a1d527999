"""Raven's metric: accuracy of the chosen option.

The option letter is read from both the answer and the reference with
:func:`nvlcore.eval.metrics.option_letter` (``"B"``, ``"B."``, ``"(B)"``, ``"Answer: B"``, ``"The
answer is B."``); an answer that names no option is wrong. A reference without a letter (a subset
of the_cauldron with free-text answers) is compared by normalised exact match instead.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar


class RavenMetrics:
    """``option_accuracy``: 1 when the answer picks the reference's option."""

    names: ClassVar[tuple[str, ...]] = ("option_accuracy",)
    max_new_tokens: ClassVar[int] = 16

    def score(self, prediction: str, reference: str, sample: Mapping[str, Any] | None = None) -> dict[str, float]:
        from nvlcore.eval.metrics import exact_match, option_letter

        want = option_letter(reference)
        if want is None:
            return {"option_accuracy": exact_match(prediction, reference)}
        return {"option_accuracy": float(option_letter(prediction) == want)}
