"""`nvl quickstart`: the whole workflow on a toy model, and proof that the task needs the image."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from nvlcore.cli.quickstart import ascii_curve, read_losses, save_curve_png


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


@pytest.mark.slow
def test_quickstart_learns_and_only_by_looking(tmp_path: Path, record_property) -> None:
    """The README's main job: accuracy rises from chance to >= 0.9, and blank images stay at chance.

    The time is recorded, not asserted: on a loaded two-core machine it is many times the idle figure."""
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run(
        [sys.executable, "-m", "nvlcore", "quickstart", "--workdir", str(tmp_path / "qs"), "--json"],
        capture_output=True, text=True, env=env, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["accuracy_before"] <= 0.35  # a random toy is at or below chance (0.25)
    assert result["accuracy_after"] >= 0.9
    assert result["accuracy_after_blind"] <= 0.4  # blank images: the trained model can only guess
    record_property("quickstart_seconds", result["seconds"])
    print(f"nvl quickstart took {result['seconds']:.0f} s")
    work = tmp_path / "qs"
    assert (work / "loss_curve.png").is_file()
    assert (work / "hf" / "model.safetensors.index.json").is_file() or list((work / "hf").glob("*.safetensors"))
    assert "iteration" in proc.stderr and "held-out accuracy after fine-tuning" in proc.stderr
