"""Lean optimizer state (issue 22): megatron-core's precision-aware optimizer keys store Adam's moments in
bf16 (torchao's update), checkpoints keep them fp32 and a resumed run is bit-identical; the keys nvl does
not implement (8-bit / fp16 moments, fp16 masters, bf16 main grads, host offload) are refused at load."""

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
    w = torch.nn.Parameter(torch.randn(32, 48, generator=g))
    b = torch.nn.Parameter(torch.randn(48, generator=g))
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


@pytest.mark.parametrize("override, needle", [
    ("optimizer.exp_avg_dtype=torch.uint8", "optimizer.exp_avg_dtype='torch.uint8' is not supported by nvl"),
    ("optimizer.exp_avg_sq_dtype=torch.float16", "optimizer.exp_avg_sq_dtype='torch.float16' is not supported"),
    ("optimizer.main_params_dtype=torch.float16", "optimizer.main_params_dtype='torch.float16' is not supported"),
    ("optimizer.main_grads_dtype=torch.bfloat16", "optimizer.main_grads_dtype='torch.bfloat16' is not supported"),
    ("optimizer.optimizer_cpu_offload=true", "optimizer.optimizer_cpu_offload=True is not supported"),
    ("optimizer.optimizer_offload_fraction=0.5", "optimizer.optimizer_offload_fraction=0.5 is not supported"),
    ("optimizer.exp_avg_dtype=torch.bfloat16", "needs optimizer.use_precision_aware_optimizer=true"),
])
def test_unimplemented_values_are_refused_at_load_in_one_line(override: str, needle: str) -> None:
    from nvlcore.config import ConfigError, load_config

    with pytest.raises(ConfigError) as err:
        load_config([], [override])
    assert needle in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_precision_aware_optimizer_with_sgd_is_refused() -> None:
    from nvlcore.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="needs optimizer.optimizer=adam"):
        load_config([], ["optimizer.optimizer=sgd", *BF16])
