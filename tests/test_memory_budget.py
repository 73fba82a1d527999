"""``train.memory_budget_gb`` is a limit on a GPU: the caching allocator is capped at the budget less the plan's
runtime allowance, a lower cap already set is kept, and the plan compares against the smaller of the budget and
the card's free memory. CPU tests stand in for the CUDA calls; the last test runs them on a GPU (skipped here)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from nvlcore.config import ConfigError, load_config
from nvlcore.training import memory
from nvlcore.training.memory import GB, available_bytes, hold_to_budget

CARD = 80e9


def _ctx(kind: str = "cuda") -> SimpleNamespace:
    return SimpleNamespace(device=torch.device(kind, 0) if kind == "cuda" else torch.device(kind), world_size=1)


@pytest.fixture
def fake_card(monkeypatch):
    """An 80 GB card with 70 GB free whose allocator cap the test reads back."""
    state = {"fraction": 1.0, "set": []}

    def set_fraction(fraction, device=None):
        state["fraction"] = fraction
        state["set"].append(fraction)

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: SimpleNamespace(total_memory=CARD))
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda d=None: state["fraction"])
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", set_fraction)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d=None: (70e9, CARD))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "Fake 80GB")
    return state


def test_a_budget_caps_the_allocator_at_the_budget_less_the_runtime_allowance(fake_card):
    said = []
    cfg = load_config([], ["train.memory_budget_gb=22"])
    held = hold_to_budget(cfg, _ctx(), said.append)
    assert held == pytest.approx(22 * GB - memory.RUNTIME_OVERHEAD_BYTES)
    assert fake_card["set"] == [pytest.approx((22 * GB - memory.RUNTIME_OVERHEAD_BYTES) / CARD)]
    assert len(said) == 1 and "may reserve 19.0 GB" in said[0] and "train.memory_budget_gb=22" in said[0]


def test_a_lower_cap_already_set_is_kept(fake_card):
    fake_card["fraction"] = 15e9 / CARD  # e.g. a bench emulating a smaller card
    said = []
    held = hold_to_budget(load_config([], ["train.memory_budget_gb=22"]), _ctx(), said.append)
    assert fake_card["set"] == [] and held == pytest.approx(15e9)
    assert "keeps its lower cap of 15.0 GB" in said[0]


def test_no_budget_or_no_gpu_sets_no_cap(fake_card):
    assert hold_to_budget(load_config([], []), _ctx(), print) is None
    assert hold_to_budget(load_config([], ["train.memory_budget_gb=22"]), _ctx("cpu"), print) is None
    assert fake_card["set"] == []


def test_a_budget_larger_than_the_card_caps_at_the_card_and_says_so(fake_card):
    said = []
    held = hold_to_budget(load_config([], ["train.memory_budget_gb=100"]), _ctx(), said.append)
    assert held == pytest.approx(CARD) and fake_card["set"] == [1.0]
    assert "the card itself has only 80.0 GB" in said[0]


def test_a_budget_below_the_runtimes_own_memory_is_refused_naming_the_key(fake_card):
    with pytest.raises(ConfigError) as err:
        hold_to_budget(load_config([], ["train.memory_budget_gb=2"]), _ctx(), print)
    assert err.value.key == "train.memory_budget_gb" and "\n" not in str(err.value)
    assert fake_card["set"] == []


def test_the_plan_compares_with_the_smaller_of_budget_and_free_memory(fake_card):
    assert available_bytes(load_config([], ["train.memory_budget_gb=22"]), _ctx()) == (
        22 * GB, "train.memory_budget_gb=22")
    free, source = available_bytes(load_config([], ["train.memory_budget_gb=75"]), _ctx())
    assert free == 70e9 and source == "free on Fake 80GB, less than train.memory_budget_gb=75"
    assert available_bytes(load_config([], []), _ctx()) == (70e9, "free on Fake 80GB")
    assert available_bytes(load_config([], ["train.memory_budget_gb=22"]), _ctx("cpu"))[0] == 22 * GB
    assert available_bytes(load_config([], []), _ctx("cpu"))[0] is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu_the_allocator_refuses_past_the_budget():
    total = torch.cuda.get_device_properties(0).total_memory
    before = torch.cuda.get_per_process_memory_fraction(0)
    budget = memory.RUNTIME_OVERHEAD_BYTES / GB + 4  # 4 GB for the allocator
    try:
        held = hold_to_budget(load_config([], [f"train.memory_budget_gb={budget:g}"]), _ctx(), print)
        assert held == pytest.approx(min(4e9, before * total), rel=1e-6)
        torch.empty(int(held * 0.5), dtype=torch.uint8, device="cuda")  # within the cap
        with pytest.raises(torch.cuda.OutOfMemoryError):
            torch.empty(int(held * 1.1), dtype=torch.uint8, device="cuda")
    finally:
        torch.cuda.set_per_process_memory_fraction(before, 0)
        torch.cuda.empty_cache()


def test_an_out_of_memory_under_a_budget_says_the_budget_held_the_allocator():
    from nvlcore.training.oom import budget_note, describe

    note = budget_note(load_config([], ["train.memory_budget_gb=22"]))
    assert note == "train.memory_budget_gb=22 held PyTorch's allocator to ~19.0 GB (raise it if the card has room)"
    assert budget_note(load_config([], [])) == ""
    line = describe(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB."), hint=note)
    assert line.endswith(note) and "\n" not in line
