"""Config keys that used to be accepted and ignored, now implemented (issue 12, section 2): the distributed
optimizer, SGD, NaN checks, TensorBoard, the test split, tokenizer assets, DCP write spreading, async
saves, the gradient bucket size, GC around validation, persistent workers and the process-group backend.
On the tiny tensor-parallel model of tests/trainer_support (CPU, gloo)."""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import pytest

SUPPORT = Path(__file__).resolve().parent / "trainer_support"
sys.path.insert(0, str(SUPPORT))

import tiny_plugin  # noqa: E402
from run_tiny import DEFAULTS  # noqa: E402


def metrics(path: Path) -> dict[int, dict]:
    rows: dict[int, dict] = {}
    for line in (path / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        rows.setdefault(row["iteration"], {}).update(row)
    return rows


def train_here(hf: Path, *overrides: str, print_fn=print):
    from nvlcore.config import load_config, resolve_config
    from nvlcore.training.finetune import run_finetune

    manager = tiny_plugin.manager()
    cfg = load_config([], [*DEFAULTS, f"model.hf_model_path={hf}", f"checkpoint.pretrained_checkpoint={hf}",
                           *overrides],
                      plugins=manager)
    resolve_config(cfg)
    return run_finetune(cfg, manager=manager, device_type="cpu", print_fn=print_fn)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def hf(tmp_path_factory) -> Path:
    return tiny_plugin.write_tiny_hf_dir(tmp_path_factory.mktemp("tiny") / "hf")


SHORT = ["train.train_iters=8", "checkpoint.save_interval=4", "scheduler.lr_warmup_iters=1"]


# -- ddp.use_distributed_optimizer ----------------------------------------------------------------
@pytest.mark.distributed
def test_distributed_optimizer_shards_the_state_matches_unsharded_and_resumes(hf, tmp_path):
    """Two gloo ranks, data parallel 2: the ZeroRedundancyOptimizer run keeps about half of the optimizer
    state on each rank, gives the losses of the unsharded run, writes the same checkpoint (every
    rank writes the state it owns) and resumes to the uninterrupted losses."""
    import torch
    from dist_worker import train

    from nvl_dist_testing import run_distributed
    from nvlcore.checkpoint import open_checkpoint

    plain, sharded, resumed = tmp_path / "plain", tmp_path / "sharded", tmp_path / "resumed"
    lines_plain = run_distributed(train, 2, str(hf), [*SHORT, "ddp.use_distributed_optimizer=false",
                                                      f"checkpoint.save={plain}"])[0]
    lines = run_distributed(train, 2, str(hf), [*SHORT, f"checkpoint.save={sharded}"])[0]

    def held(ls: list[str]) -> list[int]:
        line = next(x for x in ls if "optimizer state held per data-parallel rank" in x)
        return json.loads(re.search(r"(\[.*\])", line).group(1))

    full, per_rank = held(lines_plain), held(lines)
    print(f"optimizer state bytes per rank: unsharded {full}, sharded {per_rank}")
    assert full[0] == full[1] > 0
    assert sum(per_rank) == full[0] and all(0 < b < 0.75 * full[0] for b in per_rank), (full, per_rank)
    assert any("state sharded over 2 data-parallel ranks" in x for x in lines), lines
    assert any("state replicated on each of 2" in x for x in lines_plain), lines_plain

    a, b = metrics(plain), metrics(sharded)
    assert sorted(b) == list(range(1, 9))
    for i in a:
        assert b[i]["loss"] == pytest.approx(a[i]["loss"], rel=1e-5, abs=1e-6), (i, a[i]["loss"], b[i]["loss"])

    # the same checkpoint content, whichever optimizer wrote it
    ca, cb = open_checkpoint(plain / "iter_0000004"), open_checkpoint(sharded / "iter_0000004")
    assert set(cb.keys("optimizer")) == set(ca.keys("optimizer")) and cb.keys("optimizer")
    oa, ob = ca.load(state="optimizer"), cb.load(state="optimizer")
    for k in oa:
        torch.testing.assert_close(ob[k], oa[k], rtol=1e-4, atol=1e-7)
    assert cb.extra_state()["adam_step"] == ca.extra_state()["adam_step"] == 4

    run_distributed(train, 2, str(hf), [*SHORT, f"checkpoint.save={resumed}",
                                        f"checkpoint.load={sharded / 'iter_0000004'}"])
    c = metrics(resumed)
    assert sorted(i for i in c if "loss" in c[i]) == [5, 6, 7, 8]
    for i in (5, 6, 7, 8):
        assert c[i]["loss"] == pytest.approx(b[i]["loss"], rel=1e-6, abs=1e-7), (i, b[i]["loss"], c[i]["loss"])


@pytest.mark.slow
@pytest.mark.distributed
def test_distributed_optimizer_at_tp2_dp2_matches_one_process_and_its_checkpoint_resumes_there(hf, tmp_path):
    """Four gloo ranks (TP 2 x DP 2, state sharded over each DP group): the losses of one process; its
    checkpoint (TP-sharded and DP-sharded optimizer state) resumes on one process, unsharded."""
    from dist_worker import train

    from nvl_dist_testing import run_distributed

    one, four, back = tmp_path / "one", tmp_path / "four", tmp_path / "back"
    train_here(hf, *SHORT, f"checkpoint.save={one}")
    lines = run_distributed(train, 4, str(hf), [*SHORT, "model.tensor_model_parallel_size=2",
                                                f"checkpoint.save={four}"])[0]
    assert any("state sharded over 2 data-parallel ranks" in x for x in lines), lines
    a, b = metrics(one), metrics(four)
    for i in range(1, 9):
        assert b[i]["loss"] == pytest.approx(a[i]["loss"], rel=1e-4), (i, a[i]["loss"], b[i]["loss"])
    train_here(hf, *SHORT, f"checkpoint.save={back}", f"checkpoint.load={four / 'iter_0000004'}")
    c = metrics(back)
    for i in (5, 6, 7, 8):
        assert c[i]["loss"] == pytest.approx(a[i]["loss"], rel=1e-4), (i, a[i]["loss"], c[i]["loss"])


# -- rng.data_parallel_random_init --------------------------------------------------------------------------
@pytest.mark.distributed
def test_data_parallel_random_init_seeds_each_rank_differently(hf, tmp_path):
    import torch
    from dist_worker import train

    from nvl_dist_testing import run_distributed

    states = {}
    for flag in (False, True):
        out = tmp_path / f"dpri_{flag}"
        run_distributed(train, 2, str(hf), ["train.train_iters=1", "scheduler.lr_warmup_iters=0",
                                            f"rng.data_parallel_random_init={flag}", f"checkpoint.save={out}"])
        ranks = [torch.load(out / "iter_0000001" / "rank_states" / f"rank_{r:05d}.pt", weights_only=True)
                 for r in (0, 1)]
        states[flag] = [r["rng"]["torch"] for r in ranks]
    assert torch.equal(states[False][0], states[False][1])  # the same seed everywhere by default
    assert not torch.equal(states[True][0], states[True][1])  # seed + 10 x DP rank
    assert torch.equal(states[True][0], states[False][0])  # DP rank 0 keeps rng.seed


# -- checkpoint.fully_parallel_save -----------------------------------------------------------------
@pytest.mark.distributed
def test_fully_parallel_save_spreads_replicated_writes(tmp_path):
    from dist_worker import save_replicated

    from nvl_dist_testing import run_distributed

    sizes = {}
    for spread in (True, False):
        out = tmp_path / f"spread_{spread}"
        run_distributed(save_replicated, 2, str(out), spread)
        files = sorted((out / "iter_0000001").glob("*.distcp"))
        sizes[spread] = {f.name: f.stat().st_size for f in files}
    print(sizes)
    spread, lowest = sizes[True], sizes[False]
    assert len(spread) == 2 and min(spread.values()) > 30_000  # both ranks wrote one of the 40 kB tensors
    assert sum(v > 30_000 for v in lowest.values()) == 1  # rank 0 wrote both


# -- checkpoint.async_save ------------------------------------------------------------------------------
def test_async_save_stages_a_copy_and_publishes_only_on_wait(tmp_path):
    import torch

    from nvlcore.checkpoint import PendingSave, SaveOptions, open_checkpoint, save_checkpoint

    w = torch.arange(12, dtype=torch.float32)
    pending = save_checkpoint(tmp_path, 3, model_state={"w": w}, train_state={"iteration": 3},
                              options=SaveOptions(async_write=True))
    assert isinstance(pending, PendingSave)
    w.add_(100.0)  # training goes on and changes the weights in place
    assert not (tmp_path / "iter_0000003").exists() and not (tmp_path / "latest_train_state.pt").exists()
    assert pending.wait() == tmp_path / "iter_0000003"
    assert (tmp_path / "latest_checkpointed_iteration.txt").read_text().strip() == "3"
    torch.testing.assert_close(open_checkpoint(tmp_path).load()["w"], torch.arange(12, dtype=torch.float32))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".iter_")]  # no temp dir left


