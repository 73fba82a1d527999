"""Toy HF checkpoints of Nemotron Nano V2 VL: the real schema and key names, small (or real) sizes.

``write_toy_checkpoint(out, size=...)`` writes a complete HF directory: ``config.json`` (every field
of the real one, scaled), the toy tokenizer (``toy_tokenizer.write_toy_tokenizer``: real special tokens
and chat template), ``generation_config.json``, ``preprocessor_config.json`` and safetensors with random
weights under the real keys and dtypes (bf16; ``A_log``/``D`` and RADIO's ``input_conditioner``
buffers fp32). Weights are generated one parameter at a time in the training model's component form
and converted with :mod:`.mapping` (so the toy also exercises the mapping), then written shard by
shard: memory stays bounded by one shard, which is what makes ``12b-shape`` (~25 GB) possible.

The output appears atomically: it is written to a temporary sibling directory and renamed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import CLIP_MEAN, CLIP_STD, NemotronVLConfig

if TYPE_CHECKING:
    import torch

# Per size: LM, ViT and image geometry. num_image_token is derived: (image // 16)**2 / 4.
SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(
        llm=dict(hybrid_override_pattern="M-*-M-", hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                 head_dim=16, intermediate_size=128, mamba_num_heads=8, mamba_head_dim=16, ssm_state_size=16,
                 n_groups=2, chunk_size=8),
        vit=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, cpe_max_size=128,
                 teachers=2, register_multiple=4),
        force_image_size=64, projector_hidden_size=256, vocab="tokenizer+1", max_shard_bytes=None,
    ),
    "small": dict(
        llm=dict(hybrid_override_pattern="M-M-M*-M-M-M*-M-", hidden_size=1024, num_attention_heads=8,
                 num_key_value_heads=4, head_dim=128, intermediate_size=4096, mamba_num_heads=32, mamba_head_dim=64,
                 ssm_state_size=64, n_groups=4, chunk_size=64),
        vit=dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=8, intermediate_size=1024,
                 cpe_max_size=512, teachers=4, register_multiple=8),
        force_image_size=128, projector_hidden_size=2048, vocab=640, max_shard_bytes=64 * 2**20,
    ),
    "12b-shape": dict(
        llm=dict(hybrid_override_pattern="M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M-",
                 hidden_size=5120, num_attention_heads=40, num_key_value_heads=8, head_dim=128,
                 intermediate_size=20480, mamba_num_heads=128, mamba_head_dim=80, ssm_state_size=128, n_groups=8,
                 chunk_size=128),
        vit=dict(model="vit_huge_patch16_224", hidden_size=1280, num_hidden_layers=32, num_attention_heads=16,
                 intermediate_size=5120, cpe_max_size=2048, teachers=4, register_multiple=16),
        force_image_size=512, projector_hidden_size=20480, vocab=131072, max_shard_bytes=4 * 2**30,
    ),
}

#: Tensors written in fp32 (the rest in bf16): the SSM decay/skip scalars and RADIO's conditioner.
FP32_SUFFIXES = ("mixer.A_log", "mixer.D")


def toy_config(size: str, token_ids: dict[str, int]) -> dict[str, Any]:
    """``config.json`` contents for a toy of ``size``.

    The schema is the released checkpoint's (``NemotronH_Nano_VL_V2_Config``).
    """
    spec = SIZES[size]
    llm, vit = dict(spec["llm"]), dict(spec["vit"])
    vocab = token_ids["vocab_size"] + 1 if spec["vocab"] == "tokenizer+1" else int(spec["vocab"])
    if vocab < token_ids["vocab_size"]:
        raise ValueError(f"toy vocab {vocab} is smaller than the tokenizer ({token_ids['vocab_size']})")
    pattern = llm["hybrid_override_pattern"]
    llm_config = {
        "architectures": ["NemotronHForCausalLM"],
        "model_type": "nemotron_h",
        "hybrid_override_pattern": pattern,
        "num_hidden_layers": len(pattern),
        "hidden_size": llm["hidden_size"],
        "intermediate_size": llm["intermediate_size"],
        "num_attention_heads": llm["num_attention_heads"],
        "num_key_value_heads": llm["num_key_value_heads"],
        "head_dim": llm["head_dim"],
        "attention_head_dim": llm["head_dim"],
        "mamba_num_heads": llm["mamba_num_heads"],
        "mamba_head_dim": llm["mamba_head_dim"],
        "ssm_state_size": llm["ssm_state_size"],
        "n_groups": llm["n_groups"],
        "conv_kernel": 4,
        "chunk_size": llm["chunk_size"],
        "expand": 2,
        "mamba_hidden_act": "silu",
        "mlp_hidden_act": "relu2",
        "use_conv_bias": True,
        "use_bias": False,
        "mamba_proj_bias": False,
        "attention_bias": False,
        "mlp_bias": False,
        "layer_norm_epsilon": 1e-5,
        "rms_norm_eps": 1e-5,
        "residual_in_fp32": False,
        "tie_word_embeddings": False,
        "vocab_size": vocab,
        "max_position_embeddings": 131072,
        "time_step_min": 0.001,
        "time_step_max": 0.1,
        "time_step_floor": 1e-4,
        "time_step_limit": [0.0, float("inf")],
        "rescale_prenorm_residual": True,
        "num_logits_to_keep": 1,
        "bos_token_id": token_ids["bos"],
        "eos_token_id": token_ids["eos"],
        "pad_token_id": token_ids["pad"],
        "use_mamba_kernels": True,
        "sliding_window": None,
        "initializer_range": 0.02,
        "torch_dtype": "bfloat16",
    }
    args = {
        "model": vit.get("model", "nvl_toy_vit"),
        "cpe_max_size": vit["cpe_max_size"],
        "cls_token_per_teacher": True,
        "teachers": [{"name": f"teacher{i}", "use_summary": i < 3} for i in range(vit["teachers"])],
        "register_multiple": vit["register_multiple"],
        "model_norm": False,
    }
    vision_config = {
        "architectures": ["RADIOModel"],
        "model_type": "radio",
        "auto_map": {"AutoConfig": "nvidia/C-RADIOv2-H--hf_model.RADIOConfig",
                     "AutoModel": "nvidia/C-RADIOv2-H--hf_model.RADIOModel"},
        "version": "radio_v2.5-h",
        "patch_size": 16,
        "max_resolution": vit["cpe_max_size"],
        "preferred_resolution": [spec["force_image_size"], spec["force_image_size"]],
        "adaptor_names": None,
        "adaptor_configs": None,
        "vitdet_window_size": None,
        "feature_normalizer_config": None,
        "inter_feature_normalizer_config": None,
        "args": args,
        "torch_dtype": "bfloat16",
    }
    if "model" not in vit:  # a toy ViT: no timm name describes it, so say it explicitly
        vision_config.update(hidden_size=vit["hidden_size"], num_hidden_layers=vit["num_hidden_layers"],
                             num_attention_heads=vit["num_attention_heads"],
                             intermediate_size=vit["intermediate_size"], layer_norm_eps=1e-6)
    return {
        "architectures": ["NemotronH_Nano_VL_V2"],
        "model_type": "NemotronH_Nano_VL_V2",
        "auto_map": {"AutoConfig": "configuration.NemotronH_Nano_VL_V2_Config",
                     "AutoModel": "modeling.NemotronH_Nano_VL_V2",
                     "AutoModelForCausalLM": "modeling.NemotronH_Nano_VL_V2"},
        "torch_dtype": "bfloat16",
        "force_image_size": spec["force_image_size"],
        "patch_size": 16,
        "downsample_ratio": 0.5,
        "ps_version": "v2",
        "image_tag_type": "internvl",
        "template": "nemotron-h-5p5-reasoning",
        "vit_hidden_size": vit["hidden_size"],
        "projector_hidden_size": spec["projector_hidden_size"],
        "img_context_token_id": token_ids["<image>"],
        "video_context_token_id": token_ids["<video>"],
        "img_context_token": "<image>",
        "img_start_token": "<img>",
        "img_end_token": "</img>",
        "video_context_token": "<video>",
        "use_thumbnail": True,
        "max_num_tiles": 12,
        "norm_mean": list(CLIP_MEAN),
        "norm_std": list(CLIP_STD),
        "video_pruning_rate": 0.7,
        "max_sequence_length": 131072,
        "attn_implementation": "sdpa",
        "llm_config": llm_config,
        "vision_config": vision_config,
        "nvl_toy": {"size": size},
    }


def num_prefix_tokens(size: str) -> int:
    vit = SIZES[size]["vit"]
    m = vit["register_multiple"]
    return vit["teachers"] + (m - vit["teachers"] % m) % m


def _side_files(cfg: dict[str, Any], token_ids: dict[str, int]) -> dict[str, Any]:
    return {
        "generation_config.json": {"bos_token_id": token_ids["bos"], "eos_token_id": token_ids["eos"],
                                   "pad_token_id": token_ids["pad"], "do_sample": False},
        "preprocessor_config.json": {
            "image_processor_type": "NemotronNanoVLV2ImageProcessor",
            "processor_class": "NemotronNanoVLV2Processor",
            "image_size": cfg["force_image_size"], "max_num_tiles": 12, "use_thumbnail": True,
            "patch_size": cfg["patch_size"], "downsample_ratio": cfg["downsample_ratio"],
            "norm_mean": list(CLIP_MEAN), "norm_std": list(CLIP_STD), "do_rescale": True,
        },
    }


def meta_model(cfg: NemotronVLConfig) -> torch.nn.Module:
    """The model built on the meta device over one rank: every parameter's full shape, no memory."""
    import torch

    from .model import NemotronVLModel
    from .model.parallel import TPContext

    class _OneRank:  # a stand-in process group of size 1 (nothing is communicated on meta tensors)
        def size(self) -> int:
            return 1

        def rank(self) -> int:
            return 0

    with torch.device("meta"):
        return NemotronVLModel(cfg, TPContext(group=_OneRank(), size=1, rank=0), dtype=torch.bfloat16, device="meta")


