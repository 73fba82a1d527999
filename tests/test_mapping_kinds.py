"""Mapping kinds are classes a bridge extends: a kind defined outside the core carries a conversion
round trip, HF loading, the TP split and the checkpoint layout, and the core never names it."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from safetensors.torch import load_file, save_file

from nvlcore.bridge import ModelBridge
from nvlcore.mapping import IdentityMapping, LocalComponent, ParamMapping

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "docs" / "examples" / "nvl-bridge-example"
FC1 = "language_model.linear_fc1.weight"


@dataclass(frozen=True)
class TransposedMapping(IdentityMapping):
    """A bridge's own kind: HF stores the weight ``[in, out]`` (as GPT-2's ``Conv1D`` does), the training
    model ``[out, in]``. Only the HF side is new; the TP split, gather and checkpoint layout are inherited."""

    kind: ClassVar[str] = "transposed"

    def hf_to_components(self, hf: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {self.megatron: self.need(hf, self.hf[0]).t().contiguous()}

    def components_to_hf(self, comps: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {self.hf[0]: self.need(comps, self.megatron).t().contiguous()}


@dataclass(frozen=True)
class LossyTransposedMapping(TransposedMapping):
    """A planted bug: export flips the rows it should only transpose back (shapes still agree)."""

    def components_to_hf(self, comps: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {self.hf[0]: self.need(comps, self.megatron).t().flip(0).contiguous()}


@dataclass(frozen=True)
class StackedMapping(ParamMapping):
    """A kind written from the base class alone: HF holds one ``[h]`` vector per name (``ln.scale``,
    ``ln.shift``), the model one ``[n, h]`` parameter whose columns TP splits; the checkpoint holds a
    component per name."""

    names: tuple[str, ...] = ()
    kind: ClassVar[str] = "stacked"
    tp_dim: ClassVar[int | None] = 1

    @property
    def components(self) -> tuple[str, ...]:
        return tuple(f"{self.megatron}.{n}" for n in self.names)

    def hf_to_components(self, hf: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {c: self.need(hf, k) for c, k in zip(self.components, self.hf, strict=True)}

    def components_to_hf(self, comps: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: self.need(comps, c) for c, k in zip(self.components, self.hf, strict=True)}

    def components_to_local(self, comps: Mapping[str, torch.Tensor], tp_size: int, tp_rank: int) -> torch.Tensor:
        return torch.stack([self.need(comps, c).chunk(tp_size)[tp_rank] for c in self.components])

    def local_to_components(self, shards: Any) -> dict[str, torch.Tensor]:
        return dict(zip(self.components, torch.cat(list(shards), dim=1).unbind(0), strict=True))

    def local_components(self, local: torch.Tensor, tp_size: int, tp_rank: int) -> list[LocalComponent]:
        return [LocalComponent(c, local[i], 0, local.shape[1] * tp_size) for i, c in enumerate(self.components)]

    def assemble_local(self, parts: Mapping[str, torch.Tensor], target: torch.Tensor, tp_size: int,
                       tp_rank: int) -> None:
        target.copy_(torch.stack([self.need(parts, c) for c in self.components]))


class StackedBridge(ModelBridge):
    """A conversion-only bridge whose whole table is the test's own kind plus one built-in."""

    name: ClassVar[str] = "stacked_test"
    architectures: ClassVar[tuple[str, ...]] = ("StackedTest",)

    def build_model(self, *, dtype: Any, device: Any = None, init: str = "none", seed: int = 1234) -> Any:
        raise NotImplementedError("the conversion-only test bridge builds no model")

    def processor(self, *, seq_length: int | None = None, pad_to_multiple_of: int | None = None,
                  **options: Any) -> Any:
        raise NotImplementedError("the conversion-only test bridge has no processor")

    def mapping_table(self) -> list[ParamMapping]:
        return [StackedMapping("ln.stacked", ("ln.scale", "ln.shift"), names=("scale", "shift")),
                IdentityMapping("proj.weight", ("proj.weight",), 0)]


