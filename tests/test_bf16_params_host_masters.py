"""Full fine-tuning with bf16 weights on the device and fp32 masters on the host (issue 22, the precision-aware
optimizer fully offloaded: megatron-core's HybridDeviceOptimizer layouts).

With ``optimizer.main_grads_dtype=torch.bfloat16`` the gradients are bf16 too: the host masters follow fp32
AdamW fed the same bf16 gradients exactly, the device holds their rounding, the master is checkpointed so a
resume is exact. With fp32 main gradients (``MAIN32``: megatron-core's default) the linear layers' weights
are bf16 and their gradients accumulate in fp32 on the device: a run equals the fp32-weight run with the
optimizer offloaded, loss for loss and weight for weight. Every other combination is refused."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest

SUPPORT = Path(__file__).resolve().parent / "trainer_support"
sys.path.insert(0, str(SUPPORT))

import tiny_plugin  # noqa: E402
from run_tiny import DEFAULTS  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
MODE = ["optimizer.use_precision_aware_optimizer=true", "optimizer.optimizer_cpu_offload=true",
        "optimizer.optimizer_offload_fraction=1.0", "optimizer.main_grads_dtype=torch.bfloat16"]
#: fp32 main gradients: the precision-aware optimizer fully offloaded, nothing more
MAIN32 = MODE[:3]
#: the fp32-weight run it must equal: the optimizer offloaded without the precision-aware layout
OFFLOAD32 = MODE[1:3]
KW = {"lr": 1e-2, "betas": (0.9, 0.95), "eps": 1e-8}


def _start():
    import torch

    g = torch.Generator().manual_seed(0)
    return torch.randn(64, 128, generator=g), torch.randn(128, generator=g), g


def _lean(w0, b0):
    """bf16-stored matrix + fp32 vector, masters captured from fp32 as the trainer builds them."""
    import torch

    from nvlcore.training.host_offload import HostOffloadAdamW

    w, b = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(b0.clone())
    opt = HostOffloadAdamW([{"params": [w], "weight_decay": 0.1}, {"params": [b], "weight_decay": 0.0}],
                           offload_fraction=1.0, **KW)
    assert opt.store_params_in(torch.bfloat16) == w.numel()
    return opt, w, b


def _grads(w, b, g):
    import torch

    return torch.randn(w.shape, generator=g).to(torch.bfloat16), torch.randn(b.shape, generator=g)


def _step(opt, w, b, gw, gb, *, refresh: bool = False) -> None:
    w.grad, b.grad = gw.clone(), gb.clone()
    if refresh:  # the old behaviour: the master re-read from the (bf16) device value each step
        opt.host_of[w].copy_(w.detach())
    opt.step()


@pytest.mark.parametrize("refresh", [False, True])
def test_host_masters_follow_fp32_adamw_fed_the_bf16_grads(refresh: bool) -> None:
    import torch

    w0, b0, g = _start()
    opt, w, b = _lean(w0, b0)
    assert w.dtype == torch.bfloat16 and b.dtype == torch.float32  # 1-D parameters stay fp32
    rw, rb = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(b0.clone())
    ref = torch.optim.AdamW([{"params": [rw], "weight_decay": 0.1}, {"params": [rb], "weight_decay": 0.0}],
                            foreach=True, **KW)
    for _ in range(6):
        gw, gb = _grads(w, b, g)
        _step(opt, w, b, gw, gb, refresh=refresh)
        rw.grad, rb.grad = gw.float(), gb.clone()
        ref.step()
    master = opt.host_of[w]
    same = torch.equal(master, rw.detach()) and torch.equal(w.detach(), rw.detach().to(torch.bfloat16))
    assert same != refresh  # the negative control (refresh) must lose the master's low bits
    assert torch.equal(b.detach(), rb.detach())
    assert opt.state[w]["main_param"] is master and opt.state[w]["exp_avg"].dtype == torch.float32


@pytest.mark.parametrize("main_grads", [True, False])
def test_fp32_main_grads_sum_the_micro_batches_bf16_gradients_in_fp32(main_grads: bool) -> None:
    """Three micro-batches through a bf16 weight: its fp32 main gradient equals the gradient an fp32 weight
    used under autocast accumulates (the cast's backward widens each bf16 gradient), ``.grad`` stays empty,
    and the update equals fp32 AdamW's. Without main grads the sum is taken in bf16 (negative control)."""
    import torch

    from nvlcore.training.grads import grad_of, zero_grads
    from nvlcore.training.host_offload import HostOffloadAdamW
    from nvlcore.training.optim import materialize_grads

    w0, _, g = _start()
    xs = [torch.randn(8, 128, generator=g) for _ in range(3)]
    w = torch.nn.Parameter(w0.clone())
    opt = HostOffloadAdamW([{"params": [w], "weight_decay": 0.1}], offload_fraction=1.0, **KW)
    opt.store_params_in(torch.bfloat16, main_grads=main_grads)
    rw = torch.nn.Parameter(w0.clone())
    ref = torch.optim.AdamW([{"params": [rw], "weight_decay": 0.1}], foreach=True, **KW)
    for _ in range(2):
        zero_grads([w])
        rw.grad = None
        for x in xs:
            (x.to(torch.bfloat16) @ w.t()).float().square().sum().backward()
            (x.to(torch.bfloat16) @ rw.to(torch.bfloat16).t()).float().square().sum().backward()
        assert w.grad is None if main_grads else w.grad.dtype == torch.bfloat16
        assert materialize_grads([w])[0] is grad_of(w)
        assert torch.equal(grad_of(w), rw.grad) == main_grads
        opt.step()
        ref.step()
    assert torch.equal(opt.host_of[w], rw.detach()) == main_grads
    if main_grads:
        assert torch.equal(w.detach(), rw.detach().to(torch.bfloat16)) and w.main_grad.dtype == torch.float32


@pytest.mark.parametrize("keep_master", [True, False])
def test_resume_from_a_state_dict_is_bit_exact(keep_master: bool) -> None:
    import torch

    w0, b0, g = _start()
    grads = []
    opt, w, b = _lean(w0, b0)
    for _ in range(6):
        grads.append(_grads(w, b, g))
        _step(opt, w, b, *grads[-1])
    whole = (opt.host_of[w].clone(), w.detach().clone(), b.detach().clone())

    opt, w, b = _lean(w0, b0)
    for gw, gb in grads[:3]:
        _step(opt, w, b, gw, gb)
    buf = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "w": w.detach().clone(), "b": b.detach().clone()}, buf)
    buf.seek(0)
    saved = torch.load(buf)
    if not keep_master:  # a checkpoint without the masters: they come back from the bf16 weights (inexact)
        for st in saved["opt"]["state"].values():
            st.pop("main_param")
    opt, w, b = _lean(torch.zeros_like(w0), torch.zeros_like(b0))  # a fresh model, weights loaded afterwards
    with torch.no_grad():
        w.copy_(saved["w"])
        b.copy_(saved["b"])
    opt.load_state_dict(saved["opt"])
    assert opt.state[w]["exp_avg"].dtype == torch.float32  # not cast to the bf16 parameter's dtype
    for gw, gb in grads[3:]:
        _step(opt, w, b, gw, gb)
    exact = all(torch.equal(x, y) for x, y in zip(whole, (opt.host_of[w], w.detach(), b.detach()), strict=True))
    assert exact == keep_master