def test_async_save_run_writes_the_checkpoints_of_a_sync_run(hf, tmp_path):
    import torch

    from nvlcore.checkpoint import open_checkpoint

    sync, asyn, resumed = tmp_path / "sync", tmp_path / "async", tmp_path / "resumed"
    train_here(hf, *SHORT, f"checkpoint.save={sync}")
    lines: list[str] = []
    train_here(hf, *SHORT, f"checkpoint.save={asyn}", "checkpoint.async_save=true", print_fn=lines.append)
    assert any("writing checkpoint iter_0000004 in the background" in x for x in lines), lines
    assert any(x.endswith("saved checkpoint " + str(asyn / "iter_0000008")) for x in lines), lines
    for it in ("iter_0000004", "iter_0000008"):
        a, b = open_checkpoint(sync / it), open_checkpoint(asyn / it)
        for state in (None, "optimizer"):
            ta, tb = a.load(state=state), b.load(state=state)
            assert ta.keys() == tb.keys() and ta
            for k in ta:
                assert torch.equal(ta[k], tb[k]), (it, k)
    train_here(hf, *SHORT, f"checkpoint.save={resumed}", f"checkpoint.load={asyn / 'iter_0000004'}")
    m, r = metrics(sync), metrics(resumed)
    assert [r[i]["loss"] for i in (5, 6, 7, 8)] == [m[i]["loss"] for i in (5, 6, 7, 8)]