def test_a_kind_written_from_the_base_class_round_trips(tmp_path: Path) -> None:
    from nvlcore.checkpoint import open_checkpoint
    from nvlcore.convert.engine import export_hf_checkpoint, import_hf_checkpoint
    from nvlcore.convert.safetensors_io import SafetensorsReader

    g = torch.Generator().manual_seed(3)
    source = {"ln.scale": torch.randn(8, generator=g), "ln.shift": torch.randn(8, generator=g),
              "proj.weight": torch.randn(4, 8, generator=g)}
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"architectures": ["StackedTest"]}))
    save_file(source, str(hf / "model.safetensors"))
    bridge = StackedBridge.from_hf_dir(hf)
    import_hf_checkpoint(bridge, hf, tmp_path / "mg", tp=2, progress=False)
    stored = open_checkpoint(tmp_path / "mg").load(["ln.stacked.scale", "ln.stacked.shift"])
    assert torch.equal(stored["ln.stacked.shift"], source["ln.shift"])
    export_hf_checkpoint(bridge, hf, tmp_path / "mg", tmp_path / "out", progress=False)
    out = SafetensorsReader(tmp_path / "out")
    back = out.read(list(out.tensors))
    assert set(back) == set(source) and all(torch.equal(back[k], t) for k, t in source.items())

    # its TP split and checkpoint layout: each rank's columns, cut per component and put back
    m = bridge.mapping_by_name()["ln.stacked"]
    comps = m.hf_to_components(source)
    local = [m.components_to_local(comps, 2, r) for r in range(2)]
    assert torch.equal(local[1], torch.stack([source["ln.scale"][4:], source["ln.shift"][4:]]))
    assert all(torch.equal(v, comps[k]) for k, v in m.local_to_components(local).items())
    for r in range(2):
        parts = {c.key: c.tensor for c in m.local_components(local[r], 2, r)}
        target = torch.full_like(local[r], float("nan"))
        m.assemble_local(parts, target, 2, r)
        assert torch.equal(target, local[r])