@pytest.mark.parametrize("overrides, needle", [
    (["optimizer.main_grads_dtype=torch.bfloat16"], "needs optimizer.use_precision_aware_optimizer=true"),
    (MODE[:1] + MODE[3:], "needs optimizer.optimizer_cpu_offload=true"),
    ([*MODE[:2], "optimizer.optimizer_offload_fraction=0.5", MODE[3]],
     "needs optimizer.optimizer_offload_fraction=1.0"),
    ([*MODE, "optimizer.exp_avg_dtype=torch.bfloat16"], "optimizer_cpu_offload=true works with"),
    ([*MODE, "mixed_precision=fp32"], "needs a bf16 mixed precision, not fp32"),
    ([*MODE[:2], "optimizer.optimizer_offload_fraction=0.5"], "needs optimizer.optimizer_offload_fraction=1.0"),
    ([*MODE[:3], "optimizer.exp_avg_dtype=torch.bfloat16"], "optimizer_cpu_offload=true works with"),
    ([*MODE[:3], "mixed_precision=fp32"], "fp32 main gradients on the GPU, fp32 masters and Adam moments on the "
                                          "host) needs a bf16 mixed precision, not fp32"),
])
def test_other_combinations_are_refused_in_one_line(overrides: list[str], needle: str) -> None:
    from nvlcore.config import ConfigError, load_config

    with pytest.raises(ConfigError) as err:
        load_config([], overrides)
    assert needle in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_the_mode_loads_and_the_plan_counts_two_bytes_for_weights_and_grads() -> None:
    from nvlcore.config import load_config
    from nvlcore.training.memory import PlanInputs

    cfg = load_config([], MODE)
    lean, plain = PlanInputs.from_config(cfg), PlanInputs.from_config(load_config([], []))
    assert lean.main_grads_bytes == 2.0 and plain.main_grads_bytes == 4.0 and lean.optimizer_offload_fraction == 1.0