@pytest.mark.distributed
def test_async_save_with_two_ranks(hf, tmp_path):
    """Two gloo ranks: the background writes use a process group of their own while training goes on."""
    from dist_worker import train

    from nvl_dist_testing import run_distributed

    one, two = tmp_path / "one", tmp_path / "two"
    train_here(hf, *SHORT, f"checkpoint.save={one}")
    lines = run_distributed(train, 2, str(hf), [*SHORT, f"checkpoint.save={two}", "checkpoint.async_save=true"])[0]
    assert any("in the background" in x for x in lines), lines
    assert (two / "latest_checkpointed_iteration.txt").read_text().strip() == "8"
    assert (two / "iter_0000004").is_dir() and (two / "iter_0000008").is_dir()
    a, b = metrics(one), metrics(two)
    for i in range(1, 9):
        assert b[i]["loss"] == pytest.approx(a[i]["loss"], rel=1e-4), (i, a[i]["loss"], b[i]["loss"])
    resumed = tmp_path / "resumed"
    train_here(hf, *SHORT, f"checkpoint.save={resumed}", f"checkpoint.load={two / 'iter_0000004'}")
    c = metrics(resumed)
    for i in (5, 6, 7, 8):
        assert c[i]["loss"] == pytest.approx(a[i]["loss"], rel=1e-4), (i, a[i]["loss"], c[i]["loss"])


