"""The built-in synthetic VQA maker: deterministic, balanced, and only solvable by looking."""

from __future__ import annotations

import collections

import numpy as np
import pytest

from nvlcore.builtin.synthetic_vqa import COLORS, SHAPES, SyntheticShapes
from nvlcore.plugins import NvlPluginManager


def test_registered_with_alias() -> None:
    reg = NvlPluginManager(entry_points=False).registry("dataset_maker")
    assert reg.canonical("shapes") == "synthetic_shapes"
    assert reg.get("synthetic_shapes") is SyntheticShapes


def test_deterministic_and_splits_disjoint() -> None:
    a = SyntheticShapes(split="train", num_examples=8)
    b = SyntheticShapes(split="train", num_examples=8)
    t = SyntheticShapes(split="test", num_examples=8)
    for i in range(8):
        ia, ib, it = (np.asarray(d.example(i)["image"]) for d in (a, b, t))
        assert np.array_equal(ia, ib)
        assert not np.array_equal(ia, it)


def test_answers_balanced_and_visible() -> None:
    ds = SyntheticShapes(split="train", num_examples=240)
    counts: dict[str, collections.Counter[str]] = {"color": collections.Counter(), "shape": collections.Counter()}
    for i in range(len(ds)):
        ex = ds.example(i)
        counts[ex["kind"]][ex["answer"]] += 1
        img = np.asarray(ex["image"]).reshape(-1, 3).astype(int)
        # the shape's colour really is in the picture
        assert (np.abs(img - np.array(COLORS[ex["color"]])).sum(-1) == 0).sum() > 20
    assert set(counts["color"].values()) == {30}
    assert set(counts["shape"].values()) == {40}
    assert set(counts["shape"]) == set(SHAPES)


def test_conversation_schema_and_blank_control() -> None:
    ds = SyntheticShapes(split="validation", num_examples=4, blank_images=True)
    conv = ds[1]["conversation"]
    assert [t["role"] for t in conv] == ["user", "assistant"]
    assert conv[0]["content"][0]["type"] == "image"
    assert np.asarray(conv[0]["content"][0]["image"]).min() == 255


@pytest.mark.parametrize("kwargs, match",
                         [({"questions": ["size"]}, "questions"), ({"num_examples": 0}, "num_examples")])
def test_bad_kwargs(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SyntheticShapes(split="train", **kwargs)


def test_unknown_split() -> None:
    with pytest.raises(ValueError, match="splits"):
        SyntheticShapes(split="dev")