def full_parameter_shapes(cfg: NemotronVLConfig) -> dict[str, tuple[int, ...]]:
    """Full (TP=1) shapes of every training parameter, from the model itself built on the meta device."""
    return {n: tuple(p.shape) for n, p in meta_model(cfg).named_parameters()}


def iter_toy_hf_tensors(cfg: NemotronVLConfig, seed: int, device: str = "cpu"):
    """Yield ``(hf_key, CPU tensor)`` for the whole checkpoint, one parameter group at a time.

    ``device="cuda"`` draws the random numbers on the GPU (much faster at the 12B shape; the values
    differ from a CPU draw with the same seed, as the generators differ).
    """
    import torch

    from .mapping import CARRIED_HF_KEYS, mapping_table
    from .model.init import init_tensor, seed_for

    shapes = full_parameter_shapes(cfg)
    for m in mapping_table(cfg):
        meta = torch.empty(shapes[m.megatron], device="meta")
        comps = {}
        for name, t in m.local_to_components([meta]).items():
            gen = torch.Generator(device=device).manual_seed(seed_for(seed, name))
            comps[name] = init_tensor(name, tuple(t.shape), cfg, gen, device=device)
        for key, t in m.components_to_hf(comps).items():
            dtype = torch.float32 if key.endswith(FP32_SUFFIXES) else torch.bfloat16
            yield key, t.to(dtype).contiguous().cpu()
    mean_key, std_key = CARRIED_HF_KEYS[0], CARRIED_HF_KEYS[1]
    yield mean_key, torch.tensor(cfg.norm_mean, dtype=torch.float32).view(3, 1, 1)
    yield std_key, torch.tensor(cfg.norm_std, dtype=torch.float32).view(3, 1, 1)


