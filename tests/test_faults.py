"""Faults (issue 17): signals and kill -9 during writes, leaving nothing behind; one line, no traceback."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

SUPPORT = Path(__file__).resolve().parent / "fault_support"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "NVL_DEVICE": "cpu", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    from nvl_nemotron_vl.toy import write_toy_checkpoint

    return write_toy_checkpoint(tmp_path_factory.mktemp("toy") / "hf", "tiny", seed=0)


def temps(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}.tmp-*"))


def start_slow(*args: str, delay: float = 0.05) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(SUPPORT / "slow_nvl.py"), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**ENV, "NVL_TEST_DELAY": str(delay)},
                            stdin=subprocess.DEVNULL)


def wait_for_temp(proc: subprocess.Popen, out: Path, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if any(p.is_dir() and any(p.rglob("*")) for p in temps(out)):
            time.sleep(0.5)  # well inside the write
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError(f"no temporary output for {out} within {timeout} s")


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_signal_during_convert_import_removes_the_temp_output_and_says_one_line(toy, tmp_path, sig, code):
    out = tmp_path / "ckpt"
    proc = start_slow("convert", "import", "--hf-model", str(toy), "--megatron-path", str(out), "--no-progress")
    try:
        wait_for_temp(proc, out)
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == code, stderr
    assert "Traceback" not in stderr and "Traceback" not in stdout
    assert stderr.strip().splitlines()[-1] == f"nvl: interrupted; nothing was written to {out}"
    assert len(stderr.strip().splitlines()) == 1, stderr
    assert not out.exists() and temps(out) == []


def test_kill_9_during_import_leaves_a_temp_that_the_next_run_removes_saying_so(toy, tmp_path):
    out = tmp_path / "ckpt"
    proc = start_slow("convert", "import", "--hf-model", str(toy), "--megatron-path", str(out), "--no-progress")
    try:
        wait_for_temp(proc, out)
        proc.kill()
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    left = temps(out)
    assert len(left) == 1 and f"-{proc.pid}-" in left[0].name
    done = subprocess.run([sys.executable, "-m", "nvlcore", "convert", "import", "--hf-model", str(toy),
                           "--megatron-path", str(out), "--no-progress"], capture_output=True, text=True, env=ENV,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"removed {left[0]}, left by process {proc.pid} that no longer runs" in done.stderr
    assert temps(out) == [] and (out / "iter_0000000").is_dir()


def test_stale_temps_of_live_processes_and_other_hosts_are_kept(tmp_path):
    from nvlcore.checkpoint.atomic import remove_stale_temps, temp_sibling

    out = tmp_path / "out"
    mine = temp_sibling(out)
    mine.mkdir()  # this process: alive
    other_host = tmp_path / f".out.tmp-elsewhere-{2**22 + 7}-0123abcd"
    other_host.mkdir()
    legacy = tmp_path / ".out.tmp-0123abcd"  # no owner recorded: never guessed at
    legacy.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = mine.with_name(mine.name.replace(f"-{os.getpid()}-", f"-{int(dead.stdout)}-"))
    stale.mkdir()
    assert remove_stale_temps(out, quiet=True) == [stale]
    assert mine.is_dir() and other_host.is_dir() and legacy.is_dir() and not stale.exists()


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def finetune_args(toy: Path, save: Path, *extra: str) -> list[str]:
    return ["finetune", "--hf-model-path", str(toy), "--pretrained-checkpoint", str(toy),
            "dataset.maker_name=synthetic_shapes", "dataset.num_workers=0", "train.global_batch_size=2",
            "train.micro_batch_size=1", "model.seq_length=128", "dataset.seq_length=128",
            "model.tensor_model_parallel_size=1", "scheduler.lr_warmup_iters=1", "train.train_iters=100000",
            "checkpoint.save_interval=100000", f"checkpoint.save={save}", *extra]


def wait_rows(proc: subprocess.Popen, save: Path, rows: int, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        m = save / "metrics.jsonl"
        if m.is_file() and len(m.read_text().splitlines()) >= rows:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    raise AssertionError(f"no {rows} metrics rows in {timeout} s")


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_kill_9_of_the_launcher_stops_its_workers_within_10_s_after_they_save(toy, tmp_path):
    save = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "nvlcore", *finetune_args(toy, save), "--nproc-per-node", "2"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV, stdin=subprocess.DEVNULL)
    workers: list[int] = []
    try:
        wait_rows(proc, save, 2)
        workers = _children(proc.pid)
        workers = [w for w in workers if "nvlcore.cli.finetune" in Path(f"/proc/{w}/cmdline").read_text()]
        assert len(workers) == 2, workers
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        deadline = time.time() + 10
        while time.time() < deadline and any(_alive(w) for w in workers):
            time.sleep(0.1)
        assert not any(_alive(w) for w in workers), "workers outlived their launcher by 10 s"
    finally:
        for w in workers:
            if _alive(w):
                os.kill(w, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
    # they stopped through SIGTERM: a checkpoint of the iteration they reached
    latest = int((save / "latest_checkpointed_iteration.txt").read_text())
    assert latest >= 2 and (save / f"iter_{latest:07d}").is_dir()


@pytest.mark.slow
def test_sigterm_of_a_single_process_finetune_exits_75_after_saving(toy, tmp_path):
    save = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "nvlcore", *finetune_args(toy, save)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV,
                            stdin=subprocess.DEVNULL)
    try:
        wait_rows(proc, save, 2)
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 75, output[-3000:]
    assert "Traceback" not in output
    latest = int((save / "latest_checkpointed_iteration.txt").read_text())
    assert latest >= 2


@pytest.mark.slow
@pytest.mark.distributed
def test_sigterm_of_the_launcher_exits_75_like_one_process(toy, tmp_path):
    save = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "nvlcore", *finetune_args(toy, save), "--nproc-per-node", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV,
                            stdin=subprocess.DEVNULL)
    try:
        wait_rows(proc, save, 2)
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 75, output[-3000:]
    assert (save / "latest_checkpointed_iteration.txt").is_file()


@pytest.mark.slow
def test_a_second_finetune_into_the_same_directory_is_refused_and_the_first_keeps_training(toy, tmp_path):
    """Issue 27 item 2 with two real `nvl finetune` runs: the second says who holds the directory in one line and
    touches nothing; the first saves and stops normally; a rerun after it resumes."""
    save = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "nvlcore", *finetune_args(toy, save)], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, env=ENV, stdin=subprocess.DEVNULL)
    try:
        wait_rows(first, save, 2)
        before = sorted(p.name for p in save.iterdir())
        second = subprocess.run([sys.executable, "-m", "nvlcore", *finetune_args(toy, save)], capture_output=True,
                                text=True, env=ENV, timeout=300, stdin=subprocess.DEVNULL)
        errors = [x for x in second.stderr.splitlines() if x.startswith("Error:")]
        assert second.returncode == 1 and len(errors) == 1, second.stderr[-3000:]
        assert f"is in use by another run: process {first.pid} on {socket.gethostname()}" in errors[0]
        assert "Traceback" not in second.stderr and "RunDirectoryLocked" not in second.stderr
        assert sorted(p.name for p in save.iterdir()) == before  # nothing removed or added
        time.sleep(1)
        assert first.poll() is None  # still training
        first.send_signal(signal.SIGTERM)
        output, _ = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 75, output[-3000:]
    latest = int((save / "latest_checkpointed_iteration.txt").read_text())
    rows = [json.loads(x)["iteration"] for x in (save / "metrics.jsonl").read_text().splitlines()]
    assert rows == sorted(set(rows)) and rows[-1] >= latest


# -- a full disk (issue 17 item 7) ---------------------------------------------------------------------
def _assert_previous_intact(root: Path) -> None:
    from nvlcore.checkpoint import open_checkpoint

    assert (root / "latest_checkpointed_iteration.txt").read_text().strip() == "1"
    assert sorted(p.name for p in root.iterdir() if p.name.startswith((".iter", "iter"))) == ["iter_0000001"]
    assert open_checkpoint(root).load(["w"])["w"].shape == (3, 4)


@pytest.mark.parametrize("where", ["tensors", "small states"])
def test_a_save_onto_a_full_disk_says_so_in_one_line_and_keeps_the_previous_checkpoint(tmp_path, where):
    sys.path.insert(0, str(SUPPORT))
    try:
        from enospc_worker import full_disk_save
    finally:
        sys.path.remove(str(SUPPORT))
    import torch.distributed.checkpoint.filesystem as fs

    from nvlcore.checkpoint import save as save_mod

    before = (fs.FileSystemWriter.write_data, save_mod.atomic_torch_save)
    try:
        kind, msg = full_disk_save(0, 1, str(tmp_path / "ck"), 0, where)
    finally:
        fs.FileSystemWriter.write_data, save_mod.atomic_torch_save = before
    assert kind == "NoSpaceError", msg
    assert msg.startswith(f"no space left on {save_mod.mount_point(tmp_path)} for iter_0000002: need 0.0 MB, ")
    assert " free (checkpoint root" in msg and "\n" not in msg
    _assert_previous_intact(tmp_path / "ck")


@pytest.mark.slow
@pytest.mark.distributed
def test_a_full_disk_on_one_rank_gives_the_same_line_on_every_rank(tmp_path):
    from nvl_dist_testing import run_distributed

    sys.path.insert(0, str(SUPPORT))
    try:
        from enospc_worker import full_disk_save

        results = run_distributed(full_disk_save, 2, str(tmp_path / "ck"), 1, "tensors")
    finally:
        sys.path.remove(str(SUPPORT))
    assert results[0] == results[1], results
    assert results[0][0] == "NoSpaceError" and "for iter_0000002: need" in results[0][1]
    _assert_previous_intact(tmp_path / "ck")


# -- a checkpoint save cut short (Ctrl-C / SIGTERM) and a save killed with -9 ------------------------------
def test_a_signal_during_a_checkpoint_save_removes_its_temp_dir_and_keeps_the_previous(tmp_path, monkeypatch):
    import torch
    import torch.distributed.checkpoint.filesystem as fs

    from nvlcore import interrupt
    from nvlcore.checkpoint import save_checkpoint

    root = tmp_path / "ck"
    state = {"w": torch.arange(12.0).reshape(3, 4)}
    save_checkpoint(root, 1, model_state=state, train_state={"iteration": 1})
    previous = interrupt.install()
    try:
        def cut(*a, **k):
            raise interrupt.Interrupted(signal.SIGTERM)  # what the handler raises when SIGTERM arrives mid-write

        monkeypatch.setattr(fs.FileSystemWriter, "write_data", cut)
        with pytest.raises(interrupt.Interrupted):
            save_checkpoint(root, 2, model_state=state, train_state={"iteration": 2})
        assert interrupt.exit_status(interrupt.Interrupted(signal.SIGTERM)) == 143
        assert interrupt.message() == f"nvl: interrupted; nothing was written to {root / 'iter_0000002'}"
    finally:
        interrupt.restore(previous)
    assert sorted(p.name for p in root.iterdir() if p.name.startswith((".iter", "iter"))) == ["iter_0000001"]
    assert (root / "latest_checkpointed_iteration.txt").read_text().strip() == "1"


def test_a_save_killed_with_9_leaves_a_temp_dir_the_next_save_removes_saying_so(tmp_path, capfd):
    """Only temp dirs whose owner is dead are leftovers; a live writer's save and an ownerless one are kept
    (issue 27: a second run deleted the first run's live temp dir), the latter unless this run holds the lock."""
    import torch

    from nvlcore.checkpoint import RunLock, save_checkpoint
    from nvlcore.checkpoint.atomic import temp_sibling

    root = tmp_path / "ck"
    state = {"w": torch.ones(3)}
    save_checkpoint(root, 1, model_state=state, train_state={"iteration": 1})
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        mine = temp_sibling(root / "iter_0000002")
        left = mine.with_name(mine.name.replace(f"-{os.getpid()}-", f"-{int(dead.stdout)}-"))
        busy = mine.with_name(mine.name.replace(f"-{os.getpid()}-", f"-{live.pid}-"))
        legacy = root / ".iter_0000002.tmp-save"
        for d in (left, busy, legacy):
            d.mkdir()
            (d / "__0_0.distcp").write_bytes(b"half")
        save_checkpoint(root, 2, model_state=state, train_state={"iteration": 2})
        assert not left.exists() and busy.is_dir() and legacy.is_dir() and (root / "iter_0000002").is_dir()
        err = capfd.readouterr().err
        assert f"nvl: removed {left}, left by process {dead.stdout.strip()} that no longer runs" in err
        assert str(busy) not in err and str(legacy) not in err
        with RunLock(root):
            save_checkpoint(root, 3, model_state=state, train_state={"iteration": 3})
        assert not legacy.exists() and busy.is_dir()
        assert f"nvl: removed {legacy}, left by an interrupted checkpoint save" in capfd.readouterr().err
    finally:
        live.kill()
        live.wait()


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 512 KiB tmpfs (root only; skipped where mounting is not allowed)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mnt)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_a_save_onto_a_real_full_filesystem(small_tmpfs):
    import torch

    from nvlcore.checkpoint import save_checkpoint
    from nvlcore.checkpoint.save import NoSpaceError

    root = small_tmpfs / "ck"
    save_checkpoint(root, 1, model_state={"w": torch.arange(12.0).reshape(3, 4)}, train_state={"iteration": 1})
    big = {"w": torch.arange(12.0).reshape(3, 4), "big": torch.zeros(300_000)}  # 1.2 MB > 512 KiB
    with pytest.raises(NoSpaceError) as info:
        save_checkpoint(root, 2, model_state=big, train_state={"iteration": 2})
    msg = str(info.value)
    assert msg.startswith(f"no space left on {small_tmpfs} for iter_0000002: need 1.2 MB, "), msg
    assert " MB free (checkpoint root" in msg
    _assert_previous_intact(root)
