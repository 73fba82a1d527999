"""The smallest complete nvl model bridge: a tiny tensor-parallel vision-language model.

``TinyBridge`` subclasses :class:`nvlcore.bridge.ModelBridge` and implements its three abstract
methods (``build_model``, ``processor``, ``mapping_table``); HF loading, ``nvl convert``, training
checkpoints, freezing and LoRA layouts come from the base class on top of the mapping table. It also
overrides ``train_flops`` and the generation methods, so ``nvl convert``, ``nvl finetune`` and
``nvl generate`` all work with it (on CPU, in seconds). See docs/plugin-authors.md, "Write a model bridge".

The model is real tensor-parallel code (Megatron ``VocabParallelEmbedding``, ``ColumnParallelLinear``,
``RowParallelLinear``, vocab-parallel cross-entropy). Its "HF directory" is ``config.json``
(``architectures: ["TinyVLM"]``, ``hidden``, ``ffn``) and ``model.safetensors`` with full tensors
under the training parameter names (:func:`write_tiny_hf_dir` writes one). The tokenizer is one
character per token. Torch and megatron are imported inside functions only, as nvl requires.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

from nvlcore.bridge import ModelBridge
from nvlcore.hookspecs import hookimpl
from nvlcore.mapping import IdentityMapping, ParamMapping

VOCAB = 48
FIRST_CHAR = 8  # ids below are special: 0 pad, 1 bos, 2 eos, 3 <image>, 4 user, 5 assistant
PAD, BOS, EOS, IMAGE_ID, USER, ASSISTANT = 0, 1, 2, 3, 4, 5
PATCH = 3 * 4 * 4

#: (parameter name, TP split dim or None): every parameter of the model, in the mapping table.
PARAMETERS: tuple[tuple[str, int | None], ...] = (
    ("language_model.embedding.weight", 0),
    ("language_model.norm.weight", None), ("language_model.norm.bias", None),
    ("language_model.linear_fc1.weight", 0), ("language_model.linear_fc1.bias", 0),
    ("language_model.linear_fc2.weight", 1), ("language_model.linear_fc2.bias", None),
    ("language_model.final_norm.weight", None), ("language_model.final_norm.bias", None),
    ("language_model.output_layer.weight", 0),
    ("vision_model.weight", None), ("vision_model.bias", None),
    ("vision_projection.weight", None),
)


def _tok(text: str) -> list[int]:
    return [FIRST_CHAR + (ord(c) - 97) % (VOCAB - FIRST_CHAR) for c in text]


class TinyTokenizer:
    """One token per character (``decode`` is what generation needs)."""

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(97 + i - FIRST_CHAR) if i >= FIRST_CHAR else ("" if skip_special_tokens else f"<{i}>")
                       for i in ids)


def make_model(cfg: Mapping[str, Any], dtype: Any, device: Any) -> Any:
    """The training model over Megatron's current tensor-parallel group."""
    import torch
    from megatron.core import ModelParallelConfig, parallel_state
    from megatron.core.tensor_parallel import (
        ColumnParallelLinear,
        RowParallelLinear,
        VocabParallelEmbedding,
        vocab_parallel_cross_entropy,
    )
    from torch import nn

    tp = parallel_state.get_tensor_model_parallel_world_size()
    mp = ModelParallelConfig(tensor_model_parallel_size=tp, use_cpu_initialization=True,
                             perform_initialization=False, params_dtype=dtype)
    h, f = cfg["hidden"], cfg["ffn"]
    noinit = lambda t: None  # noqa: E731

    class Lang(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embedding = VocabParallelEmbedding(VOCAB, h, init_method=noinit, config=mp)
            self.norm = nn.LayerNorm(h, dtype=dtype)
            self.linear_fc1 = ColumnParallelLinear(h, f, config=mp, init_method=noinit, bias=True, gather_output=False)
            self.linear_fc2 = RowParallelLinear(f, h, config=mp, init_method=noinit, bias=True,
                                                input_is_parallel=True, skip_bias_add=False)
            self.final_norm = nn.LayerNorm(h, dtype=dtype)
            self.output_layer = ColumnParallelLinear(h, VOCAB, config=mp, init_method=noinit, bias=False,
                                                     gather_output=False)

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.language_model = Lang()
            self.vision_model = nn.Linear(PATCH, h, dtype=dtype)
            self.vision_projection = nn.Linear(h, h, bias=False, dtype=dtype)

        def forward(self, input_ids, labels=None, loss_mask=None, attention_mask=None, pixel_values=None, **extra):
            lm = self.language_model
            x = lm.embedding(input_ids)
            if pixel_values is not None and pixel_values.numel():
                v = self.vision_projection(torch.tanh(self.vision_model(pixel_values.flatten(1).to(x.dtype))))
                where = input_ids == IMAGE_ID
                if int(where.sum()) != v.shape[0]:
                    raise ValueError(f"{int(where.sum())} <image> tokens but {v.shape[0]} tiles")
                x = x.masked_scatter(where.unsqueeze(-1), v.to(x.dtype))
            # causal mixing (running mean over previous positions) so image tokens reach the loss
            steps = torch.arange(1, x.shape[1] + 1, device=x.device, dtype=x.dtype).view(1, -1, 1)
            x = x + x.cumsum(1) / steps
            y, _ = lm.linear_fc1(lm.norm(x))
            y, _ = lm.linear_fc2(torch.nn.functional.gelu(y))
            x = x + y
            logits, _ = lm.output_layer(lm.final_norm(x))
            if labels is None:
                return logits
            return vocab_parallel_cross_entropy(logits.float(), labels.clamp_min(0)) * (labels >= 0)

    model = Model().to(device)
    # Megatron tags TP shards only when it initialises them itself (perform_initialization=True).
    split = dict(PARAMETERS)
    for name, p in model.named_parameters():
        if split[name] is not None and getattr(p, "tensor_model_parallel", None) is None:
            p.tensor_model_parallel = True
            p.partition_dim = split[name]
            p.partition_stride = 1
    return model


def init_full(name: str, shape: tuple[int, ...], seed: int) -> Any:
    """A deterministic full (TP=1) tensor for parameter ``name``."""
    import torch

    g = torch.Generator().manual_seed((seed * 1_000_003 + sum(map(ord, name)) * 7919 + len(name)) % (2**31))
    if name.endswith("norm.weight"):
        return torch.ones(shape)
    if name.endswith(("norm.bias", ".bias")):
        return torch.zeros(shape)
    return torch.randn(shape, generator=g) * (0.5 if "embedding" in name else 0.2)


def full_shapes(hidden: int, ffn: int) -> dict[str, tuple[int, ...]]:
    return {
        "language_model.embedding.weight": (VOCAB, hidden),
        "language_model.norm.weight": (hidden,), "language_model.norm.bias": (hidden,),
        "language_model.linear_fc1.weight": (ffn, hidden), "language_model.linear_fc1.bias": (ffn,),
        "language_model.linear_fc2.weight": (hidden, ffn), "language_model.linear_fc2.bias": (hidden,),
        "language_model.final_norm.weight": (hidden,), "language_model.final_norm.bias": (hidden,),
        "language_model.output_layer.weight": (VOCAB, hidden),
        "vision_model.weight": (hidden, PATCH), "vision_model.bias": (hidden,),
        "vision_projection.weight": (hidden, hidden),
    }


class TinyProcessor:
    """Conversations -> samples -> batches (the :class:`nvlcore.contracts.Processor` contract)."""

    def __init__(self, seq_length: int = 64, pad_to_multiple_of: int | None = None) -> None:
        self.seq_length = seq_length
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, conversation: dict[str, Any], **_: Any) -> dict[str, Any]:
        import torch

        ids, mask, tiles = [BOS], [0.0], []
        for turn in conversation["conversation"]:
            role = turn["role"]
            if role == "system":
                continue
            ids.append(USER if role == "user" else ASSISTANT)
            mask.append(0.0)
            for item in turn["content"]:
                if item["type"] == "image":
                    if not isinstance(item["image"], (list, tuple)) or len(item["image"]) != PATCH:
                        raise ValueError(f"TinyVLM images are lists of {PATCH} numbers")
                    ids.append(IMAGE_ID)
                    mask.append(0.0)
                    tiles.append(torch.tensor(item["image"], dtype=torch.float32).reshape(3, 4, 4))
                elif item["type"] == "text":
                    t = _tok(item["text"])
                    ids += t
                    mask += [1.0 if role == "assistant" else 0.0] * len(t)
                else:
                    raise ValueError(f"TinyVLM reads text and images, not {item['type']!r}")
            if role == "assistant":
                ids.append(EOS)
                mask.append(1.0)
        ids, mask = ids[: self.seq_length], mask[: self.seq_length]
        # labels: the next token; the mask moves with the label it supervises.
        return {"input_ids": ids, "labels": ids[1:] + [-100], "loss_mask": mask[1:] + [0.0], "tiles": tiles}

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        L = max(len(s["input_ids"]) for s in samples)
        if self.pad_to_multiple_of:
            L = -(-L // self.pad_to_multiple_of) * self.pad_to_multiple_of
        B = len(samples)
        out = {
            "input_ids": torch.zeros(B, L, dtype=torch.long),
            "labels": torch.full((B, L), -100, dtype=torch.long),
            "loss_mask": torch.zeros(B, L),
            "attention_mask": torch.zeros(B, L, dtype=torch.long),
        }
        tiles = []
        for i, s in enumerate(samples):
            n = len(s["input_ids"])
            out["input_ids"][i, :n] = torch.tensor(s["input_ids"])
            out["labels"][i, :n] = torch.tensor(s["labels"])
            out["loss_mask"][i, :n] = torch.tensor(s["loss_mask"])
            out["attention_mask"][i, :n] = 1
            tiles += s["tiles"]
        if tiles:
            out["pixel_values"] = torch.stack(tiles)
        return out

    def prompt(self, conversation: dict[str, Any]) -> dict[str, Any]:
        """The generation prompt: the conversation's tokens and the assistant marker."""
        import torch

        s = self(conversation)
        ids = s["input_ids"] + [ASSISTANT]
        out: dict[str, Any] = {"input_ids": torch.tensor(ids, dtype=torch.long)}
        if s["tiles"]:
            out["pixel_values"] = torch.stack(s["tiles"])
        return out


class TinyBridge(ModelBridge):
    """``TinyVLM`` HF directories <-> the tiny training model."""

    name: ClassVar[str] = "tiny_vlm"
    architectures: ClassVar[tuple[str, ...]] = ("TinyVLM",)
    freeze_groups: ClassVar[Mapping[str, str]] = {
        "language_model": "language_model", "vision_model": "vision_model", "vision_projection": "vision_projection"}

    # The config is config.json as a dict (the base class's read_config).

    def build_model(self, *, dtype: Any, device: Any = None, init: str = "none", seed: int = 1234) -> Any:
        import torch
        from megatron.core import parallel_state

        model = make_model(self.config, dtype, device or "cpu")
        if init == "random":
            tp = parallel_state.get_tensor_model_parallel_world_size()
            rank = parallel_state.get_tensor_model_parallel_rank()
            with torch.no_grad():
                for n, p in model.named_parameters():
                    dim = p.partition_dim if getattr(p, "tensor_model_parallel", False) else None
                    shape = [s * (tp if i == dim else 1) for i, s in enumerate(p.shape)]
                    full = init_full(n, tuple(shape), seed)
                    p.copy_(full if dim is None else full.chunk(tp, dim=dim)[rank])
        elif init != "none":
            raise ValueError(f"init={init!r}: use 'none' or 'random'")
        return model

    def processor(self, *, seq_length: int | None = None, pad_to_multiple_of: int | None = None,
                  **options: Any) -> TinyProcessor:
        if options:
            raise ValueError(f"TinyVLM's processor has no options {sorted(options)}")
        return TinyProcessor(seq_length or 64, pad_to_multiple_of)

    def mapping_table(self) -> list[ParamMapping]:
        # HF names are the training names; each tensor is split on its TP dim.
        return [IdentityMapping(name, (name,), dim) for name, dim in PARAMETERS]

    def train_flops(self, batch: Mapping[str, Any], *, num_parameters: int = 0) -> float:
        h, f = self.config["hidden"], self.config["ffn"]
        return 6.0 * (2 * h * f + h * VOCAB) * float(batch["attention_mask"].sum())

    def generator_for_model(self, model: Any, *, device: Any = None, dtype: Any = None,
                            cuda_graph: bool | None = None, **options: Any) -> Any:
        # nvl generate / nvl eval build and load the model (weights, PEFT runs) through the core's
        # nvlcore.inference; the bridge only wraps it. TinyVLM has no generation options.
        from nvlcore.generation import Generator, NoCacheReference

        if options or cuda_graph:
            raise ValueError(
                f"model bridge {self.name!r} has no generation options {sorted(options) or ['cuda_graph']}")
        model.eval()
        device = device or next(model.parameters()).device
        decodable = NoCacheReference(lambda ids, attention_mask, **kw: model(ids, attention_mask=attention_mask, **kw))
        return Generator(decodable, TinyTokenizer(), self.processor().prompt, stop_token_ids=[EOS],
                         pad_token_id=PAD, device=device)


def write_tiny_hf_dir(out: str | Path, *, hidden: int = 32, ffn: int = 64, seed: int = 7) -> Path:
    """A TinyVLM "HF directory" with deterministic weights."""
    import json

    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps({"architectures": ["TinyVLM"], "hidden": hidden, "ffn": ffn}))
    tensors = {n: init_full(n, s, seed).contiguous() for n, s in full_shapes(hidden, ffn).items()}
    save_file(tensors, str(out / "model.safetensors"))
    return out


