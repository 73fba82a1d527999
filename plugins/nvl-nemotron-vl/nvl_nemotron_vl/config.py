"""Model configuration read from an HF ``NemotronH_Nano_VL_V2`` directory, as data.

``config.json`` is parsed with :mod:`json`; no remote code (``configuration.py``, RADIO's ``hf_model.py``)
is imported or executed. Every value the model cannot honour is an error that names the field and the
file, so a checkpoint of a variant we do not implement fails loudly at load time instead of producing
wrong numbers.

Field names and meanings follow ``shared/reference/model-format.md`` §1.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

LAYER_CHARS = {"M": "mamba", "*": "attention", "-": "mlp"}

#: timm ViT names RADIO uses in ``vision_config.args.model`` -> (hidden, depth, heads, mlp hidden).
TIMM_VIT_SHAPES: dict[str, tuple[int, int, int, int]] = {
    "vit_tiny_patch16_224": (192, 12, 3, 768),
    "vit_small_patch16_224": (384, 12, 6, 1536),
    "vit_base_patch16_224": (768, 12, 12, 3072),
    "vit_large_patch16_224": (1024, 24, 16, 4096),
    "vit_huge_patch16_224": (1280, 32, 16, 5120),
}

#: The HF key of the RADIO cls+register tokens; its first dimension is the prefix-token count.
CLS_TOKEN_KEY = "vision_model.radio_model.model.patch_generator.cls_token.token"

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ConfigError(ValueError):
    """A config.json value this model cannot honour; the message names the file and the field."""


@dataclass(frozen=True)
class LLMConfig:
    """Nemotron-H language model (``llm_config``)."""

    hybrid_override_pattern: str
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    mamba_num_heads: int
    mamba_head_dim: int
    ssm_state_size: int
    n_groups: int
    conv_kernel: int
    chunk_size: int
    vocab_size: int
    layer_norm_epsilon: float
    use_conv_bias: bool = True
    mamba_proj_bias: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    residual_in_fp32: bool = False
    mlp_hidden_act: str = "relu2"
    mamba_hidden_act: str = "silu"
    time_step_limit: tuple[float, float] = (0.0, math.inf)
    time_step_min: float = 0.001
    time_step_max: float = 0.1
    time_step_floor: float = 1e-4
    #: The context length (prompt + generated tokens); None when config.json does not say.
    max_position_embeddings: int | None = None

    @property
    def num_layers(self) -> int:
        return len(self.hybrid_override_pattern)

    @property
    def layer_types(self) -> list[str]:
        """``"mamba" | "attention" | "mlp"`` per layer, from the pattern."""
        return [LAYER_CHARS[c] for c in self.hybrid_override_pattern]

    @property
    def mamba_d_inner(self) -> int:
        return self.mamba_num_heads * self.mamba_head_dim

    @property
    def mamba_conv_dim(self) -> int:
        return self.mamba_d_inner + 2 * self.n_groups * self.ssm_state_size


@dataclass(frozen=True)
class VisionConfig:
    """RADIO ViT (``vision_config``), reduced to what the forward pass needs."""

    hidden_size: int
    num_layers: int
    num_attention_heads: int
    intermediate_size: int
    patch_size: int
    max_grid: int  # position-embedding grid side (cpe_max_size // patch_size)
    num_prefix_tokens: int  # cls + register tokens, from the checkpoint's cls_token shape
    layer_norm_eps: float = 1e-6
    num_channels: int = 3

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclass(frozen=True)
class NemotronVLConfig:
    """Everything the training model needs, validated. Build it with :meth:`from_hf_dir`."""

    llm: LLMConfig
    vision: VisionConfig
    force_image_size: int
    patch_size: int
    downsample_ratio: float
    ps_version: str
    projector_hidden_size: int
    vit_hidden_size: int
    img_context_token_id: int
    video_context_token_id: int | None
    img_context_token: str = "<image>"
    img_start_token: str = "<img>"
    img_end_token: str = "</img>"
    video_context_token: str = "<video>"
    use_thumbnail: bool = True
    norm_mean: tuple[float, float, float] = CLIP_MEAN
    norm_std: tuple[float, float, float] = CLIP_STD
    video_pruning_rate: float = 0.0
    projector_eps: float = 1e-5
    source: str = "<memory>"
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    # ----------------------------------------------------------------------------------- derived
    @property
    def grid(self) -> int:
        """Patches per tile side (32 for 512-pixel tiles)."""
        return self.force_image_size // self.patch_size

    @property
    def num_image_token(self) -> int:
        """LM tokens per tile/frame: ``(force_image_size // patch_size)**2 * downsample_ratio**2``."""
        return int(self.grid**2 * self.downsample_ratio**2)

    @property
    def projector_input_size(self) -> int:
        return self.vit_hidden_size * int(round(1 / self.downsample_ratio)) ** 2

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("raw")
        return d

    # -------------------------------------------------------------------------------- checks
    def check_tensor_parallel(self, tp: int) -> None:
        """Refuse a tensor-parallel size that does not divide every split dimension."""
        if tp < 1:
            raise ConfigError(f"tensor_model_parallel_size must be >= 1, got {tp}")
        llm, vis = self.llm, self.vision
        checks = [
            ("llm_config.num_key_value_heads (attention KV groups)", llm.num_key_value_heads),
            ("llm_config.n_groups (Mamba groups)", llm.n_groups),
            ("llm_config.mamba_num_heads (Mamba heads)", llm.mamba_num_heads),
            ("vision_config attention heads (ViT heads)", vis.num_attention_heads),
            ("llm_config.intermediate_size (MLP hidden)", llm.intermediate_size),
            ("vision_config MLP hidden", vis.intermediate_size),
            ("projector_hidden_size", self.projector_hidden_size),
        ]
        bad = [f"{name} = {value}" for name, value in checks if value % tp]
        if bad:
            raise ConfigError(
                f"tensor_model_parallel_size={tp} does not divide {', '.join(bad)} (from {self.source}); "
                "choose a TP size that divides all of them"
            )

    # ------------------------------------------------------------------------------- reading
    @classmethod
    def from_hf_dir(cls, path: str | Path) -> NemotronVLConfig:
        """Read ``<path>/config.json`` (and the RADIO prefix-token count from the weights' header)."""
        path = Path(path)
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise ConfigError(f"{cfg_file}: no config.json; is {path} an HF model directory?")
        try:
            raw = json.loads(cfg_file.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{cfg_file}: not valid JSON ({e})") from e
        prefix = read_tensor_shape(path, CLS_TOKEN_KEY)
        return cls.from_dict(raw, source=str(cfg_file), num_prefix_tokens=None if prefix is None else prefix[0])

    @classmethod
    def from_dict(
        cls, raw: Mapping[str, Any], *, source: str = "<dict>", num_prefix_tokens: int | None = None
    ) -> NemotronVLConfig:
        r = _Reader(raw, source)
        archs = raw.get("architectures") or []
        if "NemotronH_Nano_VL_V2" not in archs:
            raise ConfigError(f"{source}: architectures={archs!r}; this bridge handles NemotronH_Nano_VL_V2")
        if "llm_config" not in raw:
            hint = " (found 'text_config': a pre-release layout)" if "text_config" in raw else ""
            raise ConfigError(f"{source}: missing field 'llm_config'{hint}")
        llm = _read_llm(_Reader(raw["llm_config"], source, "llm_config."))
        vit_hidden = r.int("vit_hidden_size", 1280)
        patch_size = r.int("patch_size", 16)
        vision = _read_vision(_Reader(raw.get("vision_config") or {}, source, "vision_config."),
                              patch_size, vit_hidden, num_prefix_tokens)
        ps_version = r.str("ps_version", "v1")
        if ps_version not in ("v1", "v2"):
            raise ConfigError(f"{source}: ps_version={ps_version!r}; only 'v1' and 'v2' pixel shuffles exist")
        ratio = r.float("downsample_ratio", 0.5)
        if ratio != 0.5:
            raise ConfigError(f"{source}: downsample_ratio={ratio}; only 0.5 (2x2 pixel shuffle) is implemented")
        size = r.int("force_image_size", 512)
        if size % patch_size or (size // patch_size) % 2:
            raise ConfigError(
                f"{source}: force_image_size={size} must be an even multiple of patch_size={patch_size}"
            )
        if vision.hidden_size != vit_hidden:
            raise ConfigError(
                f"{source}: vit_hidden_size={vit_hidden} but vision_config describes a ViT of width "
                f"{vision.hidden_size}"
            )
        out = cls(
            llm=llm,
            vision=vision,
            force_image_size=size,
            patch_size=patch_size,
            downsample_ratio=ratio,
            ps_version=ps_version,
            projector_hidden_size=r.int("projector_hidden_size", 4096),
            vit_hidden_size=vit_hidden,
            img_context_token_id=r.int("img_context_token_id"),
            video_context_token_id=r.opt_int("video_context_token_id"),
            img_context_token=r.str("img_context_token", "<image>"),
            img_start_token=r.str("img_start_token", "<img>"),
            img_end_token=r.str("img_end_token", "</img>"),
            video_context_token=r.str("video_context_token", "<video>"),
            use_thumbnail=r.bool("use_thumbnail", True),
            norm_mean=r.triple("norm_mean", CLIP_MEAN),
            norm_std=r.triple("norm_std", CLIP_STD),
            video_pruning_rate=r.float("video_pruning_rate", 0.0),
            source=source,
            raw=dict(raw),
        )
        for name in ("img_context_token_id", "video_context_token_id"):
            tok = getattr(out, name)
            if tok is not None and not 0 <= tok < llm.vocab_size:
                raise ConfigError(f"{source}: {name}={tok} is outside llm_config.vocab_size={llm.vocab_size}")
        if not 0.0 <= out.video_pruning_rate < 1.0:
            raise ConfigError(f"{source}: video_pruning_rate={out.video_pruning_rate} must be in [0, 1)")
        return out


def _read_llm(r: _Reader) -> LLMConfig:
    pattern = r.str("hybrid_override_pattern")
    bad = sorted(set(pattern) - set(LAYER_CHARS))
    if not pattern or bad:
        raise ConfigError(
            f"{r.source}: llm_config.hybrid_override_pattern={pattern!r} has characters {bad} "
            "(only 'M' Mamba2, '*' attention, '-' MLP are implemented; 'E' MoE is not)"
        )
    n_layers = r.opt_int("num_hidden_layers")
    if n_layers is not None and n_layers != len(pattern):
        raise ConfigError(
            f"{r.source}: llm_config.num_hidden_layers={n_layers} but hybrid_override_pattern has {len(pattern)} layers"
        )
    eps = r.opt_float("layer_norm_epsilon")
    if eps is None:
        eps = r.float("rms_norm_eps", 1e-5)
    limit = r.raw.get("time_step_limit", (0.0, math.inf))
    try:
        limit = (float(limit[0]), float(limit[1]))
    except (TypeError, ValueError, IndexError) as e:
        raise ConfigError(f"{r.source}: llm_config.time_step_limit={limit!r} is not a pair of numbers") from e
    if limit[0] > 0.0 or limit[1] != math.inf:
        raise ConfigError(
            f"{r.source}: llm_config.time_step_limit={list(limit)}: only the unclamped (0, inf) time step is "
            "implemented (the released model's kernels do not clamp dt)"
        )
    hidden = r.int("hidden_size")
    heads = r.int("num_attention_heads")
    kv = r.int("num_key_value_heads", heads)
    head_dim = r.opt_int("head_dim")
    if head_dim is None:
        head_dim = r.opt_int("attention_head_dim") or hidden // heads
    llm = LLMConfig(
        hybrid_override_pattern=pattern,
        hidden_size=hidden,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        head_dim=head_dim,
        intermediate_size=r.int("intermediate_size"),
        mamba_num_heads=r.int("mamba_num_heads"),
        mamba_head_dim=r.int("mamba_head_dim"),
        ssm_state_size=r.int("ssm_state_size"),
        n_groups=r.int("n_groups"),
        conv_kernel=r.int("conv_kernel", 4),
        chunk_size=r.int("chunk_size", 128),
        vocab_size=r.int("vocab_size"),
        layer_norm_epsilon=eps,
        use_conv_bias=r.bool("use_conv_bias", True),
        mamba_proj_bias=r.bool("mamba_proj_bias", r.bool("use_bias", False)),
        attention_bias=r.bool("attention_bias", False),
        mlp_bias=r.bool("mlp_bias", False),
        tie_word_embeddings=r.bool("tie_word_embeddings", False),
        residual_in_fp32=r.bool("residual_in_fp32", False),
        mlp_hidden_act=r.str("mlp_hidden_act", "relu2"),
        mamba_hidden_act=r.str("mamba_hidden_act", "silu"),
        time_step_limit=limit,
        time_step_min=r.float("time_step_min", 0.001),
        time_step_max=r.float("time_step_max", 0.1),
        time_step_floor=r.float("time_step_floor", 1e-4),
        max_position_embeddings=r.opt_int("max_position_embeddings"),
    )
    unsupported = {
        "tie_word_embeddings": (llm.tie_word_embeddings, False, "the model has a separate lm_head"),
        "mlp_hidden_act": (llm.mlp_hidden_act, "relu2", "only squared ReLU is implemented"),
        "mamba_hidden_act": (llm.mamba_hidden_act, "silu", "only SiLU is implemented"),
        "residual_in_fp32": (llm.residual_in_fp32, False, "residuals are kept in the activation dtype"),
        "mamba_proj_bias": (llm.mamba_proj_bias, False, "in_proj/out_proj have no bias in this model"),
        "attention_bias": (llm.attention_bias, False, "q/k/v/o projections have no bias"),
        "mlp_bias": (llm.mlp_bias, False, "up/down projections have no bias"),
    }
    for name, (value, wanted, why) in unsupported.items():
        if value != wanted:
            raise ConfigError(f"{r.source}: llm_config.{name}={value!r} is not supported ({why}; expected {wanted!r})")
    if heads % kv:
        raise ConfigError(f"{r.source}: llm_config.num_attention_heads={heads} is not a multiple of "
                          f"num_key_value_heads={kv}")
    if llm.mamba_num_heads % llm.n_groups:
        raise ConfigError(
            f"{r.source}: llm_config.mamba_num_heads={llm.mamba_num_heads} is not a multiple of n_groups={llm.n_groups}"
        )
    return llm


def _read_vision(r: _Reader, patch_size: int, vit_hidden: int, num_prefix_tokens: int | None) -> VisionConfig:
    args = r.raw.get("args") or {}
    model_name = args.get("model")
    named = TIMM_VIT_SHAPES.get(model_name) if model_name else None
    explicit = {k: r.raw[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads") if k in r.raw}
    if named is None and len(explicit) < 3:
        raise ConfigError(
            f"{r.source}: vision_config.args.model={model_name!r} is not a known RADIO ViT "
            f"({sorted(TIMM_VIT_SHAPES)}) and vision_config has no explicit hidden_size/num_hidden_layers/"
            "num_attention_heads"
        )
    hidden, depth, heads, mlp = named or (0, 0, 0, 0)
    if explicit:
        e_hidden = int(explicit.get("hidden_size", hidden))
        if named and (e_hidden, int(explicit.get("num_hidden_layers", depth)),
                      int(explicit.get("num_attention_heads", heads))) != (hidden, depth, heads):
            raise ConfigError(
                f"{r.source}: vision_config explicit sizes {explicit} contradict args.model={model_name!r} {named[:3]}"
            )
        hidden, depth, heads = e_hidden, int(explicit["num_hidden_layers"]), int(explicit["num_attention_heads"])
        if "intermediate_size" in r.raw:
            mlp = int(r.raw["intermediate_size"])
        else:
            mlp = int(hidden * float(r.raw.get("mlp_ratio", 4.0)))
    vpatch = int(r.raw.get("patch_size", args.get("patch_size", patch_size)))
    if vpatch != patch_size:
        raise ConfigError(f"{r.source}: vision_config.patch_size={vpatch} differs from patch_size={patch_size}")
    cpe = args.get("cpe_max_size") or r.raw.get("max_resolution") or r.raw.get("max_img_size") or 2048
    if args.get("model_norm"):
        raise ConfigError(f"{r.source}: vision_config.args.model_norm=true (a final ViT norm) is not implemented")
    if r.raw.get("vitdet_window_size"):
        raise ConfigError(f"{r.source}: vision_config.vitdet_window_size is set; windowed attention is not implemented")
    if num_prefix_tokens is None:
        # Without weights to look at, follow RADIO's own rule (cls per teacher, registers padded up to a
        # multiple). The checkpoint's cls_token shape overrides this whenever weights are present.
        n_cls = len(args.get("teachers") or [None]) if args.get("cls_token_per_teacher") else 1
        mult = int(args.get("register_multiple") or 0)
        n_reg = (mult - n_cls % mult) % mult if mult else int(args.get("cpe_num_registers") or 0)
        num_prefix_tokens = n_cls + n_reg
    if hidden % heads:
        raise ConfigError(f"{r.source}: ViT hidden {hidden} is not a multiple of its {heads} heads")
    return VisionConfig(
        hidden_size=hidden,
        num_layers=depth,
        num_attention_heads=heads,
        intermediate_size=mlp,
        patch_size=patch_size,
        max_grid=int(cpe) // patch_size,
        num_prefix_tokens=int(num_prefix_tokens),
        layer_norm_eps=float(r.raw.get("layer_norm_eps", 1e-6)),
    )


class _Reader:
    """Typed access to one JSON object with errors that name the file and the field."""

    def __init__(self, raw: Mapping[str, Any], source: str, prefix: str = "") -> None:
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{source}: {prefix.rstrip('.') or 'config'} must be a JSON object")
        self.raw, self.source, self.prefix = raw, source, prefix

    _MISSING = object()

    def _get(self, key: str, default: Any) -> Any:
        if key in self.raw and self.raw[key] is not None:
            return self.raw[key]
        if default is self._MISSING:
            raise ConfigError(f"{self.source}: missing field '{self.prefix}{key}'")
        return default

    def _bad(self, key: str, value: Any, what: str) -> ConfigError:
        return ConfigError(f"{self.source}: field '{self.prefix}{key}'={value!r} is not {what}")

    def int(self, key: str, default: Any = _MISSING) -> int:
        v = self._get(key, default)
        if isinstance(v, bool) or not isinstance(v, int):
            raise self._bad(key, v, "an integer")
        return v

    def opt_int(self, key: str) -> int | None:
        return self.int(key, None) if self.raw.get(key) is not None else None

    def float(self, key: str, default: Any = _MISSING) -> float:
        v = self._get(key, default)
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise self._bad(key, v, "a number")
        return float(v)

    def opt_float(self, key: str) -> float | None:
        return self.float(key, None) if self.raw.get(key) is not None else None

    def bool(self, key: str, default: Any = _MISSING) -> bool:
        v = self._get(key, default)
        if not isinstance(v, bool):
            raise self._bad(key, v, "true/false")
        return v

    def str(self, key: str, default: Any = _MISSING) -> str:
        v = self._get(key, default)
        if not isinstance(v, str):
            raise self._bad(key, v, "a string")
        return v

    def triple(self, key: str, default: tuple[float, float, float]) -> tuple[float, float, float]:
        v = self._get(key, default)
        if not isinstance(v, (list, tuple)) or len(v) != 3:
            raise self._bad(key, v, "a list of 3 numbers")
        return tuple(float(x) for x in v)  # type: ignore[return-value]


# ---------------------------------------------------------------------------------- safetensors
def weight_files(hf_dir: str | Path) -> list[Path]:
    """The safetensors files of an HF directory: from the index when sharded, else ``model.safetensors``."""
    hf_dir = Path(hf_dir)
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ConfigError(f"{index}: not a safetensors index (needs a 'weight_map' object): {e}") from e
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (hf_dir / f).is_file()]
        if missing:
            raise ConfigError(f"{index}: lists shard files that do not exist: {missing}")
        return [hf_dir / f for f in files]
    single = hf_dir / "model.safetensors"
    return [single] if single.is_file() else []


def read_safetensors_header(file: Path) -> dict[str, Any]:
    """The JSON header of one safetensors file (names, dtypes, shapes, offsets) without reading data.

    Checked against the file (nvlcore's reader): a truncated or corrupt file raises an error naming it.
    """
    from nvlcore.convert.safetensors_io import read_header

    return read_header(file)


def read_tensor_shape(hf_dir: str | Path, key: str) -> list[int] | None:
    """Shape of one tensor in an HF directory's weights, or None if there are no weights / no such key."""
    for file in weight_files(hf_dir):
        header = read_safetensors_header(file)
        if key in header:
            return list(header[key]["shape"])
    return None
