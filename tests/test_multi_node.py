"""Issue 25: one run over two launchers ("nodes") on this machine, through torchrun's c10d rendezvous.

Two `nvl finetune --nnodes 2 --nproc-per-node 2` launchers (gloo, rendezvous on localhost) train as one
job: the losses equal one `--nproc-per-node 4` launcher at the same TP=2 x DP=2, every checkpoint shard
has one writer, the run directory's lock is taken once for the whole job (both launchers share one
checkpoint.save here: a lock per node would refuse the second), and the checkpoint resumes on one node.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "NVL_DEVICE": "cpu", "TOKENIZERS_PARALLELISM": "false"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    from nvl_nemotron_vl.toy import write_toy_checkpoint

    return write_toy_checkpoint(tmp_path_factory.mktemp("toy") / "hf", "tiny", seed=0)


def finetune_args(toy: Path, save: Path, *extra: str) -> list[str]:
    """The toy run both layouts train: TP=2 x DP=2, 4 iterations, a checkpoint every 2."""
    return ["finetune", "--hf-model-path", str(toy), "--pretrained-checkpoint", str(toy),
            "dataset.maker_name=synthetic_shapes", "dataset.num_workers=0", "train.global_batch_size=4",
            "train.micro_batch_size=1", "model.seq_length=128", "dataset.seq_length=128",
            "model.tensor_model_parallel_size=2", "scheduler.lr_warmup_iters=1", "train.train_iters=4",
            "checkpoint.save_interval=2", f"checkpoint.save={save}", *extra]


def node_args(endpoint: str, job: str, *, nproc: int = 2) -> list[str]:
    """What each of the two launchers adds: the same line on every node (c10d assigns the node ranks).
    The Slurm and Kubernetes recipes must render to this line (with 8 GPUs a node): test_recipes_render_..."""
    return ["--nnodes", "2", "--nproc-per-node", str(nproc), "--rdzv-endpoint", endpoint, "--rdzv-id", job]


def start(args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "nvlcore", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env or ENV, stdin=subprocess.DEVNULL)


def finish(procs: list[subprocess.Popen], timeout: float = 400) -> list[tuple[int, str]]:
    deadline = time.time() + timeout
    out = []
    try:
        for p in procs:
            text, _ = p.communicate(timeout=max(1.0, deadline - time.time()))
            out.append((p.returncode, text))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return out


def run_ok(*procs: subprocess.Popen) -> list[str]:
    results = finish(list(procs))
    for code, text in results:
        assert code == 0, text[-4000:]
    return [text for _, text in results]


def losses(save: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (save / "metrics.jsonl").read_text().splitlines()]
    return {r["iteration"]: r["loss"] for r in rows if "loss" in r}


def assert_one_writer_per_shard(iter_dir: Path, world: int) -> None:
    """One DCP file and one rank-state file per global rank; no chunk stored twice, no byte range shared."""
    from torch.distributed.checkpoint import FileSystemReader

    assert sorted(p.name for p in iter_dir.glob("*.distcp")) == sorted(f"__{r}_0.distcp" for r in range(world))
    assert sorted(p.name for p in (iter_dir / "rank_states").iterdir()) == [f"rank_{r:05d}.pt" for r in range(world)]
    md = FileSystemReader(str(iter_dir)).read_metadata()
    ranges: dict[str, list[tuple[int, int]]] = {}
    for info in md.storage_data.values():
        ranges.setdefault(info.relative_path, []).append((info.offset, info.offset + info.length))
    assert len(ranges) == world  # every rank wrote its share (DP replicas are deduplicated, not skipped)
    for rel, spans in ranges.items():
        spans.sort()
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:], strict=False)), f"{rel}: two chunks share bytes"


@pytest.mark.slow
@pytest.mark.distributed
def test_two_launchers_train_as_one_and_resume_on_one_node(toy, tmp_path):
    from nvlcore.checkpoint import open_checkpoint

    one, two, resumed = tmp_path / "one", tmp_path / "two", tmp_path / "resumed"
    run_ok(start([*finetune_args(toy, one), "--nproc-per-node", "4"]))
    endpoint = f"127.0.0.1:{free_port()}"
    logs = run_ok(*(start([*finetune_args(toy, two), *node_args(endpoint, "job-two")]) for _ in range(2)))

    a, b = losses(one), losses(two)
    assert sorted(b) == [1, 2, 3, 4] and a == b  # bit for bit: the same ranks in the same TP x DP layout
    rows = [json.loads(x) for x in (two / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [1, 2, 3, 4]  # one writer of the metrics, not one per node
    assert all(abs(r["tokens_per_s"] - 4 * r["tokens_per_s_per_gpu"]) < 1e-6 * r["tokens_per_s"] for r in rows)
    lines = [line for text in logs for line in text.splitlines()]
    progress = [line for line in lines if " iter " in f" {line}"]
    assert len(progress) == 4 and all(x.startswith("[node 0] iter ") for x in progress)  # global rank 0 only
    host = socket.gethostname()
    assert sorted(x for x in lines if " runs global ranks " in x) == [  # one line from each node, saying which
        f"[node 0] nvl finetune: host {host} runs global ranks 0..1 of 4",
        f"[node 1] nvl finetune: host {host} runs global ranks 2..3 of 4"]
    unmarked = [x for x in lines if x.startswith("nvl finetune:") and " worker(s) on this machine" not in x]
    assert not unmarked  # every worker line says its node; only the launchers' own line (before the rendezvous) not
    for it in (2, 4):
        assert_one_writer_per_shard(two / f"iter_{it:07d}", 4)
    x, y = open_checkpoint(one / "iter_0000004"), open_checkpoint(two / "iter_0000004")
    want, got = x.load(), y.load()
    assert sorted(want) == sorted(got) and all(want[k].equal(got[k]) for k in want)

    # two nodes -> one: the same TP x DP on one launcher continues with the same losses
    run_ok(start([*finetune_args(toy, resumed, f"checkpoint.load={two / 'iter_0000002'}"), "--nproc-per-node", "4"]))
    c = losses(resumed)
    assert sorted(c) == [3, 4] and all(c[i] == a[i] for i in (3, 4))


# -- the run directory every node must see (issue 25: shared filesystem semantics) ---------------------
def test_a_marker_is_seen_in_the_same_directory_and_not_in_another(tmp_path):
    from nvlcore.checkpoint.shared import MARKER_PREFIX, describe_blind, remove_marker, sees_marker, write_marker

    shared, local = tmp_path / "shared", tmp_path / "local"
    shared.mkdir(), local.mkdir()
    nonce = write_marker(shared)
    assert sees_marker(shared, nonce, wait_s=0) and not sees_marker(local, nonce, wait_s=0)
    assert not sees_marker(shared, "0" * 32, wait_s=0) and not sees_marker(tmp_path / "absent", nonce, wait_s=0)
    remove_marker(shared, nonce)
    assert not any(p.name.startswith(MARKER_PREFIX) for p in shared.iterdir())
    line = describe_blind("/b", [(1, "h1", "/b"), (1, "h1", "/b")], main_root="/a", key="checkpoint.save")
    assert line.startswith("checkpoint.save=/a is not visible from node 1 (host h1) with checkpoint.save=/b: ")
    assert "\n" not in line


@pytest.mark.slow
@pytest.mark.distributed
def test_a_node_that_does_not_see_the_run_directory_is_refused_at_start_in_one_line(toy, tmp_path):
    """Each launcher is given its own directory, as a node-local path would be: refused before training."""
    endpoint = f"127.0.0.1:{free_port()}"
    dirs = [tmp_path / "node_a", tmp_path / "node_b"]
    t0 = time.time()
    results = finish([start([*finetune_args(toy, d), *node_args(endpoint, "job-blind")]) for d in dirs], timeout=300)
    for code, text in results:
        assert code == 1, text[-4000:]
        errors = [x for x in text.splitlines() if x.startswith("Error:")]
        assert errors and len(set(errors)) == 1, text[-4000:]  # the same line from every rank
        assert "is not visible from node 1 (host " in errors[0] and "checkpoint.save=" in errors[0]
        assert "Traceback" not in text and not any(x.startswith("iter ") for x in text.splitlines())
    assert time.time() - t0 < 240
    assert not any(d.exists() for d in dirs)  # rank 0's marker and lock removed, nothing left behind


# -- a node that never arrives, an endpoint nobody serves (issue 25: rendezvous failures) -------------------
@pytest.mark.parametrize("case", ["never arrives", "unreachable"])
def test_a_rendezvous_that_fails_ends_in_one_line_naming_the_endpoint(toy, tmp_path, case):
    """One launcher of a two-node job: the other node never comes (timed out), or this launcher is a client
    (``is_host=false``, as on every node but the endpoint's host) of an endpoint nobody serves."""
    endpoint = f"127.0.0.1:{free_port()}"
    conf = "join_timeout=3,read_timeout=3" + (",is_host=false" if case == "unreachable" else "")
    t0 = time.time()
    [(code, text)] = finish([start([*finetune_args(toy, tmp_path / "run"), *node_args(endpoint, "job-alone"),
                                    "--rdzv-conf", conf])], timeout=120)
    assert code == 1, text[-3000:]
    lines = [x for x in text.splitlines() if x.startswith("nvl: ")]
    assert len(lines) == 1 and f"the rendezvous at {endpoint} (--rdzv-id job-alone, --nnodes 2)" in lines[0], text
    if case == "never arrives":
        assert "timed out after 3 s: not every node joined" in lines[0]
    else:
        assert lines[0].startswith(f"nvl: cannot reach the rendezvous at {endpoint}")
    assert "Traceback" not in text and time.time() - t0 < 90
    assert not (tmp_path / "run").exists()  # no worker ever started


def test_rendezvous_settings_and_restarts_reach_torchrun():
    from torch.distributed.run import get_args_parser

    from nvlcore.parallel import build_launch_args

    args = get_args_parser().parse_args(build_launch_args(
        nproc_per_node=8, module="m", module_args=[], nnodes="2", rdzv_endpoint="n0:29500", rdzv_id="j",
        rdzv_conf="join_timeout=900", max_restarts=3))
    assert (args.rdzv_conf, args.max_restarts, args.rdzv_backend) == ("join_timeout=900", 3, "c10d")
    assert get_args_parser().parse_args(build_launch_args(nproc_per_node=1, module="m", module_args=[])).max_restarts \
        == 0  # torchrun's default unless asked
    with pytest.raises(ValueError, match="--max-restarts"):
        build_launch_args(nproc_per_node=1, module="m", module_args=[], max_restarts=-1)


# -- the Slurm and Kubernetes recipes (docs/examples/multi-node) render to the two-launcher test's line -----
RECIPES = Path(__file__).resolve().parents[1] / "docs" / "examples" / "multi-node"
LAUNCHER_OPTIONS = ("--nnodes", "--nproc-per-node", "--rdzv-endpoint", "--rdzv-id")


def render_sbatch(tmp_path: Path) -> tuple[list[str], dict[str, str]]:
    """Run the sbatch script under bash as Slurm would on the batch host: Slurm's variables set, `scontrol`
    answering the allocation's hosts, and an `srun` that records the command it would start on every node."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "scontrol").write_text('#!/bin/sh\n[ "$1 $2" = "show hostnames" ] && printf "gpu-a01\\ngpu-a02\\n"\n')
    (fake / "srun").write_text(f"#!{sys.executable}\nimport json, os, sys\n"
                               "open(os.environ['SRUN_RECORD'], 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n")
    for f in fake.iterdir():
        f.chmod(0o755)
    record = tmp_path / "srun.jsonl"
    env = {"PATH": f"{fake}:/usr/bin:/bin", "SRUN_RECORD": str(record), "SLURM_JOB_ID": "4242",
           "SLURM_JOB_NODELIST": "gpu-a[01-02]", "SLURM_JOB_NUM_NODES": "2", "SLURM_GPUS_ON_NODE": "8",
           "HF": "/shared/models/hf", "SAVE": "/shared/runs/full", "TMPDIR": str(tmp_path)}
    proc = subprocess.run(["bash", str(RECIPES / "finetune.sbatch")], env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    [argv] = [json.loads(x) for x in record.read_text().splitlines()]  # one srun: one task on each node
    srun_options = argv[: argv.index("nvl")]
    assert "--ntasks-per-node=1" in srun_options and "--kill-on-bad-exit=1" in srun_options
    return argv[argv.index("nvl"):], {"endpoint": "gpu-a01:29500", "job": "4242", "save": "/shared/runs/full",
                                      "hf": "/shared/models/hf"}


def render_jobset() -> tuple[list[str], dict[str, str]]:
    """Expand the container's command and args as Kubernetes does (``$(VAR)`` from the container's env);
    the endpoint must be the DNS name JobSet gives pod 0: <jobset>-<replicated job>-0-0.<jobset>."""
    import re

    import yaml

    doc = yaml.safe_load((RECIPES / "jobset.yaml").read_text())
    [rjob] = doc["spec"]["replicatedJobs"]
    job = rjob["template"]["spec"]
    pod = job["template"]["spec"]
    [c] = pod["containers"]
    env = {e["name"]: e["value"] for e in c["env"]}
    argv = [re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m.group(1), m.group(0)), a)
            for a in [*c["command"], *c["args"]]]
    assert job["parallelism"] == job["completions"] == int(env["NNODES"]) and job["completionMode"] == "Indexed"
    assert doc["spec"]["network"]["enableDNSHostnames"] is True
    assert c["resources"]["limits"]["nvidia.com/gpu"] == int(env["GPUS_PER_NODE"])
    name = doc["metadata"]["name"]
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    shared = [p for p, v in mounts.items() if "persistentVolumeClaim" in volumes[v]]
    local = [p for p, v in mounts.items() if "emptyDir" in volumes[v]]
    assert any(env["SAVE"].startswith(p + "/") for p in shared) and any(env["HF"].startswith(p + "/") for p in shared)
    assert any(env["HF_DATASETS_CACHE"].startswith(p + "/") for p in local)  # caches per pod, not shared
    return argv, {"endpoint": f"{name}-{rjob['name']}-0-0.{name}:29500", "job": env["RDZV_ID"], "save": env["SAVE"],
                  "hf": env["HF"]}


@pytest.mark.parametrize("recipe", ["slurm", "kubernetes"])
def test_recipes_render_the_two_launcher_line_with_tp4_on_2_by_8_gpus(toy, tmp_path, recipe):
    from nvlcore.cli import build_cli
    from nvlcore.config import load_config

    argv, want = render_sbatch(tmp_path) if recipe == "slurm" else render_jobset()
    assert argv[:2] == ["nvl", "finetune"]
    args = argv[2:]
    launcher = [t for i, t in enumerate(args) if t in LAUNCHER_OPTIONS or (i and args[i - 1] in LAUNCHER_OPTIONS)]
    # the launcher part is the two-launcher test's, option for option; only the sizes and names differ
    assert launcher == node_args(want["endpoint"], want["job"], nproc=8)
    rest = [t for t in args if t not in launcher]
    assert rest[:4] == ["--hf-model-path", want["hf"], "--pretrained-checkpoint", want["hf"]]
    overrides = rest[4:]
    assert f"checkpoint.save={want['save']}" in overrides and not any(t.startswith("--lora") for t in rest)
    cfg = load_config([], overrides)  # every key exists and loads
    tp, world = cfg.model.tensor_model_parallel_size, 2 * 8
    assert tp == 4 and world // tp == 4 and cfg.train.global_batch_size % (cfg.train.micro_batch_size * 4) == 0
    assert cfg.peft.method is None  # full fine-tuning
    cmd = build_cli().commands["finetune"]  # and the whole line parses as `nvl finetune`'s
    ctx = cmd.make_context("nvl", [str(toy) if a == want["hf"] else a for a in args], resilient_parsing=False)
    assert (ctx.params["nnodes"], ctx.params["nproc_per_node"], ctx.params["rdzv_endpoint"]) == (
        "2", 8, want["endpoint"])


# -- a node's worker killed mid-run: --max-restarts resumes the job from the last complete checkpoint -------
def _workers_of(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [int(w) for w in out if "nvlcore.cli.finetune" in Path(f"/proc/{w}/cmdline").read_text()]


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_killed_worker_restarts_the_job_from_its_last_checkpoint_with_the_same_final_loss(toy, tmp_path):
    import signal

    base, elastic = tmp_path / "base", tmp_path / "elastic"
    twelve = ("train.train_iters=12", "checkpoint.save_interval=4")
    run_ok(start([*finetune_args(toy, base, *twelve), "--nproc-per-node", "4"]))
    endpoint = f"127.0.0.1:{free_port()}"
    procs = [start([*finetune_args(toy, elastic, *twelve), *node_args(endpoint, "job-elastic"), "--max-restarts", "1"])
             for _ in range(2)]
    try:
        tracker, deadline = elastic / "latest_checkpointed_iteration.txt", time.time() + 300
        while not (tracker.is_file() and tracker.read_text().strip() == "4"):
            assert time.time() < deadline and all(p.poll() is None for p in procs), "no checkpoint at iteration 4"
            time.sleep(0.05)
        victim = _workers_of(procs[1].pid)[0]
        os.kill(victim, signal.SIGKILL)  # mid-run: iterations 5.. are under way, the next checkpoint is at 8
    finally:
        logs = run_ok(*procs)
    text = "\n".join(logs)
    assert "resuming " in text and "iter_0000004" in text and "resumed at iteration 4" in text
    a, b = losses(base), losses(elastic)
    assert sorted(b) == list(range(1, 13))  # each iteration once: the redone ones replaced the lost ones
    assert b == a  # exact: the data order and RNG states come back with the checkpoint


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_launcher_killed_with_9_takes_its_workers_and_the_other_node_ends_too(toy, tmp_path):
    import signal

    save = tmp_path / "run"
    endpoint = f"127.0.0.1:{free_port()}"
    long = ("train.train_iters=100000", "checkpoint.save_interval=100000")
    procs = [start([*finetune_args(toy, save, *long), *node_args(endpoint, "job-kill")]) for _ in range(2)]
    workers: list[int] = []
    try:
        deadline = time.time() + 300
        while not ((save / "metrics.jsonl").is_file() and len((save / "metrics.jsonl").read_text().splitlines()) >= 2):
            assert time.time() < deadline and all(p.poll() is None for p in procs), "no training rows"
            time.sleep(0.2)
        workers = [w for p in procs for w in _workers_of(p.pid)]
        assert len(workers) == 4, workers
        os.kill(procs[1].pid, signal.SIGKILL)
        procs[0].wait(timeout=120)  # node 0's workers lose their peers and fail; without restarts its launcher ends
        assert procs[0].returncode not in (0, None)
        deadline = time.time() + 30
        while time.time() < deadline and any(Path(f"/proc/{w}").exists() and _state(w) != "Z" for w in workers):
            time.sleep(0.2)
        assert not any(Path(f"/proc/{w}").exists() and _state(w) != "Z" for w in workers), "a worker outlived its job"
    finally:
        for w in workers:
            if Path(f"/proc/{w}").exists():
                os.kill(w, signal.SIGKILL)
        finish(procs, timeout=30)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "Z"
