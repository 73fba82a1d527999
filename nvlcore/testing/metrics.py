"""Checks for the metrics of a dataset maker, used by the makers' tests (and usable by third-party
makers' tests): importing this module is cheap.

* :func:`check_reference_and_empty`: ``nvl eval --predictions`` with the references themselves must
  score 1.0 on every metric, and with empty predictions 0.0;
* :func:`run_eval_end_to_end`: ``nvl eval`` with a model on a local dataset writes the per-sample
  file and the summary with the documented keys.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

SUMMARY_KEYS = {"metrics", "num_samples", "tokens_per_s", "seconds"}
RECORD_KEYS = {"id", "prediction", "reference", "scores"}


def _invoke(args: Sequence[str]) -> Any:
    from click.testing import CliRunner

    from nvlcore.cli import build_cli

    result = CliRunner().invoke(build_cli(), list(args))
    if result.exit_code != 0:
        raise AssertionError(f"nvl {' '.join(args)} failed ({result.exit_code}):\n{result.output}")
    return result


def score_file(maker_name: str, predictions: Sequence[str], references: Sequence[str], tmp_path: Path,
               questions: Sequence[str] | None = None) -> dict[str, Any]:
    """``nvl eval --predictions`` on these pairs; returns the ``--json`` summary."""
    f = Path(tmp_path) / f"predictions-{abs(hash((tuple(predictions), tuple(references)))):x}.jsonl"
    with f.open("w") as fh:
        for i, (p, r) in enumerate(zip(predictions, references, strict=True)):
            row = {"id": i, "prediction": p, "reference": r}
            if questions:
                row["question"] = questions[i]
            fh.write(json.dumps(row) + "\n")
    result = _invoke(["eval", "--predictions", str(f), f"dataset.maker_name={maker_name}", "--json"])
    return json.loads(result.stdout.strip().splitlines()[-1])


def check_reference_and_empty(maker_name: str, references: Sequence[str], tmp_path: Path,
                              expected_metrics: Sequence[str]) -> tuple[dict[str, float], dict[str, float]]:
    """References score 1.0 and empty predictions 0.0 on every metric; the metric names are
    ``expected_metrics``. Returns both summaries' metrics."""
    perfect = score_file(maker_name, list(references), list(references), tmp_path)["metrics"]
    empty = score_file(maker_name, [""] * len(references), list(references), tmp_path)["metrics"]
    assert sorted(perfect) == sorted(expected_metrics), perfect
    assert sorted(empty) == sorted(expected_metrics), empty
    assert all(v == 1.0 for v in perfect.values()), perfect
    assert all(v == 0.0 for v in empty.values()), empty
    return perfect, empty


def run_eval_end_to_end(hf_dir: Path, maker_name: str, maker_kwargs: Mapping[str, Any], tmp_path: Path, *,
                        split: str | None = None, limit: int = 2, max_new_tokens: int = 4,
                        extra: Sequence[str] = ()) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """``nvl eval`` on a local dataset; checks the summary and the per-sample file and returns them."""
    out = Path(tmp_path) / f"eval-{maker_name}.jsonl"
    args = ["eval", "--hf-model-path", str(hf_dir), f"dataset.maker_name={maker_name}",
            f"dataset.maker_kwargs={json.dumps(dict(maker_kwargs))}", "--limit", str(limit),
            "--max-new-tokens", str(max_new_tokens), "--batch-size", "2", "--output", str(out), "--json", *extra]
    if split:
        args += ["--split", split]
    result = _invoke(args)
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert SUMMARY_KEYS <= set(summary), summary
    assert summary["num_samples"] == limit and summary["tokens_per_s"] > 0
    assert all(0.0 <= v <= 1.0 for v in summary["metrics"].values()), summary
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(lines) == limit and all(RECORD_KEYS <= set(x) for x in lines), lines
    assert [x["id"] for x in lines] == list(range(limit))
    return summary, lines