def write_toy_checkpoint(
    out_dir: str | Path,
    size: str = "tiny",
    *,
    seed: int = 0,
    overwrite: bool = False,
    max_shard_bytes: int | None = None,
    progress: Callable[[str], None] | None = None,
    device: str = "cpu",
) -> Path:
    """Write a toy HF directory at ``out_dir`` and return its path.

    ``max_shard_bytes`` overrides the size's shard limit (``None`` keeps it; the tiny toy is a single
    ``model.safetensors`` unless a limit is given, which tests use to exercise sharded loading).
    ``device`` is where the random numbers are drawn (see :func:`iter_toy_hf_tensors`).
    """
    from safetensors.torch import save_file

    from .toy_tokenizer import write_toy_tokenizer

    if size not in SIZES:
        raise ValueError(f"unknown toy size {size!r}; choose one of {', '.join(SIZES)}")
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    say = progress or (lambda _msg: None)
    limit = max_shard_bytes if max_shard_bytes is not None else SIZES[size]["max_shard_bytes"]
    from nvlcore.checkpoint import atomic_output_dir

    # the temporary directory records this process (a kill -9 leftover is removed by the next run),
    # Ctrl-C and SIGTERM remove it
    with atomic_output_dir(out, overwrite=overwrite, what="toy model directory") as tmp:
        token_ids = write_toy_tokenizer(tmp)
        raw = toy_config(size, token_ids)
        (tmp / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
        for name, content in _side_files(raw, token_ids).items():
            (tmp / name).write_text(json.dumps(content, indent=2) + "\n")
        cfg = NemotronVLConfig.from_dict(raw, source=str(out / "config.json"),
                                         num_prefix_tokens=num_prefix_tokens(size))

        shards: list[dict[str, Any]] = []
        current: dict[str, Any] = {}
        current_bytes = total = 0

        def flush() -> None:
            nonlocal current, current_bytes
            if current:
                name = f"shard-{len(shards):05d}.safetensors"
                save_file(current, str(tmp / name), metadata={"format": "pt"})
                shards.append({"file": name, "keys": list(current)})
                say(f"wrote shard {len(shards)} ({current_bytes / 2**20:.1f} MiB)")
            current, current_bytes = {}, 0

        from nvlcore.progress import progress_iter

        for key, t in progress_iter(iter_toy_hf_tensors(cfg, seed, device), f"toy-model {size}", unit="tensor"):
            nbytes = t.numel() * t.element_size()
            if limit is not None and current and current_bytes + nbytes > limit:
                flush()
            current[key] = t
            current_bytes += nbytes
            total += nbytes
        flush()

        if len(shards) == 1:
            os.replace(tmp / shards[0]["file"], tmp / "model.safetensors")
        else:
            weight_map = {}
            n = len(shards)
            for i, s in enumerate(shards):
                final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
                os.replace(tmp / s["file"], tmp / final)
                weight_map.update({k: final for k in s["keys"]})
            write_index(tmp, weight_map, total)
    say(f"{out}: {size} toy, {total / 2**20:.1f} MiB of weights in {len(shards)} file(s)")
    return out


def write_index(out_dir: Path, weight_map: dict[str, str], total_size: int) -> None:
    (out_dir / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}, indent=2)
    )