# -- scheduler.override_opt_param_scheduler, scheduler.use_checkpoint_opt_param_scheduler ---------------------
def test_resume_schedule_from_the_config_or_the_checkpoint_or_checked_equal(hf, tmp_path):
    from nvlcore.config import ConfigError, load_config

    first = tmp_path / "first"
    train_here(hf, *SHORT, f"checkpoint.save={first}")
    a = metrics(first)
    load = f"checkpoint.load={first / 'iter_0000004'}"
    # default (override): this config's lr
    train_here(hf, *SHORT, "optimizer.lr=1e-3", f"checkpoint.save={tmp_path / 'override'}", load)
    b = metrics(tmp_path / "override")
    assert b[5]["lr"] != a[5]["lr"] and b[5]["lr"] <= 1e-3
    # use the checkpoint's: its lr schedule, so the losses continue exactly
    lines: list[str] = []
    train_here(hf, *SHORT, "optimizer.lr=1e-3", "scheduler.override_opt_param_scheduler=false",
               "scheduler.use_checkpoint_opt_param_scheduler=true", f"checkpoint.save={tmp_path / 'ckpt'}", load,
               print_fn=lines.append)
    c = metrics(tmp_path / "ckpt")
    assert [(c[i]["lr"], c[i]["loss"]) for i in (5, 6, 7, 8)] == [(a[i]["lr"], a[i]["loss"]) for i in (5, 6, 7, 8)]
    assert any("schedule from iter_0000004 (scheduler.use_checkpoint_opt_param_scheduler)" in x for x in lines)
    # neither: they must agree
    with pytest.raises(ValueError, match=r"differs from iter_0000004's in lr\.max_lr 0\.001 \(checkpoint 0\.003\)"):
        train_here(hf, *SHORT, "optimizer.lr=1e-3", "scheduler.override_opt_param_scheduler=false",
                   f"checkpoint.save={tmp_path / 'neither'}", load)
    lines.clear()
    train_here(hf, *SHORT, "scheduler.override_opt_param_scheduler=false", f"checkpoint.save={tmp_path / 'same'}", load,
               print_fn=lines.append)
    assert any("schedule checked equal to iter_0000004's" in x for x in lines)
    # both: refused at load
    with pytest.raises(ConfigError, match="scheduler.use_checkpoint_opt_param_scheduler=True needs"):
        load_config([], ["scheduler.use_checkpoint_opt_param_scheduler=true"], validate_plugins=False)


# -- optimizer.optimizer=sgd ------------------------------------------------------------------------
def test_sgd_is_torch_sgd_with_momentum_and_checkpoints_its_momentum(hf, tmp_path):
    from nvlcore.checkpoint import open_checkpoint

    out = tmp_path / "sgd"
    lines: list[str] = []
    train_here(hf, *SHORT, "optimizer.optimizer=sgd", "optimizer.sgd_momentum=0.8", "optimizer.lr=0.05",
               "optimizer.min_lr=0.005", f"checkpoint.save={out}", print_fn=lines.append)
    assert any("optimizer: SGD (momentum 0.8)" in x for x in lines), lines
    keys = open_checkpoint(out / "iter_0000004").keys("optimizer")
    assert keys and all(k.endswith(".momentum_buffer") for k in keys), keys
    rows = metrics(out)
    assert rows[8]["loss"] < rows[1]["loss"] - 0.3, rows
    resumed = tmp_path / "sgd_resumed"
    train_here(hf, *SHORT, "optimizer.optimizer=sgd", "optimizer.sgd_momentum=0.8", "optimizer.lr=0.05",
               "optimizer.min_lr=0.005", f"checkpoint.save={resumed}", f"checkpoint.load={out / 'iter_0000004'}")
    again = metrics(resumed)
    for i in (5, 6, 7, 8):
        assert again[i]["loss"] == rows[i]["loss"], (i, rows[i]["loss"], again[i]["loss"])


def test_sgd_update_is_torch_sgd():
    import torch

    from nvlcore.training import optim

    w = torch.nn.Parameter(torch.ones(3, 2))
    opt = optim.build_optimizer([("w", w)], lr=0.1, weight_decay=0.0, optimizer="sgd", sgd_momentum=0.5)
    assert type(opt) is torch.optim.SGD and opt.defaults["momentum"] == 0.5
    assert optim.state_names(opt) == ("momentum_buffer",)
    with pytest.raises(ValueError, match="optimizer.optimizer='lion'"):
        optim.build_optimizer([("w", w)], lr=0.1, optimizer="lion")


# -- ddp.check_for_nan_in_grad ----------------------------------------------------------------------
@pytest.fixture
def one_rank():
    from nvlcore.parallel import destroy_parallel, init_parallel

    ctx = init_parallel(1, device_type="cpu")
    yield ctx
    destroy_parallel(ctx)


def _trainer(hf, ctx, **settings):
    import torch

    from nvlcore.training import optim
    from nvlcore.training.schedules import LRSchedule, WeightDecaySchedule
    from nvlcore.training.trainer import LoopSettings, Trainer

    bridge = tiny_plugin.TinyBridge.from_hf_dir(hf)
    model = bridge.build_model(dtype=torch.float32, device=ctx.device)
    bridge.load_hf_weights(model, hf)
    named = optim.trainable_named_parameters(model)
    trainer = Trainer(model=model, ctx=ctx, optimizer=optim.build_optimizer(named, lr=1e-3), named_params=named,
                      lr_schedule=LRSchedule(max_lr=1e-3, min_lr=0.0, decay_style="constant"),
                      wd_schedule=WeightDecaySchedule(start=0.0, end=0.0),
                      settings=LoopSettings(train_iters=1, global_batch_size=2, num_microbatches=2, **settings))
    maker = tiny_plugin.TinyMaker(num_examples=2)
    proc = bridge.processor(seq_length=64)
    return model, trainer, [proc.collate([proc(maker[i])]) for i in range(2)]


