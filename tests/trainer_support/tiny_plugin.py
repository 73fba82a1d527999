"""A tiny model bridge + dataset maker that follow nvl's contracts, for trainer tests.

The model is real tensor-parallel code (Megatron ``VocabParallelEmbedding``, ``ColumnParallelLinear``,
``RowParallelLinear``, vocab-parallel cross-entropy), so TP=2 tests exercise the same collectives as
the real bridge; it is small enough for many iterations per second on one CPU core.

"HF directory": ``config.json`` (``architectures: ["TinyVLM"]``) + ``model.safetensors`` with full
tensors under the training parameter names; each TP rank loads its slice.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, ClassVar

from nvlcore.hookspecs import hookimpl

VOCAB = 48
FIRST_CHAR = 8  # ids below are special: 0 pad, 1 bos, 2 eos, 3 <image>, 4 user, 5 assistant
IMAGE_ID = 3
PATCH = 3 * 4 * 4


def _tok(text: str) -> list[int]:
    return [FIRST_CHAR + (ord(c) - 97) % (VOCAB - FIRST_CHAR) for c in text]


class TinyVLM:
    """Namespace for the module class (built lazily so importing this file does not import torch)."""

    @staticmethod
    def make(cfg: dict[str, Any], dtype: Any, device: Any) -> Any:
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
                    v = self.vision_projection(torch.tanh(self.vision_model(pixel_values.flatten(1))))
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
        for name, p in model.named_parameters():
            if getattr(p, "tensor_model_parallel", None) is None and (
                "embedding" in name or "fc1" in name or "output_layer" in name or name.endswith("fc2.weight")
            ):
                p.tensor_model_parallel = True
                p.partition_dim = 1 if name.endswith("fc2.weight") else 0
                p.partition_stride = 1
        return model


def init_full(name: str, shape: tuple[int, ...], seed: int) -> Any:
    import torch

    g = torch.Generator().manual_seed((seed * 1_000_003 + sum(map(ord, name)) * 7919 + len(name)) % (2**31))
    if name.endswith("norm.weight"):
        return torch.ones(shape)
    if name.endswith(("norm.bias", ".bias")):
        return torch.zeros(shape)
    return torch.randn(shape, generator=g) * (0.5 if "embedding" in name else 0.2)


def full_shape(p: Any, tp: int) -> tuple[int, ...]:
    shape = list(p.shape)
    if getattr(p, "tensor_model_parallel", False):
        shape[p.partition_dim] *= tp
    return tuple(shape)


def local_slice(full: Any, p: Any, tp: int, rank: int) -> Any:
    if getattr(p, "tensor_model_parallel", False):
        return full.chunk(tp, dim=p.partition_dim)[rank]
    return full


class TinyProcessor:
    def __init__(self, seq_length: int = 64) -> None:
        self.seq_length = seq_length

    def __call__(self, conversation: dict[str, Any], **_: Any) -> dict[str, Any]:
        import torch

        ids, mask, tiles = [1], [0.0], []
        for turn in conversation["conversation"]:
            role = turn["role"]
            ids.append(4 if role == "user" else 5)
            mask.append(0.0)
            for item in turn["content"]:
                if item["type"] == "image":
                    ids.append(IMAGE_ID)
                    mask.append(0.0)
                    tiles.append(torch.tensor(item["image"], dtype=torch.float32).reshape(3, 4, 4))
                else:
                    t = _tok(item["text"])
                    ids += t
                    mask += [1.0 if role == "assistant" else 0.0] * len(t)
            if role == "assistant":
                ids.append(2)
                mask.append(1.0)
        ids, mask = ids[: self.seq_length], mask[: self.seq_length]
        # labels: the next token; the mask moves with the label it supervises.
        labels = ids[1:] + [-100]
        lmask = mask[1:] + [0.0]
        return {"input_ids": ids, "labels": labels, "loss_mask": lmask, "tiles": tiles}

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        L = max(len(s["input_ids"]) for s in samples)
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


class TinyBridge:
    name: ClassVar[str] = "tiny_vlm"
    architectures: ClassVar[tuple[str, ...]] = ("TinyVLM",)

    def __init__(self, hf_dir: Path, cfg: dict[str, Any]) -> None:
        self.hf_dir, self.cfg = hf_dir, cfg

    @classmethod
    def from_hf_dir(cls, hf_dir: Any) -> "TinyBridge":
        return cls(Path(hf_dir), json.loads((Path(hf_dir) / "config.json").read_text()))

    def build_model(self, *, dtype: Any, device: Any, init: str = "none", seed: int = 1234) -> Any:
        from megatron.core import parallel_state

        model = TinyVLM.make(self.cfg, dtype, device)
        if init == "random":
            tp = parallel_state.get_tensor_model_parallel_world_size()
            rank = parallel_state.get_tensor_model_parallel_rank()
            import torch

            with torch.no_grad():
                for n, p in model.named_parameters():
                    p.copy_(local_slice(init_full(n, full_shape(p, tp), seed), p, tp, rank))
        return model

    def load_hf_weights(self, model: Any, hf_dir: Any) -> None:
        import torch
        from megatron.core import parallel_state
        from safetensors.torch import load_file

        full = load_file(str(Path(hf_dir) / "model.safetensors"))
        tp = parallel_state.get_tensor_model_parallel_world_size()
        rank = parallel_state.get_tensor_model_parallel_rank()
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(local_slice(full[n], p, tp, rank))

    def processor(self, *, seq_length: int = 64) -> TinyProcessor:
        return TinyProcessor(seq_length)

    def recipe(self, *, peft: bool = False) -> dict[str, Any]:
        return {}

    def train_flops(self, batch: dict[str, Any]) -> float:
        h, f = self.cfg["hidden"], self.cfg["ffn"]
        n = 2 * h * f + h * VOCAB
        return 6.0 * n * float(batch["attention_mask"].sum())


def write_tiny_hf_dir(out: Path, *, hidden: int = 32, ffn: int = 64, seed: int = 7) -> Path:
    """A TinyVLM "HF directory" with deterministic weights."""
    from safetensors.torch import save_file

    cfg = {"architectures": ["TinyVLM"], "hidden": hidden, "ffn": ffn}
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg))
    shapes = {
        "language_model.embedding.weight": (VOCAB, hidden),
        "language_model.norm.weight": (hidden,), "language_model.norm.bias": (hidden,),
        "language_model.linear_fc1.weight": (ffn, hidden), "language_model.linear_fc1.bias": (ffn,),
        "language_model.linear_fc2.weight": (hidden, ffn), "language_model.linear_fc2.bias": (hidden,),
        "language_model.final_norm.weight": (hidden,), "language_model.final_norm.bias": (hidden,),
        "language_model.output_layer.weight": (VOCAB, hidden),
        "vision_model.weight": (hidden, PATCH), "vision_model.bias": (hidden,),
        "vision_projection.weight": (hidden, hidden),
    }
    save_file({n: init_full(n, s, seed).contiguous() for n, s in shapes.items()}, str(out / "model.safetensors"))
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


class TinyTrainOnly(TinyMaker):
    splits: ClassVar[tuple[str, ...]] = ("train",)


class TinyWithTest(TinyMaker):
    """``tiny_with_test``: ``tiny_copy`` with a test split too."""

    splits: ClassVar[tuple[str, ...]] = ("train", "validation", "test")


@hookimpl
def nvl_register_model_bridges(register: Any) -> None:
    register("tiny_vlm", TinyBridge)


@hookimpl
def nvl_register_dataset_makers(register: Any) -> None:
    register("tiny_copy", TinyMaker)
    register("tiny_train_only", TinyTrainOnly)
    register("tiny_with_test", TinyWithTest)


def manager() -> Any:
    """A plugin manager with the built-ins, the installed plugins and this module."""
    import sys

    from nvlcore.plugins import NvlPluginManager

    return NvlPluginManager(plugins=[("tiny_plugin", sys.modules[__name__])])
