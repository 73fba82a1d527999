"""The trainer on a tiny tensor-parallel model (tests/trainer_support/tiny_plugin.py): schedules, token
weighting, clipping, skipping, sampler, resume rules, SIGTERM, loggers, validation. The two-process layouts
and TP resharding are tested on the real toy model in test_finetune_cli.py."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

SUPPORT = Path(__file__).resolve().parent / "trainer_support"
sys.path.insert(0, str(SUPPORT))

import tiny_plugin  # noqa: E402
from run_tiny import DEFAULTS  # noqa: E402


def metrics(path: Path) -> dict[int, dict]:
    rows = {}
    for line in (path / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "loss" in row:
            rows[row["iteration"]] = row
    return rows


def train_here(hf: Path, *overrides: str, manager=None):
    """One in-process training run (a one-rank process group is created and destroyed)."""
    from nvlcore.config import load_config, resolve_config
    from nvlcore.training.finetune import run_finetune

    manager = manager or tiny_plugin.manager()
    cfg = load_config([], [*DEFAULTS, f"model.hf_model_path={hf}", f"checkpoint.pretrained_checkpoint={hf}",
                           *overrides],
                      plugins=manager)
    resolve_config(cfg)
    return run_finetune(cfg, manager=manager, device_type="cpu")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def hf(tmp_path_factory) -> Path:
    return tiny_plugin.write_tiny_hf_dir(tmp_path_factory.mktemp("tiny") / "hf")


@pytest.fixture(scope="module")
def baseline(hf, tmp_path_factory) -> Path:
    """30 iterations on one process, checkpoints every 10."""
    out = tmp_path_factory.mktemp("baseline") / "ckpt"
    train_here(hf, f"checkpoint.save={out}")
    return out


# -- schedules -----------------------------------------------------------------------------------
def test_lr_and_wd_schedules_match_megatron_core():
    import torch
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    from nvlcore.training.schedules import LRSchedule, WeightDecaySchedule

    styles = [(s, None) for s in ("cosine", "linear", "constant", "inverse-square-root")]
    styles += [("WSD", w) for w in ("exponential", "linear", "cosine", "minus_sqrt")]
    for style, wsd in styles:
        opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=1.0)
        ref = OptimizerParamScheduler(opt, init_lr=1e-6, max_lr=2e-5, min_lr=2e-6, lr_warmup_steps=5,
                                      lr_decay_steps=40, lr_decay_style=style, start_wd=0.01, end_wd=0.1,
                                      wd_incr_steps=40, wd_incr_style="cosine", wsd_decay_steps=12 if wsd else None,
                                      lr_wsd_decay_style=wsd)
        lr = LRSchedule(max_lr=2e-5, min_lr=2e-6, warmup_iters=5, warmup_init=1e-6, decay_iters=40, decay_style=style,
                        wsd_decay_iters=12 if wsd else None, wsd_decay_style=wsd or "exponential")
        wd = WeightDecaySchedule(start=0.01, end=0.1, incr_iters=40, style="cosine")
        for step in range(50):
            assert math.isclose(lr(step), opt.param_groups[0]["lr"], rel_tol=1e-12), (style, step)
            assert math.isclose(wd(step), opt.param_groups[0]["weight_decay"], rel_tol=1e-12), (style, step)
            ref.step(1)


def test_schedule_errors_name_the_field():
    from nvlcore.training.schedules import LRSchedule, WeightDecaySchedule

    with pytest.raises(ValueError, match="optimizer.min_lr"):
        LRSchedule(max_lr=1e-5, min_lr=1e-4)
    with pytest.raises(ValueError, match="start_weight_decay == end_weight_decay"):
        WeightDecaySchedule(start=0.1, end=0.2, style="constant")


# -- sampler -------------------------------------------------------------------------------------
def test_global_batches_do_not_depend_on_data_parallel_size_and_resume_by_position():
    from nvlcore.training.data import GlobalBatchSampler

    def global_batches(dp: int, start: int = 0, n: int = 7) -> list[list[int]]:
        its = [iter(GlobalBatchSampler(num_samples=10, global_batch_size=4, micro_batch_size=1, dp_rank=r, dp_size=dp,
                                       seed=3, consumed_samples=start)) for r in range(dp)]
        out = []
        for _ in range(n):
            batch = []
            for it in its:
                for _ in range(4 // dp):
                    batch += [i for _, i in next(it)]
            out.append(sorted(batch))
        return out

    one = global_batches(1)
    assert one == global_batches(2) == global_batches(4)
    assert global_batches(2, start=8, n=5) == one[2:]
    # each epoch (10 samples) is a permutation: positions 0..9 and 10..19 cover every index once
    s = GlobalBatchSampler(num_samples=10, global_batch_size=4, micro_batch_size=1, seed=3)
    assert sorted(s.index_at(p) for p in range(10)) == list(range(10))
    assert sorted(s.index_at(p) for p in range(10, 20)) == list(range(10))
    assert [s.index_at(p) for p in range(10)] != [s.index_at(p) for p in range(10, 20)]
    with pytest.raises(ValueError, match="train.global_batch_size=6"):
        GlobalBatchSampler(num_samples=10, global_batch_size=6, micro_batch_size=1, dp_size=4)


# -- one iteration ---------------------------------------------------------------------------------
@pytest.fixture
def one_rank():
    from nvlcore.parallel import destroy_parallel, init_parallel

    ctx = init_parallel(1, device_type="cpu")
    yield ctx
    destroy_parallel(ctx)


def _tiny_trainer(hf, ctx, *, clip=0.0, lr=1e-3):
    import torch

    from nvlcore.training import optim
    from nvlcore.training.schedules import LRSchedule, WeightDecaySchedule
    from nvlcore.training.trainer import LoopSettings, Trainer

    bridge = tiny_plugin.TinyBridge.from_hf_dir(hf)
    torch.manual_seed(0)
    model = bridge.build_model(dtype=torch.float32, device=ctx.device)
    bridge.load_hf_weights(model, hf)
    named = optim.trainable_named_parameters(model)
    opt = optim.build_optimizer(named, lr=lr)
    trainer = Trainer(model=model, ctx=ctx, optimizer=opt, named_params=named,
                      lr_schedule=LRSchedule(max_lr=lr, min_lr=0.0, decay_style="constant"),
                      wd_schedule=WeightDecaySchedule(start=0.0, end=0.0),
                      settings=LoopSettings(train_iters=1, global_batch_size=3, num_microbatches=3, clip_grad=clip))
    return bridge, model, trainer


def _batches(bridge, n=3):
    maker = tiny_plugin.TinyMaker(num_examples=n)
    proc = bridge.processor(seq_length=64)
    return [proc.collate([proc(maker[i])]) for i in range(n)]


def test_update_is_token_weighted_over_micro_batches_and_clipped_like_torch(hf, one_rank):
    """The accumulated gradient equals the gradient of mean loss over all supervised tokens of the global
    batch (computed here directly by concatenating the micro-batches), and clipping matches
    torch.nn.utils.clip_grad_norm_."""
    import torch

    bridge, model, trainer = _tiny_trainer(hf, one_rank, clip=0.0)
    micro = _batches(bridge)
    sup = [float(b["loss_mask"].sum()) for b in micro]
    assert len(set(sup)) > 1, "micro-batches should have different numbers of supervised tokens"

    # reference: one backward of sum(loss * mask) / total tokens over all micro-batches
    ref_model = bridge.build_model(dtype=torch.float32, device=one_rank.device)
    ref_model.load_state_dict(model.state_dict())
    total = sum(sup)
    loss = sum((ref_model(**b) * b["loss_mask"]).sum() for b in micro) / total
    loss.backward()
    ref_grads = {n: p.grad.clone() for n, p in ref_model.named_parameters()}
    ref_norm = float(torch.nn.utils.clip_grad_norm_(list(ref_model.parameters()), max_norm=0.5))

    # the trainer's step with clipping off: capture grads just before the optimizer update
    captured = {}
    orig_step = trainer.optimizer.step

    def capture_step():
        captured.update({n: p.grad.clone() for n, p in model.named_parameters()})
        return orig_step()

    trainer.optimizer.step = capture_step
    res = trainer.train_step(micro)
    assert not res.skipped
    assert math.isclose(res.loss, float(loss), rel_tol=1e-6)
    assert res.supervised_tokens == total
    for n, g in ref_grads.items():
        torch.testing.assert_close(captured[n], g, rtol=1e-5, atol=1e-7)
    assert math.isclose(res.grad_norm, ref_norm, rel_tol=1e-5)

    # clipping: the trainer with clip 0.5 scales the same gradients as torch does
    bridge2, model2, trainer2 = _tiny_trainer(hf, one_rank, clip=0.5)
    model2.load_state_dict(ref_model.state_dict())
    captured.clear()
    orig2 = trainer2.optimizer.step

    def capture2():
        captured.update({n: p.grad.clone() for n, p in model2.named_parameters()})
        return orig2()

    trainer2.optimizer.step = capture2
    trainer2.train_step(micro)
    for n, p in ref_model.named_parameters():
        torch.testing.assert_close(captured[n], p.grad, rtol=1e-5, atol=1e-7)


def test_non_finite_loss_skips_the_update_and_the_schedule(hf, one_rank):
    import torch

    bridge, model, trainer = _tiny_trainer(hf, one_rank)
    micro = _batches(bridge)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    handle = model.language_model.linear_fc2.register_forward_hook(
        lambda mod, inp, out: (out[0] * float("nan"), out[1]))
    res = trainer.train_step(micro)
    handle.remove()
    assert res.skipped and res.reason in ("non-finite loss", "non-finite gradient")
    assert trainer.state.optimizer_steps == 0
    assert not trainer.optimizer.state, "Adam state must not be created by a skipped step"
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
        assert p.grad is None
    res = trainer.train_step(micro)
    assert not res.skipped and trainer.state.optimizer_steps == 1


# -- whole runs ---------------------------------------------------------------------------------------
def test_loss_falls_checkpoints_appear_and_metrics_are_logged(baseline):
    rows = metrics(baseline)
    assert sorted(rows) == list(range(1, 31))
    first = sum(rows[i]["loss"] for i in range(1, 4)) / 3
    last = sum(rows[i]["loss"] for i in range(28, 31)) / 3
    assert last < first - 0.8, (first, last)
    for key in ("iteration", "loss", "lr", "grad_norm", "tokens_per_s", "tflops_per_gpu", "skipped_iterations",
                "eta_s"):
        assert key in rows[30], key
    # Megatron warm-up: update 0 uses lr_warmup_init
    assert rows[1]["lr"] == 0.0 and rows[6]["lr"] == pytest.approx(3e-3)
    assert rows[30]["tflops_per_gpu"] > 0
    for it in (10, 20, 30):
        d = baseline / f"iter_{it:07d}"
        assert (d / "run_config.yaml").is_file() and (d / "train_state.pt").is_file(), d
    assert (baseline / "latest_checkpointed_iteration.txt").read_text().strip() == "30"
    assert (baseline / "metrics.png").stat().st_size > 10_000  # redrawn next to metrics.jsonl at every save


def test_resume_from_iteration_20_is_bit_identical(baseline, hf, tmp_path):
    out = tmp_path / "resumed"
    state = train_here(hf, f"checkpoint.save={out}", f"checkpoint.load={baseline / 'iter_0000020'}")
    assert state.iteration == 30
    a, b = metrics(baseline), metrics(out)
    assert sorted(b) == list(range(21, 31))
    for i in range(21, 31):
        assert a[i]["loss"] == b[i]["loss"], (i, a[i]["loss"], b[i]["loss"])
        assert a[i]["grad_norm"] == b[i]["grad_norm"]


def test_save_dir_of_another_run_is_refused_and_the_same_run_resumes(baseline, hf, tmp_path):
    from nvlcore.training.checkpointing import ResumeRefused

    with pytest.raises(ResumeRefused, match=r"optimizer.lr .*checkpoint.load="):
        train_here(hf, f"checkpoint.save={baseline}", "optimizer.lr=1e-3")
    # the same command again: resumes the finished run and has nothing left to do
    state = train_here(hf, f"checkpoint.save={baseline}")
    assert state.iteration == 30 and state.consumed_samples == 120


def test_sigterm_saves_a_checkpoint_at_the_next_iteration_and_resume_continues(hf, tmp_path):
    out = tmp_path / "sig"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NVL_DEVICE": "cpu"}
    proc = subprocess.Popen([sys.executable, str(SUPPORT / "run_tiny.py"), str(hf), f"checkpoint.save={out}",
                             "train.train_iters=100000", "checkpoint.save_interval=100000"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            if (out / "metrics.jsonl").is_file() and len((out / "metrics.jsonl").read_text().splitlines()) >= 3:
                break
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    from nvlcore.interrupt import EXIT_STOPPED_EARLY

    assert proc.returncode == EXIT_STOPPED_EARLY == 75, output[-3000:]  # stopped early, checkpoint saved
    assert "received SIGTERM" in output and "Traceback" not in output
    assert "stopped early by SIGTERM" in output and "exit status 75" in output
    latest = int((out / "latest_checkpointed_iteration.txt").read_text())
    assert latest >= 3 and (out / f"iter_{latest:07d}").is_dir()
    state = train_here(hf, f"checkpoint.save={out}", "train.train_iters=100000", "checkpoint.save_interval=100000",
                       "train.exit_interval=2")
    assert state.iteration == latest + 2


def test_a_second_ctrl_c_stops_at_once_but_not_under_torchrun():
    from nvlcore.training.trainer import StopRequest

    # What uninstall must restore: Python's default handler, or SIG_IGN when the suite was started as a
    # background job of a non-interactive shell (which ignores SIGINT for it).
    before = signal.getsignal(signal.SIGINT)
    single = StopRequest(escalate=True)
    single.install()
    try:
        single._handle(signal.SIGINT, None)
        assert single.signum == signal.SIGINT
        single._handle(signal.SIGTERM, None)  # another signal: still a graceful stop
        with pytest.raises(KeyboardInterrupt):
            single._handle(signal.SIGINT, None)
    finally:
        single.uninstall()
    worker = StopRequest(escalate=False)
    worker.install()
    try:
        worker._handle(signal.SIGINT, None)
        worker._handle(signal.SIGINT, None)  # the terminal's and torchrun's copy of one Ctrl-C
        assert worker.signum == signal.SIGINT
    finally:
        worker.uninstall()
    assert signal.getsignal(signal.SIGINT) is before


def test_validation_runs_when_the_maker_has_the_split_and_is_skipped_with_a_note_otherwise(hf, tmp_path, capsys):
    out = tmp_path / "val"
    train_here(hf, f"checkpoint.save={out}", "train.train_iters=4", "scheduler.lr_warmup_iters=1",
               "validation.eval_iters=2",
               "validation.eval_interval=2")
    vals = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if "val_loss" in x]
    assert [v["iteration"] for v in vals] == [2, 4]
    assert all(math.isfinite(v["val_loss"]) and v["val_tokens"] > 0 for v in vals)
    train_here(hf, f"checkpoint.save={tmp_path / 'noval'}", "train.train_iters=2", "scheduler.lr_warmup_iters=1",
               "validation.eval_iters=2",
               "validation.eval_interval=1", "dataset.maker_name=tiny_train_only")
    assert "validation skipped: dataset maker 'tiny_train_only' has no validation split" in capsys.readouterr().out


def test_recompute_on_a_model_without_it_is_an_error_naming_the_key(hf, tmp_path):
    with pytest.raises(ValueError, match="model.recompute_granularity='full'"):
        train_here(hf, f"checkpoint.save={tmp_path / 'rc'}", "train.train_iters=1", "scheduler.lr_warmup_iters=0",
                   "model.recompute_granularity=full")


def test_launch_arguments_single_machine_and_rendezvous():
    from torch.distributed.run import get_args_parser

    from nvlcore.parallel import build_launch_args

    one = build_launch_args(nproc_per_node=2, module="nvlcore.cli.finetune", module_args=["a=1"])
    assert one[:5] == ["--nproc-per-node", "2", "--nnodes", "1",
                       "--standalone"] and one[-3:] == ["-m", "nvlcore.cli.finetune", "a=1"]
    multi = build_launch_args(nproc_per_node=8, module="m", module_args=[], nnodes="2", rdzv_endpoint="n0:29500",
                              rdzv_id="job")
    args = get_args_parser().parse_args(multi)  # torchrun accepts exactly what we pass through
    assert (args.nnodes, args.nproc_per_node, args.rdzv_endpoint, args.rdzv_backend, args.rdzv_id, args.standalone) == (
        "2", "8", "n0:29500", "c10d", "job", False)
    static = get_args_parser().parse_args(build_launch_args(nproc_per_node=4, module="m", module_args=[], nnodes="2",
                                                            node_rank=1, master_addr="n0", master_port=29400))
    assert (static.node_rank, static.master_addr, static.master_port) == (1, "n0", 29400)
    with pytest.raises(ValueError, match="--nproc-per-node"):
        build_launch_args(nproc_per_node=0, module="m", module_args=[])


def test_jsonl_logger_drops_lost_iterations_on_resume(tmp_path):
    from nvlcore.training.loggers import JsonlLogger

    lg = JsonlLogger(tmp_path / "m.jsonl")
    for i in range(1, 6):
        lg.log({"loss": float(i)}, step=i)
    lg.close()
    lg = JsonlLogger(tmp_path / "m.jsonl", resume_iteration=3)
    lg.log({"loss": 40.0}, step=4)
    lg.close()
    rows = [json.loads(x) for x in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert [(r["iteration"], r["loss"]) for r in rows] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]


def test_wandb_logger_works_offline(hf, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "wb"
    train_here(hf, f"checkpoint.save={out}", "train.train_iters=2", "scheduler.lr_warmup_iters=1",
               "logger.wandb_project=nvl-test",
               "logger.wandb_exp_name=tiny")
    runs = list((out / "wandb" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, list((out / "wandb").rglob("*"))[:20]
    assert any(runs[0].glob("*.wandb"))


def _kill_9_after(hf: Path, out: Path, rows: int, *overrides: str, between_saves: int | None = None) -> None:
    """Start a run, kill -9 it once metrics.jsonl has ``rows`` rows (and, with ``between_saves=K``, the
    last row is 1 or 2 iterations past a multiple of K, so that rows after the last checkpoint exist)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NVL_DEVICE": "cpu"}
    proc = subprocess.Popen([sys.executable, str(SUPPORT / "run_tiny.py"), str(hf), f"checkpoint.save={out}",
                             "train.train_iters=100000", *overrides],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            n = len((out / "metrics.jsonl").read_text().splitlines()) if (out / "metrics.jsonl").is_file() else 0
            if n >= rows and (between_saves is None or n % between_saves in (1, 2)):
                break
            assert proc.poll() is None
            time.sleep(0.02)
    finally:
        proc.kill()
        proc.wait()


def _iterations(out: Path) -> list[int]:
    return [json.loads(x)["iteration"] for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]


def test_metrics_jsonl_after_kill_9_and_restart_lists_each_iteration_once(hf, tmp_path):
    """Issue 17 item 6: killed before its first checkpoint, the rerun starts over and its rows replace the lost ones."""
    out = tmp_path / "fresh"
    _kill_9_after(hf, out, 3, "checkpoint.save_interval=100000")
    assert _iterations(out)[:3] == [1, 2, 3] and not (out / "latest_checkpointed_iteration.txt").exists()
    train_here(hf, f"checkpoint.save={out}", "train.train_iters=4", "scheduler.lr_warmup_iters=1")
    assert _iterations(out) == [1, 2, 3, 4]


def test_metrics_jsonl_after_kill_9_and_resume_lists_each_iteration_once(hf, tmp_path):
    out = tmp_path / "resumed"
    _kill_9_after(hf, out, 9, "checkpoint.save_interval=4", between_saves=4)
    latest = int((out / "latest_checkpointed_iteration.txt").read_text())
    logged = _iterations(out)
    assert latest >= 4 and max(logged) > latest  # rows past the checkpoint were logged, then lost
    train_here(hf, f"checkpoint.save={out}", "train.train_iters=100000", "checkpoint.save_interval=4",
               f"train.exit_interval={max(logged) + 2 - latest}")
    assert _iterations(out) == list(range(1, max(logged) + 3))


def test_a_disk_too_small_for_one_checkpoint_is_refused_before_training(hf, tmp_path, monkeypatch):
    """Issue 17 item 7: the size of a checkpoint is checked against the free space before iteration 1."""
    from nvlcore.checkpoint import save as save_mod

    monkeypatch.setattr(save_mod, "free_bytes", lambda path: 1000)
    out = tmp_path / "full"
    with pytest.raises(ValueError,
                       match=r"checkpoint.save=.*: one checkpoint needs about [0-9.]+ MB but .* has 0\.0 MB free"):
        train_here(hf, f"checkpoint.save={out}", "train.train_iters=2", "scheduler.lr_warmup_iters=1")
    assert not (out / "metrics.jsonl").exists() and not list(out.glob("iter_*"))


def test_a_disk_too_small_for_every_checkpoint_kept_is_a_warning(hf, tmp_path, monkeypatch, capsys):
    from nvlcore.checkpoint import save as save_mod
    from nvlcore.training import checkpointing as tck

    need = {}
    real = tck.estimate_checkpoint_bytes

    def estimate(*a, **k):
        need["bytes"] = real(*a, **k)
        return need["bytes"]

    monkeypatch.setattr(tck, "estimate_checkpoint_bytes", estimate)
    monkeypatch.setattr(save_mod, "free_bytes", lambda path: int(need.get("bytes", 10**6) * 2.5))
    out = tmp_path / "tight"
    train_here(hf, f"checkpoint.save={out}", "train.train_iters=4", "scheduler.lr_warmup_iters=1",
               "checkpoint.save_interval=1")
    text = capsys.readouterr().out
    assert "WARNING" in text and "keeps up to 4 checkpoints" in text and "checkpoint.save_interval=1" in text


def test_console_line_on_cpu_says_per_process_not_per_gpu(hf, tmp_path, capsys):
    train_here(hf, f"checkpoint.save={tmp_path / 'cpu'}", "train.train_iters=2", "scheduler.lr_warmup_iters=1")
    out = capsys.readouterr().out
    assert "TFLOP/s/process" in out and "TFLOP/s/GPU" not in out