def test_check_for_nan_in_grad_stops_the_run_and_off_skips_the_update(hf, one_rank):
    from nvlcore.config import load_config
    from nvlcore.training.finetune import loop_settings

    assert loop_settings(load_config([], [], validate_plugins=False), dp_size=1, device_type="cpu").fail_on_nan_grad
    off = load_config([], ["ddp.check_for_nan_in_grad=false"], validate_plugins=False)
    assert not loop_settings(off, dp_size=1, device_type="cpu").fail_on_nan_grad
    for fail in (True, False):
        model, trainer, micro = _trainer(hf, one_rank, fail_on_nan_grad=fail)
        h = model.language_model.linear_fc2.register_forward_hook(lambda m, i, o: (o[0] * float("nan"), o[1]))
        if fail:
            with pytest.raises(FloatingPointError, match=r"iteration 1: non-finite .*ddp\.check_for_nan_in_grad=false"):
                trainer.train_step(micro)
        else:
            assert trainer.train_step(micro).skipped
        h.remove()


# -- train.manual_gc_eval ---------------------------------------------------------------------------
def test_manual_gc_eval_collects_around_validation(hf, one_rank, monkeypatch):
    import gc

    calls: list[int] = []
    for flag, expect in ((True, 2), (False, 0)):
        _, trainer, _ = _trainer(hf, one_rank, manual_gc_interval=100, manual_gc_eval=flag)
        trainer.eval_fn = lambda: (1.0, 1.0)
        monkeypatch.setattr(gc, "collect", lambda *a: calls.append(1) or 0)
        calls.clear()
        trainer._evaluate()
        monkeypatch.undo()
        assert len(calls) == expect, (flag, calls)


# -- ddp.bucket_size ----------------------------------------------------------------------------------
def test_bucket_size_sets_the_all_reduce_buckets(monkeypatch):
    import torch
    import torch.distributed as dist

    from nvlcore.config import load_config
    from nvlcore.training import optim
    from nvlcore.training.finetune import loop_settings

    cfg = load_config([], ["ddp.bucket_size=1000"], validate_plugins=False)
    settings = loop_settings(cfg, dp_size=2, device_type="cpu")
    assert settings.bucket_bytes == 4000
    assert loop_settings(load_config([], [], validate_plugins=False), dp_size=2, device_type="cpu").bucket_bytes is None
    sizes: list[int] = []
    monkeypatch.setattr(dist, "all_reduce", lambda t, group=None: sizes.append(t.numel()))
    grads = [torch.ones(600) for _ in range(5)]
    optim.reduce_gradients(grads, group=None, group_size=2, scale=0.5, bucket_bytes=settings.bucket_bytes)
    assert sizes == [600] * 5  # 2 x 600 elements do not fit in 1000
    sizes.clear()
    optim.reduce_gradients(grads, group=None, group_size=2, scale=1.0)
    assert sizes == [3000]  # the default bucket holds them all


# -- logger.tensorboard_dir, logger.log_timers_to_tensorboard -----------------------------------------
def _scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_scalars(hf, tmp_path):
    tb = tmp_path / "tb"
    out = tmp_path / "run"
    train_here(hf, "train.train_iters=4", "scheduler.lr_warmup_iters=1", f"checkpoint.save={out}",
               f"logger.tensorboard_dir={tb}", "validation.eval_iters=1", "validation.eval_interval=2")
    got = _scalars(tb)
    rows = metrics(out)
    assert [s for s, _ in got["loss"]] == [1, 2, 3, 4]
    for step, value in got["loss"]:
        assert value == pytest.approx(rows[step]["loss"], rel=1e-6)
    assert [s for s, _ in got["val_loss"]] == [2, 4] and "lr" in got and "grad_norm" in got
    assert "step_time_s" in got and "tokens_per_s" in got
    quiet = tmp_path / "tb_no_timers"
    train_here(hf, "train.train_iters=2", "scheduler.lr_warmup_iters=1", f"logger.tensorboard_dir={quiet}",
               "logger.log_timers_to_tensorboard=false")
    got = _scalars(quiet)
    assert "loss" in got and "step_time_s" not in got and "tokens_per_s" not in got


