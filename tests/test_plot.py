"""``nvl plot``: a run's metrics.jsonl drawn into one PNG (issue 17 item 13)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner


def write_metrics(run: Path, *, evals: bool) -> Path:
    run.mkdir(parents=True, exist_ok=True)
    rows = [{"iteration": i, "loss": 5.0 / i, "lr": 1e-3 * min(1, i / 3), "grad_norm": 2.0 / i,
             "tokens_per_s": 1000.0 + i} for i in range(1, 21)]
    if evals:
        rows += [{"iteration": i, "val_loss": 4.0 / i, "val_tokens": 100, "val_accuracy": i / 25} for i in (10, 20)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"iteration": 21, "lo')
    return run


@pytest.mark.parametrize("evals", [False, True], ids=["train-only", "with-eval"])
def test_nvl_plot_draws_one_png_next_to_metrics(tmp_path, evals):
    from PIL import Image

    from nvlcore.cli import build_cli

    run = write_metrics(tmp_path / "run", evals=evals)
    res = CliRunner().invoke(build_cli(), ["plot", str(run)])
    assert res.exit_code == 0, res.output
    png = run / "metrics.png"
    assert res.output.strip() == str(png)
    with Image.open(png) as img:
        assert img.size == (1100, 720 if not evals else 1080)  # 2 x 2 panels, or a third row for evaluation
    assert not list(run.glob(".metrics.png.tmp-*"))


def test_nvl_plot_without_matplotlib_or_metrics_is_one_line(tmp_path, monkeypatch):
    from nvlcore.cli import build_cli

    res = CliRunner().invoke(build_cli(), ["plot", str(tmp_path)])
    assert res.exit_code == 1 and "metrics.jsonl does not exist" in res.output
    run = write_metrics(tmp_path / "run", evals=False)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    res = CliRunner().invoke(build_cli(), ["plot", str(run)])
    assert res.exit_code == 1 and "pip install 'nvlcore[plot]'" in res.output
    assert len(res.output.strip().splitlines()) == 1
    assert not (run / "metrics.png").exists()


def test_quickstart_curve_uses_matplotlib_when_given_the_metrics(tmp_path):
    from PIL import Image

    from nvl_nemotron_vl.quickstart import read_losses, save_curve_png

    run = write_metrics(tmp_path / "run", evals=False)
    out = tmp_path / "loss_curve.png"
    save_curve_png(read_losses(run / "metrics.jsonl"), out, metrics=run / "metrics.jsonl")
    with Image.open(out) as img:
        assert img.size == (1100, 720)