@pytest.fixture
def example(monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.syspath_prepend(str(EXAMPLE))
    import nvl_bridge_example

    return nvl_bridge_example


def _bridge_class(example: Any, kind: type[ParamMapping]) -> type:
    class TransposedFc1Bridge(example.TinyBridge):
        """The example bridge, except that its HF checkpoints store linear_fc1 transposed."""

        def mapping_table(self) -> list[ParamMapping]:
            return [kind(m.megatron, m.hf, m.tp_dim) if m.megatron == FC1 else m for m in super().mapping_table()]

    return TransposedFc1Bridge


def _hf_dir(example: Any, path: Path) -> Path:
    """The example's tiny HF directory with linear_fc1 stored ``[in, out]``."""
    example.write_tiny_hf_dir(path)
    tensors = load_file(str(path / "model.safetensors"))
    tensors[FC1] = tensors[FC1].t().contiguous()
    save_file(tensors, str(path / "model.safetensors"))
    return path


def _round_trip(bridge_cls: type, hf: Path, work: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    from nvlcore.checkpoint import open_checkpoint
    from nvlcore.convert.engine import export_hf_checkpoint, import_hf_checkpoint
    from nvlcore.convert.safetensors_io import SafetensorsReader

    bridge = bridge_cls.from_hf_dir(hf)
    import_hf_checkpoint(bridge, hf, work / "mg", tp=2, progress=False)
    stored = open_checkpoint(work / "mg").load([FC1])
    export_hf_checkpoint(bridge, hf, work / "mg", work / "out", progress=False)
    out = SafetensorsReader(work / "out")
    return stored, out.read(list(out.tensors))


def test_a_bridge_kind_round_trips_through_convert(example: Any, tmp_path: Path) -> None:
    hf = _hf_dir(example, tmp_path / "hf")
    source = load_file(str(hf / "model.safetensors"))
    stored, back = _round_trip(_bridge_class(example, TransposedMapping), hf, tmp_path)
    # the checkpoint holds the training layout; the export reproduces every source tensor bit for bit
    assert tuple(stored[FC1].shape) == tuple(source[FC1].t().shape)
    assert torch.equal(stored[FC1], source[FC1].t())
    assert set(back) == set(source)
    for k, t in source.items():
        assert torch.equal(back[k], t), k


def test_the_round_trip_check_catches_a_lossy_kind(example: Any, tmp_path: Path) -> None:
    hf = _hf_dir(example, tmp_path / "hf")
    source = load_file(str(hf / "model.safetensors"))
    _, back = _round_trip(_bridge_class(example, LossyTransposedMapping), hf, tmp_path)
    assert not torch.equal(back[FC1], source[FC1])


def test_a_bridge_kind_loads_splits_and_checkpoints(example: Any, tmp_path: Path) -> None:
    """HF -> TP-local at tp 2 and back, and the checkpoint entries, all through the bridge's kind."""
    from nvlcore.mapping import assemble_from_entries, checkpoint_entries, components_to_local, local_to_components

    hf = _hf_dir(example, tmp_path / "hf")
    bridge = _bridge_class(example, TransposedMapping).from_hf_dir(hf)
    table = bridge.mapping_table()
    source = load_file(str(hf / "model.safetensors"))
    comps = {k: v for m in table for k, v in m.hf_to_components(source).items()}
    shards = [components_to_local(table, comps, 2, r) for r in range(2)]
    assert torch.equal(shards[1][FC1], source[FC1].t().chunk(2, dim=0)[1])  # column-parallel rows of [out, in]
    back = local_to_components(table, shards)
    assert all(torch.equal(back[k], comps[k]) for k in comps)
    by_name = bridge.mapping_by_name()
    entries = checkpoint_entries(by_name, FC1, comps[FC1], tp_group=None, tp_rank=0, tp_size=1)
    assert entries is not None and torch.equal(entries[FC1], source[FC1].t())
    target = torch.empty_like(comps[FC1])
    assert assemble_from_entries(by_name, FC1, entries, target, tp_rank=0, tp_size=1)
    assert torch.equal(target, comps[FC1])


@pytest.mark.usefixtures("own_process_group", "one_thread")
def test_a_bridge_kind_loads_hf_weights_into_the_model(example: Any, tmp_path: Path) -> None:
    hf = _hf_dir(example, tmp_path / "hf")
    bridge = _bridge_class(example, TransposedMapping).from_hf_dir(hf)
    from nvlcore.parallel import init_parallel

    init_parallel(1, device_type="cpu")
    model = bridge.build_model(dtype=torch.float32)
    bridge.load_hf_weights(model, hf)
    want = load_file(str(hf / "model.safetensors"))[FC1].t()
    assert torch.equal(dict(model.named_parameters())[FC1].detach(), want)


def test_the_core_names_no_mapping_kind() -> None:
    """No dispatch on a mapping's kind is left in the core (``m.kind == "qkv"``...): it calls methods."""
    import re

    dispatch = re.compile(r"\.kind\s*(==|!=|in\b)")
    offenders = [
        f"{p.relative_to(ROOT)}:{i}: {line.strip()}"
        for p in sorted((ROOT / "nvlcore").rglob("*.py"))
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if dispatch.search(line)
    ]
    assert offenders == []


def test_kinds_validate_their_arguments() -> None:
    from nvlcore.mapping import PartsMapping, QKVMapping

    with pytest.raises(ValueError, match="2 HF keys for 3"):
        QKVMapping("qkv.weight", ("a", "b"), 4, 2, 8)
    with pytest.raises(ValueError, match="three parts"):
        QKVMapping("qkv.weight", ("a",), 4, 2, 8, parts=("q", "kv"))
    with pytest.raises(ValueError, match="at least one"):
        PartsMapping("in_proj.weight", ("a",), ())
    with pytest.raises(TypeError):
        ParamMapping("x", ("x",))  # abstract: a kind is a subclass
