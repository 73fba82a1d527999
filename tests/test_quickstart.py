"""`nvl quickstart`: the whole workflow on a toy model, and proof that the task needs the image."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from nvl_nemotron_vl.quickstart import ascii_curve, read_losses, save_curve_png


def test_loss_curve_helpers(tmp_path: Path) -> None:
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("\n".join(json.dumps({"iteration": i, "loss": 5.0 / i}) for i in range(1, 11)) + "\n")
    points = read_losses(metrics)
    assert points[0] == (1, 5.0) and points[-1] == (10, 0.5)
    art = ascii_curve(points, width=20, height=5)
    lines = art.splitlines()
    assert lines[0].startswith("  5.000 |*")  # the first point is the highest, top left
    assert lines[4].rstrip().endswith("*")  # the last is the lowest, bottom right
    png = tmp_path / "curve.png"
    save_curve_png(points, png)
    from PIL import Image

    with Image.open(png) as img:
        assert img.size == (640, 400)
        assert (30, 70, 225) in {c for _, c in img.getcolors(1 << 20)}  # the curve was drawn


def test_refuses_existing_workdir(tmp_path: Path) -> None:
    from nvlcore.cli import build_cli

    (tmp_path / "keep.txt").write_text("precious")
    result = CliRunner().invoke(build_cli(), ["quickstart", "--workdir", str(tmp_path)])
    assert result.exit_code != 0
    assert "--overwrite" in result.output
    assert (tmp_path / "keep.txt").read_text() == "precious"


@pytest.fixture(scope="module")
def quickstart_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, dict, Path]:
    """One `nvl quickstart --json` run shared by the tests below: (process, summary, work dir)."""
    work = tmp_path_factory.mktemp("quickstart") / "qs"
    proc = subprocess.run(
        [sys.executable, "-m", "nvlcore", "quickstart", "--workdir", str(work), "--json"],
        capture_output=True, text=True, env=dict(os.environ, PYTHONWARNINGS="ignore"), timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc, json.loads(proc.stdout.strip().splitlines()[-1]), work


@pytest.mark.slow
def test_quickstart_learns_and_only_by_looking(quickstart_run, record_property) -> None:
    """The README's main job: accuracy rises from chance to >= 0.9, and blank images stay at chance."""
    proc, result, work = quickstart_run
    assert result["accuracy_before"] <= 0.35  # a random toy is at or below chance (0.25)
    assert result["accuracy_after"] >= 0.9
    assert result["accuracy_after_blind"] <= 0.4  # blank images: the trained model can only guess
    record_property("quickstart_seconds", result["seconds"])  # recorded, not asserted: CI machines are shared
    print(f"nvl quickstart took {result['seconds']:.0f} s")
    assert (work / "loss_curve.png").is_file()
    assert (work / "hf" / "model.safetensors.index.json").is_file() or list((work / "hf").glob("*.safetensors"))
    assert "iteration" in proc.stderr and "held-out accuracy after fine-tuning" in proc.stderr
    assert "(the same as: nvl eval --hf-model-path" in proc.stderr


@pytest.mark.slow
def test_nvl_eval_shows_the_quickstarts_gain(quickstart_run) -> None:
    """Base vs fine-tuned with `nvl eval` on the quickstart's test split: the same numbers as the
    quickstart, also with the LoRA run's adapters merged in memory instead of the merged, exported model."""
    from nvl_nemotron_vl.quickstart import eval_overrides

    _, result, work = quickstart_run

    def nvl_eval(*args: str) -> dict:
        run = subprocess.run([sys.executable, "-m", "nvlcore", "eval", *args, "--batch-size", "25", "--json"],
                             capture_output=True, text=True, env=dict(os.environ, PYTHONWARNINGS="ignore"), timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
        return json.loads(run.stdout.strip().splitlines()[-1])

    base = nvl_eval("--hf-model-path", str(work / "toy"), *eval_overrides(100))
    tuned = nvl_eval("--hf-model-path", str(work / "hf"), *eval_overrides(100), "--output", str(work / "preds.jsonl"))
    blind = nvl_eval("--hf-model-path", str(work / "hf"), *eval_overrides(100, blank_images=True))
    lora = nvl_eval("--hf-model-path", str(work / "toy"), "--lora-checkpoint", str(work / "lora"), *eval_overrides(100))
    assert base["metrics"]["exact_match"] == result["accuracy_before"]
    assert tuned["metrics"]["exact_match"] == result["accuracy_after"]
    assert tuned["metrics"]["exact_match"] - base["metrics"]["exact_match"] >= 0.5  # the gain
    assert blind["metrics"]["exact_match"] == result["accuracy_after_blind"]
    assert abs(lora["metrics"]["exact_match"] - result["accuracy_after"]) <= 0.02
    assert tuned["num_samples"] == 100 and len((work / "preds.jsonl").read_text().splitlines()) == 100