# ------------------------------------------------------------------------------------ end to end (CPU)
@pytest.fixture(scope="module")
def hf(tmp_path_factory) -> Path:
    return tiny_plugin.write_tiny_hf_dir(tmp_path_factory.mktemp("tiny") / "hf")


def _train(hf: Path, monkeypatch, *overrides: str, lines: list[str] | None = None):
    import attrs
    import torch

    from nvlcore.config import load_config, resolve_config
    from nvlcore.training import finetune
    from nvlcore.training.trainer import Trainer

    real, real_step = finetune.loop_settings, Trainer.train_step
    # bf16 autocast on the CPU, as a GPU run has it (the trainer enters torch.autocast(device_type, dtype))
    monkeypatch.setattr(finetune, "loop_settings",
                        lambda *a, **k: attrs.evolve(real(*a, **k), autocast_dtype=torch.bfloat16))

    def step_under_autocast(self, micro_batches):
        # megatron's linear backward re-enters the forward's autocast only for CUDA (custom_bwd); on the CPU
        # the backward runs under CPU autocast instead, as a GPU run's does
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return real_step(self, micro_batches)

    monkeypatch.setattr(Trainer, "train_step", step_under_autocast)
    manager = tiny_plugin.manager()
    cfg = load_config([], [*DEFAULTS, f"model.hf_model_path={hf}", f"checkpoint.pretrained_checkpoint={hf}",
                           "train.train_iters=4", "checkpoint.save_interval=2", "scheduler.lr_warmup_iters=1",
                           *overrides], plugins=manager)
    resolve_config(cfg)
    return finetune.run_finetune(cfg, manager=manager, device_type="cpu",
                                 print_fn=(lines.append if lines is not None else print))


def _losses(path: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines()]
    return {r["iteration"]: r["loss"] for r in rows if "loss" in r}


def test_full_finetune_with_bf16_params_resumes_exactly(hf, tmp_path, monkeypatch) -> None:
    import torch

    from nvlcore.checkpoint import open_checkpoint

    whole, resumed, lines = tmp_path / "whole", tmp_path / "resumed", []
    _train(hf, monkeypatch, *MODE, f"checkpoint.save={whole}", lines=lines)
    assert any("their fp32 masters in host memory" in x for x in lines), lines
    saved = open_checkpoint(whole / "iter_0000002").load(state="optimizer")
    masters = {k: v for k, v in saved.items() if k.endswith(".main_param")}
    assert masters and all(v.dtype == torch.float32 for v in masters.values())
    # a master is finer than the bf16 weight it rounds to (else nothing is kept on the host)
    assert any(not torch.equal(v, v.to(torch.bfloat16).float()) for v in masters.values())
    weights = open_checkpoint(whole / "iter_0000002").load()
    assert {v.dtype for v in weights.values() if v.dim() >= 2} == {torch.bfloat16}  # the device stored bf16
    assert {v.dtype for v in weights.values() if v.dim() == 1} == {torch.float32}  # norms, biases stay fp32
    _train(hf, monkeypatch, *MODE, f"checkpoint.save={resumed}", f"checkpoint.load={whole / 'iter_0000002'}")
    a, b = _losses(whole), _losses(resumed)
    assert sorted(b) == [3, 4] and all(a[i] == b[i] for i in b), (a, b)
    end_a, end_b = (open_checkpoint(d / "iter_0000004").load(state="optimizer") for d in (whole, resumed))
    assert end_a.keys() == end_b.keys() and all(torch.equal(end_a[k], end_b[k]) for k in end_a)