# -- dataset.skip_test, dataset.test_maker_kwargs -------------------------------------------------------
def test_test_split_is_evaluated_at_the_end_unless_skip_test(hf, tmp_path):
    out = tmp_path / "test_split"
    lines: list[str] = []
    common = ["train.train_iters=2", "scheduler.lr_warmup_iters=1", "validation.eval_iters=1",
              "validation.eval_interval=2", "dataset.maker_name=tiny_with_test"]
    train_here(hf, *common, f"checkpoint.save={out}", 'dataset.test_maker_kwargs={"num_examples": 12}',
               print_fn=lines.append)
    assert any("test: 1 batch(es) at the end of training on 12 examples" in x for x in lines), lines
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if "test_loss" in x]
    assert len(rows) == 1 and rows[0]["iteration"] == 2
    assert math.isfinite(rows[0]["test_loss"]) and rows[0]["test_tokens"] > 0
    assert any(x.startswith("nvl finetune: test loss ") for x in lines)
    lines.clear()
    skipped = tmp_path / "skipped"
    train_here(hf, *common, f"checkpoint.save={skipped}", "dataset.skip_test=true", print_fn=lines.append)
    assert "test_loss" not in (skipped / "metrics.jsonl").read_text()
    assert any("test split skipped: dataset.skip_test is set" in x for x in lines), lines


# -- checkpoint.save_tokenizer_assets ---------------------------------------------------------------------
def test_save_tokenizer_assets_copies_the_tokenizer_files(hf, tmp_path):
    import shutil

    src = tmp_path / "hf_tok"
    shutil.copytree(hf, src)
    (src / "tokenizer_config.json").write_text('{"model_max_length": 64}')
    (src / "tokenizer.json").write_text('{"version": "1.0"}')
    out = tmp_path / "with"
    train_here(src, "train.train_iters=1", "scheduler.lr_warmup_iters=0", f"checkpoint.save={out}")
    tok = out / "iter_0000001" / "tokenizer"
    assert sorted(p.name for p in tok.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    assert (tok / "tokenizer_config.json").read_text() == '{"model_max_length": 64}'
    out2 = tmp_path / "without"
    train_here(src, "train.train_iters=1", "scheduler.lr_warmup_iters=0", f"checkpoint.save={out2}",
               "checkpoint.save_tokenizer_assets=false")
    assert not (out2 / "iter_0000001" / "tokenizer").exists()


# -- dataset.persistent_workers ----------------------------------------------------------------------------
def test_persistent_workers_keep_the_validation_workers(hf, one_rank):
    from nvlcore.config import load_config
    from nvlcore.training.finetune import build_data

    manager = tiny_plugin.manager()
    bridge = tiny_plugin.TinyBridge.from_hf_dir(hf)
    pids = {}
    for flag in (True, False):
        cfg = load_config([], [*DEFAULTS, "dataset.num_workers=1", f"dataset.persistent_workers={flag}",
                               "validation.eval_iters=1", "validation.eval_interval=1"], plugins=manager)
        data = build_data(cfg, bridge, manager, one_rank, consumed_samples=0, print_fn=print)
        seen = []
        for _ in range(2):
            it = data.eval_batches_factory()
            next(it)
            seen.append(tuple(w.pid for w in it._workers))
            if not flag:
                it._shutdown_workers()
        pids[flag] = seen
    assert pids[True][0] == pids[True][1]  # the same worker process served both evaluations
    assert pids[False][0] != pids[False][1]


# -- dist.distributed_backend -------------------------------------------------------------------------------
def test_distributed_backend(hf, tmp_path):
    from nvlcore.parallel import init_parallel

    with pytest.raises(ValueError, match="dist.distributed_backend=nccl needs GPUs"):
        init_parallel(1, device_type="cpu", backend="nccl")
    lines: list[str] = []
    train_here(hf, "train.train_iters=1", "scheduler.lr_warmup_iters=0", "dist.distributed_backend=gloo",
               print_fn=lines.append)
    assert any("on cpu (gloo)" in x for x in lines), lines
