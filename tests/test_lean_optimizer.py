"""Lean optimizer state (issue 22): megatron-core's precision-aware optimizer keys store Adam's moments in
bf16 or 8 bits (torchao's update and 8-bit state), checkpoints keep them fp32 (plus an 8-bit moment's block
scales) and a resumed run is bit-identical; the keys nvl does not implement (fp16 moments, fp16 masters,
bf16 main grads, host offload) are refused at load."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

SUPPORT = Path(__file__).resolve().parent / "trainer_support"
sys.path.insert(0, str(SUPPORT))

import tiny_plugin  # noqa: E402
from run_tiny import DEFAULTS  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
BF16 = ["optimizer.use_precision_aware_optimizer=true", "optimizer.exp_avg_dtype=torch.bfloat16",
        "optimizer.exp_avg_sq_dtype=torch.bfloat16"]
INT8 = ["optimizer.use_precision_aware_optimizer=true", "optimizer.exp_avg_dtype=torch.uint8",
        "optimizer.exp_avg_sq_dtype=torch.uint8"]
SHORT = ["train.train_iters=8", "checkpoint.save_interval=4", "scheduler.lr_warmup_iters=1"]


def _losses(path: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines()]
    return {r["iteration"]: r["loss"] for r in rows if "loss" in r}


def _train(hf: Path, *overrides: str, lines: list[str] | None = None):
    from nvlcore.config import load_config, resolve_config
    from nvlcore.training.finetune import run_finetune

    manager = tiny_plugin.manager()
    cfg = load_config([], [*DEFAULTS, f"model.hf_model_path={hf}", f"checkpoint.pretrained_checkpoint={hf}",
                           *overrides], plugins=manager)
    resolve_config(cfg)
    return run_finetune(cfg, manager=manager, device_type="cpu",
                        print_fn=(lines.append if lines is not None else print))


@pytest.fixture(scope="module")
def hf(tmp_path_factory) -> Path:
    return tiny_plugin.write_tiny_hf_dir(tmp_path_factory.mktemp("tiny") / "hf")


def _steps(opt_factory, steps: int = 5):
    import torch

    g = torch.Generator().manual_seed(0)
    w = torch.nn.Parameter(torch.randn(64, 128, generator=g))
    b = torch.nn.Parameter(torch.randn(128, generator=g))
    opt = opt_factory([{"params": [w], "weight_decay": 0.1}, {"params": [b], "weight_decay": 0.0}])
    for _ in range(steps):
        w.grad = torch.randn(w.shape, generator=g)
        b.grad = torch.randn(b.shape, generator=g)
        opt.step()
    return opt, w.detach().clone(), b.detach().clone()


def test_fp32_moments_match_torch_adamw_and_bf16_moments_are_stored_bf16_and_track_it() -> None:
    import torch

    from nvlcore.training.lean_adam import LeanAdamW

    kw = {"lr": 1e-2, "betas": (0.9, 0.95), "eps": 1e-8}
    _, w_ref, b_ref = _steps(lambda g: torch.optim.AdamW(g, **kw))
    _, w32, b32 = _steps(lambda g: LeanAdamW(g, **kw))
    torch.testing.assert_close(w32, w_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(b32, b_ref, rtol=1e-6, atol=1e-6)
    opt, w16, b16 = _steps(lambda g: LeanAdamW(g, exp_avg_dtype=torch.bfloat16, exp_avg_sq_dtype=torch.bfloat16, **kw))
    for st in opt.state.values():
        assert st["exp_avg"].dtype == st["exp_avg_sq"].dtype == torch.bfloat16
    # bf16 moments (8 mantissa bits) move the update by well under 1% of the lr per step here
    assert not torch.equal(w16, w_ref)
    torch.testing.assert_close(w16, w_ref, rtol=0, atol=5 * 1e-2 * 1e-2)
    torch.testing.assert_close(b16, b_ref, rtol=0, atol=5 * 1e-2 * 1e-2)


def test_bf16_moments_run_halves_the_state_and_resumes_bit_for_bit(hf, tmp_path) -> None:
    import torch

    from nvlcore.checkpoint import open_checkpoint
    from nvlcore.training import checkpointing

    whole, resumed, lines = tmp_path / "whole", tmp_path / "resumed", []
    _train(hf, *SHORT, *BF16, f"checkpoint.save={whole}", lines=lines)
    assert any("moments stored as torch.bfloat16 / torch.bfloat16" in x for x in lines), lines
    saved = open_checkpoint(whole / "iter_0000004").load(state="optimizer")
    assert saved and all(v.dtype == torch.float32 for v in saved.values())  # checkpoints keep fp32 moments
    held = next(x for x in lines if "optimizer state held per data-parallel rank" in x)
    n_moments = sum(v.numel() for v in saved.values())  # exp_avg + exp_avg_sq values
    assert f"[{2 * n_moments}]" in held, (held, n_moments)  # 2 bytes per moment value, not 4

    seen: list[torch.dtype] = []
    original = checkpointing.load_optimizer_state

    def spy(optimizer, *a, **k):
        original(optimizer, *a, **k)
        seen.extend(st["exp_avg"].dtype for st in optimizer.state.values())

    checkpointing.load_optimizer_state = spy
    try:
        _train(hf, *SHORT, *BF16, f"checkpoint.save={resumed}", f"checkpoint.load={whole / 'iter_0000004'}")
    finally:
        checkpointing.load_optimizer_state = original
    assert seen and set(seen) == {torch.bfloat16}
    a, b = _losses(whole), _losses(resumed)
    assert sorted(b) == [5, 6, 7, 8]
    for i in b:
        assert a[i] == b[i], (i, a[i], b[i])


def test_uint8_moments_are_torchao_adamw8bit_and_checkpoint_round_trip_is_exact() -> None:
    import torch
    from torchao.optim import AdamW8bit
    from torchao.optim.subclass_8bit import OptimState8bit

    from nvlcore.training.lean_adam import BLOCK_SCALE, LeanAdamW, export_moment

    kw = {"lr": 1e-2, "betas": (0.9, 0.95), "eps": 1e-8}
    with torch.compiler.set_stance("force_eager"):
        ref, w_ref, b_ref = _steps(lambda g: AdamW8bit(g, **kw))
    opt, w8, b8 = _steps(lambda g: LeanAdamW(g, exp_avg_dtype=torch.uint8, exp_avg_sq_dtype=torch.uint8, **kw))
    assert torch.equal(w8, w_ref) and torch.equal(b8, b_ref)  # the same update as torchao's own 8-bit AdamW
    (w, b) = [p for g in opt.param_groups for p in g["params"]]
    assert isinstance(opt.state[w]["exp_avg"], OptimState8bit)  # 8,192 values: 8-bit
    assert not isinstance(opt.state[b]["exp_avg"], OptimState8bit)  # 128 values: fp32, as torchao does
    before = {m: (opt.state[w][m].codes.clone(), opt.state[w][m].scale.clone()) for m in ("exp_avg", "exp_avg_sq")}
    saved = {m: export_moment(opt.state[w][m]) for m in before}

    def restore(with_scales: bool) -> dict:
        for m in before:
            opt.state[w][m] = saved[m][""].clone()
        opt.adopt_fp32_moments({w: {m: saved[m][BLOCK_SCALE] for m in before}} if with_scales else None)
        return {m: (opt.state[w][m].codes, opt.state[w][m].scale) for m in before}

    exact = restore(True)
    assert all(torch.equal(exact[m][0], before[m][0]) and torch.equal(exact[m][1], before[m][1]) for m in before)
    requantized = restore(False)  # negative control: why the block scales are saved
    assert not all(torch.equal(requantized[m][1], before[m][1]) for m in before)


def test_uint8_moments_run_resumes_bit_for_bit(hf, tmp_path, monkeypatch) -> None:
    import torch

    from nvlcore.checkpoint import open_checkpoint
    from nvlcore.training.lean_adam import LeanAdamW

    monkeypatch.setattr(LeanAdamW, "min_quantized_size", 1024)  # the tiny model's matrices: 1,024 to 2,048 values
    whole, resumed, lines = tmp_path / "whole", tmp_path / "resumed", []
    _train(hf, *SHORT, *INT8, f"checkpoint.save={whole}", lines=lines)
    ckpt = open_checkpoint(whole / "iter_0000004")
    keys = ckpt.keys("optimizer")
    assert any(k.endswith(".exp_avg.block_scale") for k in keys) and any(k.endswith(".exp_avg") for k in keys)
    held = int(next(x for x in lines if "optimizer state held" in x).split("[")[1].split("]")[0])
    fp32_bytes = sum(v.numel() * 4 for k, v in ckpt.load(state="optimizer").items() if "block_scale" not in k)
    assert held < 0.4 * fp32_bytes, (held, fp32_bytes)
    _train(hf, *SHORT, *INT8, f"checkpoint.save={resumed}", f"checkpoint.load={whole / 'iter_0000004'}")
    a, b = _losses(whole), _losses(resumed)
    assert sorted(b) == [5, 6, 7, 8]
    assert all(a[i] == b[i] for i in b), (a, b)
    end_a, end_b = (open_checkpoint(d / "iter_0000008").load(state="optimizer") for d in (whole, resumed))
    assert end_a.keys() == end_b.keys() and all(torch.equal(end_a[k], end_b[k]) for k in end_a)


@pytest.mark.parametrize("override, needle", [
    ("optimizer.exp_avg_dtype=torch.float16", "optimizer.exp_avg_dtype='torch.float16' is not supported by nvl"),
    ("optimizer.exp_avg_sq_dtype=torch.float16", "optimizer.exp_avg_sq_dtype='torch.float16' is not supported"),
    ("optimizer.main_params_dtype=torch.float16", "optimizer.main_params_dtype='torch.float16' is not supported"),
    ("optimizer.main_grads_dtype=torch.bfloat16", "needs optimizer.use_precision_aware_optimizer=true"),
    ("optimizer.optimizer_cpu_offload=true", "needs optimizer.optimizer_offload_fraction in (0, 1]"),
    ("optimizer.optimizer_offload_fraction=0.5", "has no effect without optimizer.optimizer_cpu_offload=true"),
    ("optimizer.exp_avg_dtype=torch.bfloat16", "needs optimizer.use_precision_aware_optimizer=true"),
])
def test_unimplemented_values_are_refused_at_load_in_one_line(override: str, needle: str) -> None:
    from nvlcore.config import ConfigError, load_config

    with pytest.raises(ConfigError) as err:
        load_config([], [override])
    assert needle in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_host_offload_with_lean_moments_is_refused() -> None:
    from nvlcore.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="optimizer_cpu_offload=true works with optimizer.optimizer=adam and fp32"):
        load_config([], [*BF16, "optimizer.optimizer_cpu_offload=true", "optimizer.optimizer_offload_fraction=0.5"])


OFFLOAD = ["optimizer.optimizer_cpu_offload=true", "optimizer.optimizer_offload_fraction=0.5"]


def test_host_offload_matches_torch_adamw_bitwise_and_keeps_that_share_of_the_state_on_the_host() -> None:
    import torch

    from nvlcore.training.host_offload import HostOffloadAdamW

    kw = {"lr": 1e-2, "betas": (0.9, 0.95), "eps": 1e-8}
    _, w_ref, b_ref = _steps(lambda g: torch.optim.AdamW(g, foreach=True, **kw))
    opt, w, b = _steps(lambda g: HostOffloadAdamW(g, offload_fraction=0.5, **kw))
    assert torch.equal(w, w_ref) and torch.equal(b, b_ref)
    (pw, pb) = [p for g in opt.param_groups for p in g["params"]]
    assert list(opt.host_of) == [pw]  # the first half of the values: the matrix
    assert opt.state[pw] is opt.host_opt.state[opt.host_of[pw]] and opt.state[pb] is opt.device_opt.state[pb]


def test_host_offload_run_matches_the_plain_run_and_resumes_bit_for_bit(hf, tmp_path) -> None:
    plain, whole, resumed, lines = tmp_path / "plain", tmp_path / "whole", tmp_path / "resumed", []
    _train(hf, *SHORT, f"checkpoint.save={plain}")
    _train(hf, *SHORT, *OFFLOAD, f"checkpoint.save={whole}", lines=lines)
    assert any("state of 50% of the parameter values in host memory" in x for x in lines), lines
    _train(hf, *SHORT, *OFFLOAD, f"checkpoint.save={resumed}", f"checkpoint.load={whole / 'iter_0000004'}")
    a, b, c = _losses(plain), _losses(whole), _losses(resumed)
    assert a == b, (a, b)
    assert sorted(c) == [5, 6, 7, 8] and all(b[i] == c[i] for i in c), (b, c)


def test_precision_aware_optimizer_with_sgd_is_refused() -> None:
    from nvlcore.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="needs optimizer.optimizer=adam"):
        load_config([], ["optimizer.optimizer=sgd", *BF16])


@pytest.mark.slow
@pytest.mark.distributed
def test_bf16_moments_under_the_distributed_optimizer_resume_bit_for_bit(hf, tmp_path) -> None:
    """Two gloo ranks, the state sharded over them (ZeroRedundancyOptimizer around the lean AdamW): the run
    resumes to the uninterrupted losses."""
    moments = BF16
    from dist_worker import train

    from nvl_dist_testing import run_distributed

    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    lines = run_distributed(train, 2, str(hf), [*SHORT, *moments, f"checkpoint.save={whole}"])[0]
    assert any("state sharded over 2 data-parallel ranks" in x for x in lines), lines
    run_distributed(train, 2, str(hf), [*SHORT, *moments, f"checkpoint.save={resumed}",
                                        f"checkpoint.load={whole / 'iter_0000004'}"])
    a, b = _losses(whole), _losses(resumed)
    assert sorted(b) == [5, 6, 7, 8] and all(a[i] == b[i] for i in b), (a, b)


def test_block_scales_of_another_layout_are_not_trusted() -> None:
    """After a tensor-parallel change a block of the new layout spans values of several saved blocks: the
    moment is then quantized afresh from its fp32 values (no value clipped to a foreign block's scale)."""
    import torch

    from nvlcore.training.lean_adam import BLOCK_SCALE, LeanAdamW, export_moment

    opt, _, _ = _steps(lambda g: LeanAdamW(g, exp_avg_dtype=torch.uint8, exp_avg_sq_dtype=torch.uint8, lr=1e-2))
    w = opt.param_groups[0]["params"][0]
    saved = export_moment(opt.state[w]["exp_avg"])
    shifted = saved[BLOCK_SCALE].flatten().roll(100).view_as(saved[""])  # blocks that straddle two saved ones
    opt.state[w]["exp_avg"] = saved[""].clone()
    opt.adopt_fp32_moments({w: {"exp_avg": shifted}})
    fresh = opt.state[w]["exp_avg"].dequantize()
    torch.testing.assert_close(fresh, saved[""], rtol=0.05, atol=1e-3)


def test_lean_and_host_offload_optimizers_on_cuda_match_torch_adamw() -> None:
    """GPU path: torchao's compiled update and the host/device split, against torch's fused AdamW."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from nvlcore.training.host_offload import HostOffloadAdamW
    from nvlcore.training.lean_adam import LeanAdamW

    def run(make):
        g = torch.Generator().manual_seed(0)
        w = torch.nn.Parameter(torch.randn(64, 128, generator=g).cuda())
        b = torch.nn.Parameter(torch.randn(128, generator=g).cuda())
        opt = make([{"params": [w], "weight_decay": 0.1}, {"params": [b], "weight_decay": 0.0}])
        for _ in range(5):
            w.grad, b.grad = torch.randn(w.shape, generator=g).cuda(), torch.randn(b.shape, generator=g).cuda()
            opt.step()
        return opt, w.detach().cpu(), b.detach().cpu()

    kw = {"lr": 1e-2, "betas": (0.9, 0.95), "eps": 1e-8}
    _, w_ref, b_ref = run(lambda g: torch.optim.AdamW(g, fused=True, **kw))
    opt, w, b = run(lambda g: HostOffloadAdamW(g, offload_fraction=0.5, **kw))
    assert opt.state[opt.param_groups[0]["params"][0]]["exp_avg"].device.type == "cpu"
    torch.testing.assert_close(w, w_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(b, b_ref, rtol=1e-6, atol=1e-6)
    for dt, tol in ((torch.bfloat16, 5e-4), (torch.uint8, 5e-3)):
        _, w, b = run(lambda g, dt=dt: LeanAdamW(g, exp_avg_dtype=dt, exp_avg_sq_dtype=dt, **kw))
        torch.testing.assert_close(w, w_ref, rtol=0, atol=tol)