def test_fp32_main_grads_run_equals_the_fp32_weight_run_and_resumes_exactly(hf, tmp_path, monkeypatch) -> None:
    """Global batch 4 over micro-batches of 1: the bf16 weights' gradients accumulate in fp32 on the device and
    every loss, and every final weight's fp32 master, equals the fp32-weight run's with the optimizer offloaded.
    The bf16-gradient layout (``MODE``) does not (negative control)."""
    import torch

    from nvlcore.checkpoint import open_checkpoint

    runs = {k: tmp_path / k for k in ("fp32", "main32", "bf16", "resumed")}
    lines: list[str] = []
    _train(hf, monkeypatch, *OFFLOAD32, f"checkpoint.save={runs['fp32']}")
    _train(hf, monkeypatch, *MAIN32, f"checkpoint.save={runs['main32']}", lines=lines)
    _train(hf, monkeypatch, *MODE, f"checkpoint.save={runs['bf16']}")
    assert any("linear layers' weights in bf16 on the device with fp32 main gradients" in x for x in lines), lines
    ref, got = _losses(runs["fp32"]), _losses(runs["main32"])
    assert sorted(got) == [1, 2, 3, 4] and got == ref, (ref, got)
    assert _losses(runs["bf16"]) != ref
    fp32_w = open_checkpoint(runs["fp32"] / "iter_0000004").load()
    weights = open_checkpoint(runs["main32"] / "iter_0000004").load()
    masters = open_checkpoint(runs["main32"] / "iter_0000004").load(state="optimizer")
    low = {k for k, v in weights.items() if v.dtype == torch.bfloat16}
    assert "language_model.linear_fc1.weight" in low and "language_model.embedding.weight" not in low
    for k, v in weights.items():
        master = next((m for n, m in masters.items() if n.endswith(".main_param") and k in n), None)
        if k in low:
            assert master is not None and torch.equal(master, fp32_w[k]) and torch.equal(v, master.to(v.dtype)), k
        else:
            assert torch.equal(v, fp32_w[k]), k
    _train(hf, monkeypatch, *MAIN32, f"checkpoint.save={runs['resumed']}",
           f"checkpoint.load={runs['main32'] / 'iter_0000002'}")
    assert {i: ref[i] for i in (3, 4)} == _losses(runs["resumed"])
    # switching layouts on resume: the fp32 run's checkpoint has no masters, its fp32 weights are them (exact)
    switched = tmp_path / "switched"
    _train(hf, monkeypatch, *MAIN32, f"checkpoint.save={switched}", f"checkpoint.load={runs['fp32'] / 'iter_0000002'}")
    assert {i: ref[i] for i in (3, 4)} == _losses(switched)
    end = open_checkpoint(switched / "iter_0000004").load(state="optimizer")
    assert all(torch.equal(v, fp32_w[k[: -len(".main_param")]]) for k, v in end.items() if k.endswith(".main_param"))