class TinyMaker:
    """``tiny_copy``: "copy" tasks; every third example has an image whose mean decides a letter."""

    splits: ClassVar[tuple[str, ...]] = ("train", "validation")

    def __init__(self, *, split: str = "train", num_examples: int = 64, seed: int = 0) -> None:
        self.split, self.n, self.seed = split, num_examples, seed + (0 if split == "train" else 99)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not 0 <= i < self.n:
            raise IndexError(i)
        rng = random.Random(self.seed * 100_003 + i)
        word = "".join(rng.choice("abcdefgh") for _ in range(rng.randint(3, 9)))
        content: list[dict[str, Any]] = []
        answer = word
        if i % 3 == 0:
            bright = rng.random() < 0.5
            content.append({"type": "image", "image": [0.9 if bright else -0.9] * PATCH})
            answer = ("b" if bright else "d") + word
        content.append({"type": "text", "text": "copy" + word})
        return {"conversation": [{"role": "user", "content": content},
                                 {"role": "assistant", "content": [{"type": "text", "text": answer}]}]}

    def __iter__(self):
        return (self[i] for i in range(self.n))


@hookimpl
def nvl_register_model_bridges(register: Any) -> None:
    register("tiny_vlm", TinyBridge)


@hookimpl
def nvl_register_dataset_makers(register: Any) -> None:
    register("tiny_copy", TinyMaker)
