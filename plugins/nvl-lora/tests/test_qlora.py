"""QLoRA (``peft.base_dtype=nf4``) and what stays fp32 in a frozen base, on the tiny Nemotron VL toy.

The fast tests run in-process; the slow ones run ``nvl finetune`` / ``nvl peft merge`` / ``nvl convert
export`` / ``nvl generate`` as a user does.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

pytest.importorskip("nvl_nemotron_vl.model")
pytest.importorskip("torchao")

from nvl_lora import qlora  # noqa: E402
from nvl_lora.config import LoRAConfig  # noqa: E402
from nvl_lora.method import LoRAMethod, apply_lora, merge_lora  # noqa: E402
from nvl_lora.state import gather_adapter_state, load_adapter_state  # noqa: E402
from nvlcore.training.optim import describe_storage, is_packed, memory_plan, store_frozen_in_  # noqa: E402

TARGETS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2", "in_proj", "out_proj")
NVL = [sys.executable, "-m", "nvlcore"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "NVL_DEVICE": "cpu"}


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from nvl_nemotron_vl.toy import write_toy_checkpoint

    return Path(write_toy_checkpoint(tmp_path_factory.mktemp("toy") / "tiny", "tiny", seed=7))


def build(toy: Path):
    from nvl_nemotron_vl.bridge import NemotronVLBridge

    bridge = NemotronVLBridge.from_hf_dir(toy)
    return bridge, bridge.build_model(dtype=torch.float32, device="cpu", load_weights=True)


def inputs(cfg) -> tuple[torch.Tensor, torch.Tensor]:
    """Two rows of random text tokens; row 0 carries one image tile."""
    ids = torch.randint(0, cfg.llm.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    specials = [t for t in (cfg.img_context_token_id, cfg.video_context_token_id) if t is not None]
    ids[torch.isin(ids, torch.tensor(specials))] = 1
    ids[0, 1 : 1 + cfg.num_image_token] = cfg.img_context_token_id
    pix = torch.randn(1, 3, cfg.force_image_size, cfg.force_image_size, generator=torch.Generator().manual_seed(2))
    return ids, pix


def adapted(toy: Path, cfg: LoRAConfig, storage: str, keep: bool = True, dora: bool = False):
    """The toy with adapters (non-zero B), its frozen base stored as ``storage``: ``fp32`` (a CPU run),
    ``bf16`` (a GPU run's autocast storage) or ``nf4`` (QLoRA, then bf16 for the rest, as on a GPU).
    ``keep=False`` is the storage before the bridge's fp32 rule (every frozen tensor rounded)."""
    bridge, model = build(toy)
    from nvl_lora.dora import DORA

    apply_lora(model, cfg, bridge=bridge, variant=DORA if dora else None)
    state = {k: v + 0.05 * torch.randn(v.shape, generator=torch.Generator().manual_seed(0))
             for k, v in gather_adapter_state(model).items()}
    load_adapter_state(model, state)
    if storage == "nf4":
        method = LoRAMethod(cfg.to_dict() | {"base_dtype": "nf4"})
        method.store_frozen_base(model, bridge=bridge, compute_dtype=torch.bfloat16, device="cpu")
    if storage in ("bf16", "nf4"):
        store_frozen_in_(model, torch.bfloat16, keep_fp32=bridge.keeps_fp32 if keep else None)
    return bridge, model, state


def deployed(toy: Path, cfg: LoRAConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What `nvl peft merge` writes: the checkpoint's (fp32) base with the adapters folded in."""
    bridge, model = build(toy)
    apply_lora(model, cfg, bridge=bridge)
    load_adapter_state(model, state)
    merge_lora(model)
    return {n: p.detach() for n, p in model.named_parameters()}


def check_trained_base_is_deployed_base(bridge, model: nn.Module, merged: dict[str, torch.Tensor]) -> list[str]:
    """Every frozen tensor the bridge keeps fp32 is fp32 in training and equal, bit for bit, to the
    merged weights; returns their names."""
    kept = [n for n, p in model.named_parameters() if not p.requires_grad and bridge.keeps_fp32(n, p)]
    for n in kept:
        p = dict(model.named_parameters())[n]
        assert p.dtype == torch.float32, (n, p.dtype)
        assert torch.equal(p.detach(), merged[n]), n
    return kept


@pytest.mark.parametrize("storage", ["fp32", "bf16", "nf4"])
def test_per_head_parameters_and_norms_stay_fp32_and_equal_the_deployed_base(toy: Path, storage: str) -> None:
    cfg = LoRAConfig(target_modules=TARGETS, dim=4, alpha=8)
    bridge, model, state = adapted(toy, cfg, storage)
    merged = deployed(toy, cfg, state)
    kept = check_trained_base_is_deployed_base(bridge, model, merged)
    leaves = {n.rsplit(".", 1)[-1] for n in kept}
    assert {"A_log", "D", "dt_bias", "layer_norm_weight"} <= leaves, leaves
    assert "language_model.decoder.final_norm.weight" in kept
    assert any(n.endswith("mixer.norm.weight") for n in kept)
    frozen_linear = dict(model.named_parameters())["language_model.decoder.layers.0.mixer.in_proj.weight"]
    assert {"fp32": torch.float32, "bf16": torch.bfloat16, "nf4": torch.bfloat16}[storage] == frozen_linear.dtype
    assert is_packed(frozen_linear) == (storage == "nf4")
    with torch.no_grad():  # the stored model still runs
        assert torch.isfinite(model.forward_inference(*inputs(bridge.config))).all()
    if storage != "fp32":  # negative control: the old storage rounded them, and the check sees it
        bridge, old, _ = adapted(toy, cfg, storage, keep=False)
        with pytest.raises(AssertionError):
            check_trained_base_is_deployed_base(bridge, old, merged)


def test_nf4_stores_every_frozen_linear_and_trains_only_the_adapters(toy: Path) -> None:
    cfg = LoRAConfig(target_modules=TARGETS, dim=4, alpha=8)
    bridge, ref, _ = adapted(toy, cfg, "fp32")
    _, model, _ = adapted(toy, cfg, "nf4")
    names = [n for n, _ in ref.named_parameters()]
    assert [n for n, _ in model.named_parameters()] == names  # checkpoint names unchanged
    params = dict(model.named_parameters())
    packed = [n for n, p in params.items() if is_packed(p)]
    # every frozen linear of the language model (the vision tower is frozen too: LoRAConfig's default)
    assert "language_model.decoder.layers.0.mixer.in_proj.weight" in packed
    # but the output layer, which the bridge keeps in the compute dtype (the chunked loss would dequantize it
    # once per chunk)
    assert "language_model.output_layer.weight" not in packed
    assert params["language_model.output_layer.weight"].dtype in (torch.bfloat16, torch.float32)
    assert "vision_model.decoder.layers.0.mlp.linear_fc1.weight" in packed
    assert not any(".adapter." in n or params[n].requires_grad for n in packed)
    assert params["language_model.decoder.layers.0.mixer.in_proj.weight"].tensor_model_parallel  # TP attrs kept
    plan_q, plan_ref = memory_plan(model), memory_plan(ref)
    assert plan_q.frozen_bytes < 0.3 * plan_ref.frozen_bytes, (plan_q, plan_ref)
    assert "NF4Tensor" in describe_storage(model)
    ids, pix = inputs(bridge.config)
    labels = torch.roll(ids, -1, 1)
    losses = {}
    for label, m in (("ref", ref), ("nf4", model)):
        m.train()
        out = m(ids, labels=labels, pixel_values=pix)
        loss = out.float().mean() if isinstance(out, torch.Tensor) else out["loss"].mean()
        loss.backward()
        losses[label] = loss.item()
        grads = [n for n, p in m.named_parameters() if p.grad is not None]
        assert grads and all(".adapter." in n for n in grads), grads[:5]
    # NF4 moves the loss a little (the base is 4-bit), not a lot
    assert abs(losses["nf4"] - losses["ref"]) < 0.05 * abs(losses["ref"]), losses


def test_dora_on_an_nf4_base_runs_and_differs_from_lora(toy: Path) -> None:
    cfg = LoRAConfig(target_modules=("linear_qkv",), dim=4, alpha=8)
    bridge, model, _ = adapted(toy, cfg, "nf4", dora=True)
    ids, pix = inputs(bridge.config)
    with torch.no_grad():
        y = model.forward_inference(ids, pix)
    assert torch.isfinite(y).all()


def test_shapes_nf4_cannot_block_stay_in_the_compute_dtype_and_are_named() -> None:
    assert qlora.scaler_block_for(64 * 256 * 3) == 256 and qlora.scaler_block_for(64 * 24) == 8
    assert qlora.scaler_block_for(100) is None
    model = nn.Sequential(nn.Linear(64, 32), nn.Linear(32, 3))
    model.requires_grad_(False)
    x = torch.randn(4, 64)
    want = model(x)
    report = qlora.quantize_frozen_linears(model)
    assert report.quantized == ["0"] and report.kept == ["1"]
    assert "kept in the compute dtype" in report.notes()[0] and report.notes()[0].endswith(": 1")
    assert is_packed(model[0].weight) and not is_packed(model[1].weight)
    torch.testing.assert_close(model(x), want, atol=0.1, rtol=0)  # a plain nn.Linear dispatches to NF4's linear


def test_refusals_name_the_option(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="peft.base_dtype must be nf4 or null"):
        LoRAConfig(base_dtype="int4")
    qlora.check_device("cpu")  # torchao's NF4 runs on a CPU
    def unsupported(*args, **kwargs):  # what a device without NF4 kernels does
        raise RuntimeError("no kernel image is available for execution on the device\nmore detail")

    with monkeypatch.context() as m:
        m.setattr(qlora, "nf4_api", lambda: (unsupported, unsupported))
        with pytest.raises(ValueError, match="peft.base_dtype=nf4: torchao's NF4 cannot run on cpu") as exc:
            qlora.check_device("cpu")
    assert "\n" not in str(exc.value) and "no kernel image" in str(exc.value)
    qlora.nf4_api.cache_clear()
    monkeypatch.setitem(sys.modules, "torchao.quantization.quantize_.workflows.nf4.nf4_tensor", None)
    try:
        with pytest.raises(ValueError, match=r"pip install 'nvl-lora\[qlora\]'") as exc:
            LoRAMethod({"base_dtype": "nf4"}).store_frozen_base(nn.Linear(64, 64), device="cpu")
        assert "\n" not in str(exc.value)
    finally:
        monkeypatch.undo()
        qlora.nf4_api.cache_clear()


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("plant", ["", "no_dgrad_allreduce"])
def test_tensor_parallel_nf4_matches_its_dequantised_shards(plant: str) -> None:
    """Each rank quantises its own shard; at TP=2 the NF4 layers compute what Megatron's layers compute
    with the dequantised shards, gradients included (a planted missing all-reduce must fail)."""
    from lora_testing import run_distributed
    from qlora_testing import qlora_tp_worker

    results = run_distributed(qlora_tp_worker, 2, plant)
    mismatch = False
    for r in results:
        nf4, ref = r["nf4"], r["dequantized"]
        assert len(nf4["quantized"]) == 7 and "language_model.mixer.in_proj.weight" in nf4["tp_marked"]
        torch.testing.assert_close(nf4["y"], ref["y"], rtol=1e-5, atol=1e-6)
        for k in ref["grads"]:
            mismatch |= not torch.allclose(nf4["grads"][k], ref["grads"][k], rtol=1e-5, atol=1e-6)
    assert mismatch == (plant == "no_dgrad_allreduce")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_nf4_shrinks_the_frozen_weights_on_the_gpu() -> None:
    layer = nn.Linear(4096, 4096, bias=False, device="cuda", dtype=torch.bfloat16).requires_grad_(False)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    dense = layer.weight.numel() * 2
    qlora.quantize_frozen_linears(nn.Sequential(layer), compute_dtype=torch.bfloat16)
    torch.cuda.synchronize()
    freed = before - torch.cuda.memory_allocated()
    assert freed > 0.7 * dense, (freed, dense)  # 4 bits + scales: ~0.27 of bf16's bytes remain
    y = layer(torch.randn(8, 4096, device="cuda", dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_host_built_base_is_quantized_onto_the_gpu_one_weight_at_a_time() -> None:
    """``model.use_cpu_initialization``: the bf16 base stays in host memory; the GPU receives NF4 weights only.

    The GPU's peak over the start is the NF4 weights (~0.28 of bf16's bytes) plus one layer in bf16 plus
    torchao's quantizer temporaries, which are per 1M-value chunk (~0.1 GB whatever the layer: visit J saw
    0.10 GB over a 67 MB toy); the base is large enough (1.07 GB in bf16) that holding it whole would show."""
    layers = nn.Sequential(*[nn.Linear(4096, 4096, bias=False, device="meta") for _ in range(32)])
    g = torch.Generator().manual_seed(0)
    for layer in layers:
        layer.weight = nn.Parameter(torch.randn(4096, 4096, generator=g).to(torch.bfloat16) / 64)
    layers.requires_grad_(False)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    qlora.quantize_frozen_linears(layers, compute_dtype=torch.bfloat16, device="cuda")
    torch.cuda.synchronize()
    dense = sum(p.numel() * 2 for p in layers.parameters())
    assert all(p.device.type == "cuda" for p in layers.parameters())
    assert torch.cuda.max_memory_allocated() - before < 0.5 * dense  # never the whole bf16 base at once
    y = layers(torch.randn(4, 4096, device="cuda", dtype=torch.bfloat16))
    assert torch.isfinite(y).all()


# ------------------------------------------------------------------------------ as a user runs it
def nvl(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run([*NVL, *map(str, args)], capture_output=True, text=True, timeout=timeout, env=ENV)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


ITERS = 24
TRAIN = ["dataset.maker_name=synthetic_shapes", "dataset.num_workers=0", "dataset.seq_length=384",
         "model.seq_length=384", "model.tensor_model_parallel_size=1", "train.global_batch_size=2",
         f"train.train_iters={ITERS}", f"checkpoint.save_interval={ITERS}", "logger.log_interval=1",
         "optimizer.lr=5e-3", "scheduler.lr_warmup_iters=1", "peft.dim=4", "peft.alpha=8"]


@pytest.fixture(scope="module")
def runs(toy: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, str]]:
    root = tmp_path_factory.mktemp("qlora")
    nvl("convert", "import", "--hf-model", toy, "--megatron-path", root / "base", "--dtype", "float32", "--no-progress")
    out = {}
    for label, extra in (("lora", []), ("qlora", ["peft.base_dtype=nf4"])):
        proc = nvl("finetune", "--hf-model-path", toy, "--pretrained-checkpoint", root / "base",
                   "--lora-on-language-model", *TRAIN, *extra, f"checkpoint.save={root / label}")
        out[label] = (root / label, proc.stdout)
    return out


def losses(run: Path) -> list[float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in sorted(rows, key=lambda r: r["iteration"]) if "loss" in r]


@pytest.mark.slow
def test_qlora_loss_falls_and_tracks_plain_lora(runs) -> None:
    """Over 24 steps on the toy: QLoRA's loss falls, and its curve stays within 0.02 (mean absolute
    difference) of LoRA's on the same data, with no step more than 0.06 apart. Measured: 0.010 and
    0.037; with a planted 10% error in the NF4 matmul's output (the negative control, run by hand):
    0.032 and 0.078."""
    (lora, _), (qlora_run, stdout) = runs["lora"], runs["qlora"]
    assert "frozen base storage: " in stdout and "NF4Tensor" in stdout and "frozen linear weights in NF4" in stdout
    a, b = losses(lora), losses(qlora_run)
    assert len(a) == len(b) == ITERS
    assert sum(b[-4:]) / 4 < sum(b[:4]) / 4 - 0.2, b
    diff = [abs(x - y) for x, y in zip(a, b, strict=True)]
    assert sum(diff) / len(diff) < 0.02 and max(diff) < 0.06, diff


@pytest.mark.slow
def test_qlora_adapter_merges_exports_and_generates(runs, toy: Path, tmp_path: Path) -> None:
    from nvlcore.checkpoint import open_checkpoint

    run, _ = runs["qlora"]
    keys = open_checkpoint(run).keys()
    assert not any(k.startswith("language_model.") and ".adapter." not in k for k in keys)  # no NF4 base saved
    nvl("peft", "merge", "--hf-model-path", toy, "--lora-checkpoint", run, "--output", tmp_path / "merged")
    nvl("convert", "export", "--hf-model", toy, "--megatron-path", tmp_path / "merged", "--hf-path", tmp_path / "hf")
    from PIL import Image

    image = tmp_path / "red.png"
    Image.new("RGB", (64, 64), (200, 30, 30)).save(image)
    common = ["generate", "--image-path", image, "--prompt", "What shape is it?", "--max-new-tokens", "6", "--json"]
    merged = json.loads(nvl(*common, "--hf-model-path", tmp_path / "hf").stdout)["token_ids"]
    unmerged = json.loads(nvl(*common, "--hf-model-path", toy, "--lora-checkpoint", run).stdout)["token_ids"]
    assert merged and merged == unmerged  # the exported model answers as the adapter over its (fp32) base does
    peft_out = tmp_path / "adapter"
    nvl("export", "--format", "hf-peft", "--lora-checkpoint", run, "--hf-model-path", toy, "--output", peft_out)
    assert json.loads((peft_out / "adapter_config.json").read_text())["r"] == 4


@pytest.mark.slow
def test_qlora_resume_requantises_the_base_and_reproduces_the_losses(runs, toy: Path, tmp_path: Path) -> None:
    """Adapter-only checkpoints: resuming loads the base again and quantises it to the same NF4 values."""
    import shutil

    base = runs["lora"][0].parent / "base"
    args = ["finetune", "--hf-model-path", toy, "--pretrained-checkpoint", base, "--lora-on-language-model",
            *[a for a in TRAIN if not a.startswith(("train.train_iters", "checkpoint.save_interval"))],
            "train.train_iters=6", "checkpoint.save_interval=3", "peft.base_dtype=nf4"]
    nvl(*args, f"checkpoint.save={tmp_path / 'full'}")
    (tmp_path / "part").mkdir()
    shutil.copytree(tmp_path / "full" / "iter_0000003", tmp_path / "part" / "iter_0000003")
    proc = nvl(*args, f"checkpoint.save={tmp_path / 'part'}")
    assert "resumed at iteration 3" in proc.stdout and "frozen linear weights in NF4" in proc.stdout
    full, part = losses(tmp_path / "full"), losses(tmp_path / "part")
    assert len(part) == 3
    torch.testing.assert_close(torch.tensor(part), torch.tensor(full[3:]), rtol=0, atol=1e-6)


def _swapped_nibbles(w, dtype):  # the planted bug: low nibble first
    t = w.nf4
    absmax = (w.quantized_scalers.view(-1, w.scaler_block_size) / w.quantization_factor.unsqueeze(-1)).flatten()
    absmax = absmax.to(t.dtype) + w.scaler_mean
    pairs = torch.stack((t[(w.quantized_data & 0xF).int()], t[(w.quantized_data >> 4).int()]), dim=-1)
    return (pairs.view(-1, w.block_size) * absmax.unsqueeze(-1)).to(dtype).view(w.shape)


@pytest.mark.parametrize("store", [torch.float32, torch.bfloat16])
def test_our_nf4_decode_equals_torchaos_bit_for_bit(store: torch.dtype) -> None:
    """:func:`qlora.dequantize_nf4` (the matmul's decode) against torchao's own ``get_original_weight``, for a
    layer whose block count takes a smaller double-quantisation group, and a planted nibble swap that must fail."""
    g = torch.Generator().manual_seed(5)
    for shape in ((128, 256), (192, 96)):
        src = torch.randn(*shape, generator=g).to(store)
        w = qlora.nf4_api()[0](src, qlora.NF4_BLOCK, qlora.scaler_block_for(src.numel()))
        for dtype in (store, torch.float32):
            ref = w.get_original_weight().to(dtype)
            assert torch.equal(qlora.dequantize_nf4(w, dtype), ref)
            assert not torch.equal(_swapped_nibbles(w, dtype), ref)


def test_nf4_linear_matches_torchaos_linear_and_its_input_gradient() -> None:
    to_nf4, torchao_linear = qlora.nf4_api()
    w = to_nf4(torch.randn(64, 128, generator=torch.Generator().manual_seed(6)), qlora.NF4_BLOCK, 32)
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(7), requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    y, y2 = qlora.linear_nf4(x, w), torchao_linear(x2, w)
    y.square().sum().backward()
    y2.square().sum().backward()
    assert torch.equal(y, y2) and torch.equal(x.grad, x2.grad)
    layer = nn.Linear(128, 64, bias=True).requires_grad_(False)
    qlora.quantize_frozen_linears(nn.Sequential(layer))
    assert isinstance(layer.forward, functools.partial)  # the plain layer's matmul is ours, not torchao's eager one
    assert torch.equal(layer(x.detach()), torchao_linear(x.detach(), layer.weight) + layer.bias)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_compiled_nf4_decode_equals_torchaos_on_the_gpu() -> None:
    """The compiled decode (one kernel on a GPU) against torchao's eager one, bf16 storage as a GPU run has."""
    w = qlora.nf4_api()[0](torch.randn(5120, 2048, device="cuda", dtype=torch.bfloat16), qlora.NF4_BLOCK, 256)
    assert torch.equal(qlora.dequantize_nf4(w, torch.bfloat16), w.get_original_weight())
    assert qlora._compiled["cuda"] is not qlora._decode_nf4  # it compiled (no eager fallback)
    x = torch.randn(4, 2048, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    qlora.linear_nf4(x, w).float().square().sum().backward()
    qlora.nf4_api()[1](x2, w).float().square().sum().backward()
    assert torch.equal(x.grad, x2.grad)


def _decode_args(w: object) -> tuple:
    return (w.quantized_data, w.quantized_scalers, w.quantization_factor, w.scaler_mean, w.nf4,
            w.scaler_block_size, w.block_size, torch.bfloat16)


def test_the_compiled_nf4_decode_is_specialised_to_each_shape_past_torchs_recompile_limit() -> None:
    """The GPU's compiled decode, built the same way on the CPU: more weight shapes than torch's default
    recompile limit (8) each compile to a kernel with no runtime size argument (the divisions of every element's
    index by the block sizes are by constants) and decode exactly as torchao does; the dynamic-size compile
    (visit L's slow kernel) has them, as a negative control."""
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    limit = torch._dynamo.config.recompile_limit
    # Torch's own patch restores the limit, pass or fail. Not pytest's monkeypatch: the config module keeps its
    # values outside __dict__, so monkeypatch's undo deletes the key and hides it from every later compile.
    with torch._dynamo.config.patch(recompile_limit=limit):
        decode = qlora.compile_decode()
        assert torch._dynamo.config.recompile_limit == max(limit, qlora.DECODE_SHAPES)
        _check_each_shape_compiles_to_constant_sizes(decode)
    assert torch._dynamo.config.recompile_limit == limit
    torch._dynamo.reset()
    dynamic = torch.compile(qlora._decode_nf4, dynamic=True, fullgraph=True)
    w = qlora.nf4_api()[0](torch.randn(512, 128), qlora.NF4_BLOCK, qlora.scaler_block_for(512 * 128))
    _, code = run_and_get_code(dynamic, *_decode_args(w))
    assert "ks0" in "\n".join(code)
    torch._dynamo.reset()


def _check_each_shape_compiles_to_constant_sizes(decode) -> None:
    from torch._inductor.utils import run_and_get_code

    shapes = [(256 * (i + 1), 128) for i in range(9)] + [(384, 64)]  # the last: 128-block scaler groups
    for rows, cols in shapes:
        w = qlora.nf4_api()[0](torch.randn(rows, cols), qlora.NF4_BLOCK, qlora.scaler_block_for(rows * cols))
        out, code = run_and_get_code(decode, *_decode_args(w))
        assert code, f"{rows}x{cols}: not compiled (Dynamo ran it eagerly)"
        assert "ks0" not in "\n".join(code), f"{rows}x{cols}: the kernel takes runtime sizes"
        assert torch.equal(out.view(w.shape), w.to(torch.bfloat16))