def test_cpu_run_without_bf16_autocast_is_refused_in_one_line(hf, tmp_path) -> None:
    from nvlcore.config import ConfigError, load_config, resolve_config
    from nvlcore.training.finetune import run_finetune

    manager = tiny_plugin.manager()
    cfg = load_config([], [*DEFAULTS, f"model.hf_model_path={hf}", f"checkpoint.pretrained_checkpoint={hf}",
                           "train.train_iters=2", "scheduler.lr_warmup_iters=1", f"checkpoint.save={tmp_path / 'x'}",
                           *MODE], plugins=manager)
    resolve_config(cfg)
    with pytest.raises(ConfigError, match="needs bf16 autocast"):
        run_finetune(cfg, manager=manager, device_type="cpu", print_fn=lambda _: None)
    cfg = load_config([], [*DEFAULTS, f"model.hf_model_path={hf}", f"checkpoint.pretrained_checkpoint={hf}",
                           "train.train_iters=2", "scheduler.lr_warmup_iters=1", f"checkpoint.save={tmp_path / 'y'}",
                           *MAIN32], plugins=manager)
    resolve_config(cfg)
    with pytest.raises(ConfigError, match="use_precision_aware_optimizer=true with the optimizer in host memory "
                                          "stores weights in bf16, which needs bf16 autocast"):
        run_finetune(cfg, manager=manager, device_type="cpu", print_fn=lambda _: None)


@pytest.mark.skipif("not __import__('torch').cuda.is_available()", reason="needs CUDA")
def test_on_cuda_masters_stay_on_the_host_and_follow_fp32_adamw() -> None:
    import torch

    from nvlcore.training.host_offload import HostOffloadAdamW

    w0, b0, g = _start()
    w, b = torch.nn.Parameter(w0.cuda()), torch.nn.Parameter(b0.cuda())
    opt = HostOffloadAdamW([{"params": [w], "weight_decay": 0.1}, {"params": [b], "weight_decay": 0.0}],
                           offload_fraction=1.0, chunk_bytes=1, **KW)  # a chunk per parameter
    opt.store_params_in(torch.bfloat16)
    rw, rb = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(b0.clone())
    # on a GPU run the host update is torch's fused CPU AdamW (foreach differs in the last bit)
    ref = torch.optim.AdamW([{"params": [rw], "weight_decay": 0.1}, {"params": [rb], "weight_decay": 0.0}],
                            fused=True, **KW)
    for _ in range(4):
        gw, gb = _grads(rw, rb, g)
        w.grad, b.grad = gw.cuda(), gb.cuda()
        rw.grad, rb.grad = gw.float(), gb
        opt.step()
        ref.step()
    torch.cuda.synchronize()
    assert w.dtype == torch.bfloat16 and w.device.type == "cuda" and opt.host_of[w].device.type == "cpu"
    assert torch.equal(opt.host_of[w], rw.detach()) and torch.equal(w.cpu(), rw.detach().to(torch.bfloat16))
    assert torch.equal(b.cpu(), rb.detach())


def _reduce_worker(rank: int, port: int, out: str) -> None:
    import torch
    import torch.distributed as dist

    from nvlcore.training import optim

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    g = torch.Generator().manual_seed(rank)
    grads = [torch.randn(33, 7, generator=g).to(torch.bfloat16), torch.randn(5, generator=g)]  # bf16 + fp32 (1-D)
    mine = [t.clone() for t in grads]
    optim.reduce_gradients(grads, group=None, group_size=2, scale=0.5, bucket_bytes=256)
    torch.save({"mine": mine, "reduced": grads}, f"{out}.{rank}")
    dist.destroy_process_group()


def test_bf16_gradients_are_all_reduced_in_bf16_over_data_parallel_ranks(tmp_path) -> None:
    import socket

    import torch
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_reduce_worker, args=(port, str(tmp_path / "r")), nprocs=2)
    a, b = (torch.load(tmp_path / f"r.{r}") for r in (0, 1))
    for i, dtype in enumerate((torch.bfloat16, torch.float32)):
        assert a["reduced"][i].dtype == dtype and torch.equal(a["reduced"][i], b["reduced"][i])
        want = ((a["mine"][i] + b["mine"][i]) * 0.5).to(dtype)  # a bf16 sum rounds once, as the all-reduce does
        assert torch.equal(a["reduced"][i], want), i
