"""Issue 17 items 8-9: every command that reads a model or a checkpoint, over corrupted inputs: exit status 1,
one error line naming the damaged file, no traceback, no output directory left behind."""

from __future__ import annotations

import os
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    from nvl_nemotron_vl.toy import write_toy_checkpoint

    return write_toy_checkpoint(tmp_path_factory.mktemp("toy") / "hf", "tiny", seed=0)


@pytest.fixture(scope="module")
def ckpt(toy, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ck") / "base"
    res = nvl("convert", "import", "--hf-model", str(toy), "--megatron-path", str(out), "--no-progress")
    assert res.exit_code == 0, res.output
    return out


pytestmark = pytest.mark.usefixtures("one_thread")


def nvl(*args: str):
    from nvlcore.cli import build_cli

    return CliRunner().invoke(build_cli(), list(args), catch_exceptions=True)


# -- corruptions: each returns the damaged file ---------------------------------------------------------
def _truncate(f: Path, size: int) -> Path:
    with open(f, "r+b") as fh:
        fh.truncate(size)
    return f


def _header_len(f: Path) -> int:
    return struct.unpack("<Q", f.read_bytes()[:8])[0]


def _flip(f: Path, start: int, count: int) -> Path:
    data = bytearray(f.read_bytes())
    for i in range(start, start + count):
        data[i] ^= 0xA5
    f.write_bytes(bytes(data))
    return f


HF_CORRUPTIONS: dict[str, Callable[[Path], Path]] = {
    "zero-bytes": lambda d: _truncate(d / "model.safetensors", 0),
    "truncated-at-4": lambda d: _truncate(d / "model.safetensors", 4),
    "truncated-in-header": lambda d: _truncate(d / "model.safetensors", 8 + _header_len(d / "model.safetensors") // 2),
    "truncated-in-data": lambda d: _truncate(d / "model.safetensors", (d / "model.safetensors").stat().st_size // 2),
    "truncated-by-1": lambda d: _truncate(d / "model.safetensors", (d / "model.safetensors").stat().st_size - 1),
    "header-bytes-flipped": lambda d: _flip(d / "model.safetensors", 40, 24),
    "header-length-flipped": lambda d: _flip(d / "model.safetensors", 3, 2),
}


def _first(d: Path, pattern: str) -> Path:
    return sorted((d / "iter_0000000").glob(pattern))[0]


CKPT_CORRUPTIONS: dict[str, Callable[[Path], Path]] = {
    "shard-deleted": lambda d: (_first(d, "*.distcp").unlink(), _first_missing(d))[1],
    "shard-truncated": lambda d: _truncate(_first(d, "*.distcp"), _first(d, "*.distcp").stat().st_size // 2),
    "shard-zero-bytes": lambda d: _truncate(_first(d, "*.distcp"), 0),
    "metadata-truncated": lambda d: _truncate(d / "iter_0000000" / ".metadata", 10),
    "tracker-garbage": lambda d: (d / "latest_train_state.pt").write_bytes(os.urandom(300))
    and d / "latest_train_state.pt",
}
_deleted: dict[Path, Path] = {}


def _first_missing(d: Path) -> Path:
    return _deleted[d]


def corrupt_copy(src: Path, dst: Path, how: Callable[[Path], Path], kind: str) -> Path:
    shutil.copytree(src, dst)
    if kind == "shard-deleted":
        _deleted[dst] = _first(dst, "*.distcp")
    return how(dst)


def check_fails_cleanly(res, damaged: Path, out: Path | None) -> None:
    text = res.output
    assert res.exit_code == 1, (res.exit_code, text, res.exception)
    assert isinstance(res.exception, SystemExit), f"uncaught {type(res.exception).__name__}: {res.exception}"
    assert "Traceback" not in text, text
    errors = [line for line in text.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, text
    assert str(damaged) in errors[0] or damaged.name in errors[0], errors[0]
    if out is not None:
        assert not out.exists(), f"{out} left behind"
        assert not list(out.parent.glob(f".{out.name}.tmp-*")), "temporary output left behind"


def finetune_args(toy: Path, pretrained: Path, save: Path) -> list[str]:
    return ["finetune", "--hf-model-path", str(toy), "--pretrained-checkpoint", str(pretrained),
            "dataset.maker_name=synthetic_shapes", "dataset.num_workers=0", "train.global_batch_size=2",
            "train.micro_batch_size=1", "model.seq_length=128", "dataset.seq_length=128",
            "model.tensor_model_parallel_size=1", "scheduler.lr_warmup_iters=1", "train.train_iters=2",
            f"checkpoint.save={save}"]


@pytest.mark.parametrize("kind", list(HF_CORRUPTIONS))
def test_corrupt_safetensors(toy, tmp_path, kind):
    bad = tmp_path / "bad"
    damaged = corrupt_copy(toy, bad, HF_CORRUPTIONS[kind], kind)
    out = tmp_path / "imported"
    check_fails_cleanly(nvl("convert", "import", "--hf-model", str(bad), "--megatron-path", str(out), "--no-progress"),
                        damaged, out)
    save = tmp_path / "run"
    check_fails_cleanly(nvl(*finetune_args(toy, bad, save)), damaged, save)
    check_fails_cleanly(nvl("generate", "--hf-model-path", str(bad), "--prompt", "hi", "--max-new-tokens", "2",
                            "--device", "cpu"), damaged, None)


@pytest.mark.parametrize("kind", list(CKPT_CORRUPTIONS))
def test_corrupt_checkpoint(toy, ckpt, tmp_path, kind):
    bad = tmp_path / "bad"
    damaged = corrupt_copy(ckpt, bad, CKPT_CORRUPTIONS[kind], kind)
    out = tmp_path / "exported"
    check_fails_cleanly(nvl("convert", "export", "--hf-model", str(toy), "--megatron-path", str(bad), "--hf-path",
                            str(out), "--no-progress"), damaged, out)
    save = tmp_path / "run"
    check_fails_cleanly(nvl(*finetune_args(toy, bad, save)), damaged, save)
    check_fails_cleanly(nvl("generate", "--hf-model-path", str(toy), "--megatron-model-path", str(bad), "--prompt",
                            "hi", "--max-new-tokens", "2", "--device", "cpu"), damaged, None)


@pytest.mark.parametrize("kind", ["truncated-png", "zero-byte-jpg", "text-as-video"])
def test_generate_with_a_damaged_image_or_a_non_video(toy, tmp_path, kind):
    if kind == "truncated-png":
        from PIL import Image

        f = tmp_path / "a.png"
        Image.new("RGB", (64, 64), (200, 30, 30)).save(f)
        _truncate(f, f.stat().st_size // 2)
        args = ["--image-path", str(f)]
    elif kind == "zero-byte-jpg":
        f = tmp_path / "a.jpg"
        f.write_bytes(b"")
        args = ["--image-path", str(f)]
    else:
        f = tmp_path / "clip.mp4"
        f.write_text("not a video\n")
        args = ["--video-path", str(f)]
    res = nvl("generate", "--hf-model-path", str(toy), "--prompt", "hi", "--max-new-tokens", "2", "--device", "cpu",
              *args)
    check_fails_cleanly(res, f, None)


# -- item 10: contradictions are reported before anything heavy runs -----------------------------------
@pytest.mark.parametrize("bad,expect", [
    (['dataset.maker_name=make_raven_dataset', 'dataset.maker_kwargs={"path": "/nonexistent/raven"}'],
     "dataset.maker_kwargs.path: /nonexistent/raven does not exist"),
    (["train.train_iters=3", "scheduler.lr_warmup_iters=5"], "scheduler.lr_warmup_iters (5)"),
    (["train.global_batch_size=3", "train.micro_batch_size=1", "--nproc-per-node", "2"],
     "data-parallel size (2 = 2 processes / TP 1)"),
], ids=["missing-dataset-path", "warmup-longer-than-training", "batch-sizes-over-processes"])
def test_config_contradictions_fail_before_the_model_is_built(toy, tmp_path, monkeypatch, bad, expect):
    from nvlcore.training import finetune

    def never(*a, **k):
        raise AssertionError("the run started")

    monkeypatch.setattr(finetune, "run_finetune", never)
    args = finetune_args(toy, toy, tmp_path / "run")
    args = [a for a in args if not a.startswith(("scheduler.lr_warmup_iters", "train.train_iters",
                                                 "dataset.maker_name"))]
    res = nvl(*args, "train.train_iters=10", "scheduler.lr_warmup_iters=1", "dataset.maker_name=synthetic_shapes", *bad)
    assert res.exit_code == 2, res.output
    assert expect in res.output and "Traceback" not in res.output
    assert not (tmp_path / "run").exists()
