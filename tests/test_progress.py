"""The one progress bar (issue 17 item 16): tqdm on a terminal only, off with NVL_PROGRESS=0 or enabled=False."""

from __future__ import annotations

import io

import pytest
from click.testing import CliRunner


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("env,enabled,tty,rank,shown", [
    (None, None, True, None, True),
    (None, None, False, None, False),  # not a terminal: off
    (None, False, True, None, False),  # --no-progress / --quiet
    ("0", None, True, None, False),
    ("1", None, False, None, True),  # forced on
    (None, None, True, "1", False),  # only rank 0 draws
])
def test_progress_enabled_rules(monkeypatch, env, enabled, tty, rank, shown):
    from nvlcore.progress import progress_enabled

    for key, value in (("NVL_PROGRESS", env), ("RANK", rank)):
        if value is None:
            monkeypatch.delenv(key, raising=False)
        else:
            monkeypatch.setenv(key, value)
    assert progress_enabled(enabled, Tty() if tty else io.StringIO()) is shown


def test_progress_iter_yields_everything_with_or_without_a_bar(monkeypatch, capsys):
    from nvlcore.progress import progress_iter

    monkeypatch.setenv("NVL_PROGRESS", "1")
    assert list(progress_iter(range(5), "counting")) == [0, 1, 2, 3, 4]
    assert "counting: 100%" in capsys.readouterr().err
    monkeypatch.setenv("NVL_PROGRESS", "0")
    assert list(progress_iter(iter(range(3)), "quiet")) == [0, 1, 2]
    assert "quiet" not in capsys.readouterr().err


def test_convert_import_and_toy_model_draw_a_bar_only_when_asked(tmp_path, monkeypatch):
    from nvlcore.cli import build_cli

    runner = CliRunner()
    monkeypatch.setenv("NVL_PROGRESS", "1")
    toy = runner.invoke(build_cli(), ["toy-model", str(tmp_path / "toy"), "--size", "tiny"])
    assert toy.exit_code == 0, toy.output
    assert "toy-model tiny:" in toy.output and "tensor" in toy.output
    res = runner.invoke(build_cli(), ["convert", "import", "--hf-model", str(tmp_path / "toy"),
                                      "--megatron-path", str(tmp_path / "a")])
    assert res.exit_code == 0, res.output
    assert "import: 100%" in res.output
    res = runner.invoke(build_cli(), ["convert", "import", "--hf-model", str(tmp_path / "toy"),
                                      "--megatron-path", str(tmp_path / "b"), "--no-progress"])
    assert res.exit_code == 0 and "import: 100%" not in res.output
    monkeypatch.delenv("NVL_PROGRESS")  # CliRunner's stderr is not a terminal: no bar
    res = runner.invoke(build_cli(), ["convert", "import", "--hf-model", str(tmp_path / "toy"),
                                      "--megatron-path", str(tmp_path / "c")])
    assert res.exit_code == 0 and "import: 100%" not in res.output and "%|" not in res.output
