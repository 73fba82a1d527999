"""Evaluation: answer a dataset split with a model and score the answers with the dataset maker's
metrics (``nvl eval``, the quickstart's accuracy, and ``validation.generate_eval_interval``).

Importing this package is cheap; see docs/eval.md.
"""

from __future__ import annotations

from nvlcore.eval.metrics import (
    GenericMetrics,
    TaskMetrics,
    aggregate_scores,
    exact_match,
    metrics_for,
    normalize_answer,
    option_letter,
    rouge_l,
    token_f1,
)
from nvlcore.eval.runner import (
    EvalError,
    EvalRecord,
    EvalReport,
    EvalSample,
    eval_samples,
    evaluate_generator,
    evaluate_split,
    generate_predictions,
    read_predictions,
    score_records,
    write_records,
)

__all__ = [
    "EvalError",
    "EvalRecord",
    "EvalReport",
    "EvalSample",
    "GenericMetrics",
    "TaskMetrics",
    "aggregate_scores",
    "eval_samples",
    "evaluate_generator",
    "evaluate_split",
    "exact_match",
    "generate_predictions",
    "metrics_for",
    "normalize_answer",
    "option_letter",
    "read_predictions",
    "rouge_l",
    "score_records",
    "write_records",
    "token_f1",
]
