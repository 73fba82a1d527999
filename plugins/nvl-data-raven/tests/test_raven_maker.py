"""make_raven_dataset on a local copy in the_cauldron's real schema (parquet, list of Image, list of structs)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from PIL import Image

from nvl_data_raven.maker import RavenDataset
from nvl_data_testing import write_hub_dataset
from nvlcore.data.makers import NoUsableRowsError, SplitNotAvailableError

TEXT = {"user": "Which figure completes the sequence? Answer with the letter.", "assistant": "B", "source": "raven"}


def img(w: int, h: int, c: int = 0) -> Image.Image:
    return Image.new("RGB", (w, h), (c, 100, 200))


def rows():
    """Six rows: two usable, one per skip reason."""
    return {
        "images": [
            [img(32, 32, 1), img(64, 32, 2), img(32, 64, 3)],  # 0: usable, 3 images
            [],  # 1: no images
            [img(32, 32)],  # 2: no texts
            [img(32, 32)],  # 3: texts[0] without an assistant text
            [{"bytes": b"definitely not an image", "path": None}],  # 4: unreadable image
            [img(48, 48, 5)],  # 5: usable; only texts[0] is used
        ],
        "texts": [
            [TEXT],
            [TEXT],
            [],
            [{"user": "q", "assistant": None, "source": "raven"}],
            [TEXT],
            [{"user": "  First question?  ", "assistant": " A ", "source": "raven"},
             {"user": "ignored", "assistant": "ignored", "source": "raven"}],
        ],
    }


def cauldron_features():
    from datasets import Features, List, Value
    from datasets import Image as HFImage

    return Features({
        "images": List(HFImage()),
        "texts": List({"user": Value("string"), "assistant": Value("string"), "source": Value("string")}),
    })


@pytest.fixture(scope="module")
def local_cauldron(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from datasets import Dataset

    root = tmp_path_factory.mktemp("the_cauldron")
    ds = Dataset.from_dict(rows(), features=cauldron_features())
    # Two subsets, as in the real repository: the maker must pick its configuration by name.
    other = Dataset.from_dict({"images": [[img(8, 8)]], "texts": [[TEXT]]}, features=cauldron_features())
    return write_hub_dataset(
        root,
        {"raven/train-00000-of-00001.parquet": ds, "ai2d/train-00000-of-00001.parquet": other},
        {"ai2d": {"train": "ai2d/train-*"}, "raven": {"train": "raven/train-*"}},
    )


@pytest.fixture(scope="module")
def raven(local_cauldron: Path, tmp_path_factory: pytest.TempPathFactory) -> RavenDataset:
    return RavenDataset(split="train", path=str(local_cauldron), cache_dir=str(tmp_path_factory.mktemp("cache")))


def test_images_first_then_user_text_from_texts0(raven: RavenDataset) -> None:
    assert len(raven) == 2 and raven.num_rows == 6
    first = raven[0]["conversation"]
    assert [t["role"] for t in first] == ["user", "assistant"]
    content = first[0]["content"]
    assert [i["type"] for i in content] == ["image", "image", "image", "text"]
    assert [i["image"].size for i in content[:3]] == [(32, 32), (64, 32), (32, 64)]
    assert content[0]["image"].getpixel((0, 0)) == (1, 100, 200)  # order kept
    assert content[3]["text"] == TEXT["user"]
    assert first[1]["content"] == [{"type": "text", "text": "B"}]
    second = raven[1]["conversation"]
    assert second[0]["content"][-1]["text"] == "First question?" and second[1]["content"][0]["text"] == "A"
    assert raven.row_index(1) == 5


def test_malformed_rows_are_skipped_counted_and_reported(local_cauldron: Path, tmp_path: Path, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="nvl.data"):
        made = RavenDataset(split="train", path=str(local_cauldron), cache_dir=str(tmp_path))
    assert made.num_skipped == 4
    assert dict(made.skipped) == {"no images": 1, "no texts": 1, "missing user or assistant text": 1,
                                  "unreadable image": 1}
    assert "make_raven_dataset/train: skipped 4 of 6 rows" in caplog.text


def test_only_train_split(local_cauldron: Path) -> None:
    with pytest.raises(SplitNotAvailableError,
                       match=r"has only the split 'train'; got split 'validation'.*eval_iters=0"):
        RavenDataset(split="validation", path=str(local_cauldron))


def test_no_usable_rows_is_an_error(tmp_path: Path) -> None:
    from datasets import Dataset

    bad = Dataset.from_dict({"images": [[], []], "texts": [[TEXT], [TEXT]]}, features=cauldron_features())
    root = write_hub_dataset(tmp_path / "c", {"raven/train-0.parquet": bad}, {"raven": {"train": "raven/train-*"}})
    with pytest.raises(NoUsableRowsError, match=r"no usable rows .*all 2 rows were skipped \(2 no images\)"):
        RavenDataset(split="train", path=str(root), cache_dir=str(tmp_path / "cache"))


def test_hub_id_and_local_path_take_the_same_call(monkeypatch, local_cauldron: Path, tmp_path: Path) -> None:
    import datasets

    real = datasets.load_dataset
    calls = []

    def spy(path, name=None, **kw):
        calls.append((path, name, kw["split"]))
        assert ("data_files" in kw) == (path != "HuggingFaceM4/the_cauldron")  # a Hub id keeps its own cache key
        return real(str(local_cauldron), name, split=kw["split"], cache_dir=str(tmp_path))

    monkeypatch.setattr(datasets, "load_dataset", spy)
    assert len(RavenDataset()) == 2
    assert len(RavenDataset(path=str(local_cauldron))) == 2
    assert calls == [("HuggingFaceM4/the_cauldron", "raven", "train"), (str(local_cauldron), "raven", "train")]


def cauldron_copy(root: Path, answers: list[str]) -> Path:
    """A local the_cauldron copy at ``root`` whose raven rows answer ``answers``, one row each."""
    from datasets import Dataset

    rows = {"images": [[img(8, 8)] for _ in answers], "texts": [[{**TEXT, "assistant": a}] for a in answers]}
    ds = Dataset.from_dict(rows, features=cauldron_features())
    return write_hub_dataset(root, {"raven/train-00000-of-00001.parquet": ds}, {"raven": {"train": "raven/train-*"}})


def answers(made: RavenDataset) -> list[str]:
    return [made[i]["conversation"][1]["content"][0]["text"] for i in range(len(made))]


def test_copies_named_alike_and_a_rewritten_copy_are_not_served_from_the_cache(tmp_path: Path) -> None:
    """Issue 27: ``datasets`` keyed a local copy's cache by its folder name and file patterns."""
    cache = str(tmp_path / "cache")
    first = cauldron_copy(tmp_path / "a" / "the_cauldron", ["a0", "a1", "a2"])
    second = cauldron_copy(tmp_path / "b" / "the_cauldron", [f"b{i}" for i in range(5)])
    assert answers(RavenDataset(path=str(first), cache_dir=cache)) == ["a0", "a1", "a2"]
    assert answers(RavenDataset(path=str(second), cache_dir=cache)) == [f"b{i}" for i in range(5)]
    cauldron_copy(first, [f"c{i}" for i in range(7)])  # rewritten in place
    assert answers(RavenDataset(path=str(first), cache_dir=cache)) == [f"c{i}" for i in range(7)]
    prepared = sorted(p.name for p in (tmp_path / "cache" / "the_cauldron").iterdir())
    assert answers(RavenDataset(path=str(first), cache_dir=cache)) == [f"c{i}" for i in range(7)]
    assert sorted(p.name for p in (tmp_path / "cache" / "the_cauldron").iterdir()) == prepared  # a cache hit


def test_a_rewrite_that_keeps_the_mtime_is_seen_by_its_size(tmp_path: Path) -> None:
    import os

    cache = str(tmp_path / "cache")
    copy = cauldron_copy(tmp_path / "the_cauldron", ["x0"])
    data = copy / "raven" / "train-00000-of-00001.parquet"
    assert answers(RavenDataset(path=str(copy), cache_dir=cache)) == ["x0"]
    stamp = data.stat()
    cauldron_copy(copy, ["y0", "y1"])
    os.utime(data, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))  # as ``cp -p`` / ``rsync -a`` may leave it
    assert answers(RavenDataset(path=str(copy), cache_dir=cache)) == ["y0", "y1"]


def test_nvl_data_preview_shows_the_copy_asked_for(tmp_path: Path) -> None:
    import json

    from click.testing import CliRunner

    from nvlcore.cli import build_cli

    runner = CliRunner()
    toy = tmp_path / "toy"
    assert runner.invoke(build_cli(), ["toy-model", str(toy)]).exit_code == 0

    def preview(copy: Path) -> list[str]:
        kwargs = json.dumps({"path": str(copy), "cache_dir": str(tmp_path / "cache")})
        result = runner.invoke(build_cli(), ["data", "preview", "raven", "--maker-kwargs", kwargs, "-n", "10",
                                             "--hf-model-path", str(toy), "--json"])
        assert result.exit_code == 0, result.output
        return [json.loads(line)["target"] for line in result.stdout.splitlines()]

    first = cauldron_copy(tmp_path / "a" / "the_cauldron", ["A", "B", "C"])
    second = cauldron_copy(tmp_path / "b" / "the_cauldron", ["D", "E", "F", "G", "H"])
    assert preview(first) == ["A", "B", "C"]
    assert preview(second) == ["D", "E", "F", "G", "H"]
    cauldron_copy(first, ["H", "G", "F", "E", "D", "C", "B"])
    assert preview(first) == ["H", "G", "F", "E", "D", "C", "B"]


def test_registered_under_name_and_alias() -> None:
    from nvlcore.plugins import get_registry

    reg = get_registry("dataset_maker")
    assert reg.get("raven") is RavenDataset and reg.get("make_raven_dataset") is RavenDataset
    assert reg.entry("raven").is_lazy


def test_unknown_kwarg_and_missing_path(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="make_raven_dataset: unknown dataset.maker_kwargs subst; valid: .*subset"):
        RavenDataset(subst="raven")
    with pytest.raises(FileNotFoundError, match="maker_kwargs.path .* does not exist"):
        RavenDataset(path=str(tmp_path / "nope"))


def test_nvl_data_preview_with_the_toy_model(local_cauldron: Path, tmp_path: Path) -> None:
    import json

    from click.testing import CliRunner

    from nvlcore.cli import build_cli

    runner = CliRunner()
    toy = tmp_path / "toy"
    made = runner.invoke(build_cli(), ["toy-model", str(toy)])
    assert made.exit_code == 0, made.output
    kwargs = json.dumps({"path": str(local_cauldron), "cache_dir": str(tmp_path / "cache")})
    result = runner.invoke(build_cli(), ["data", "preview", "raven", "--maker-kwargs", kwargs, "-n", "5",
                                         "--hf-model-path", str(toy), "--json"])
    assert result.exit_code == 0, result.output
    first, second = [json.loads(line) for line in result.stdout.splitlines()]
    assert first["num_images"] == 3 and first["tiles_per_image"] == [1, 3, 3] and first["num_frames"] == 0
    assert first["target"] == "B" and first["supervised"] == "B\n<SPECIAL_12>"
    assert first["prompt"].startswith("<SPECIAL_10>System\n\n<SPECIAL_11>User\n<img><image*")
    assert first["prompt"].endswith("<SPECIAL_11>Assistant\n<think></think>B\n<SPECIAL_12>\n")
    assert 0 < first["num_supervised_tokens"] < first["num_tokens"]
    assert second["target"] == "A" and second["row"] == 5
    text = runner.invoke(build_cli(), ["data", "preview", "raven", "--maker-kwargs", kwargs, "-n", "1",
                                       "--hf-model-path", str(toy)])
    assert text.exit_code == 0, text.output
    assert "make_raven_dataset/train: 2 examples (4 rows skipped" in text.output
    assert "tiles per image: 1, 3, 3; frames: 0]" in text.output


# -- nvl eval: option accuracy -------------------------------------------------------------------


def test_raven_option_accuracy_hand_computed() -> None:
    from nvl_data_raven.metrics import RavenMetrics

    m = RavenMetrics()
    assert m.score("B", "B") == {"option_accuracy": 1.0}
    assert m.score("Answer: B.", "B") == {"option_accuracy": 1.0}
    assert m.score("The answer is (C).", "Answer: C") == {"option_accuracy": 1.0}
    assert m.score("C", "B") == {"option_accuracy": 0.0}
    assert m.score("Because the shapes rotate", "B") == {"option_accuracy": 0.0}  # names no option
    assert m.score("yes", "Yes.") == {"option_accuracy": 1.0}  # a free-text reference: exact match


def test_nvl_eval_predictions_references_score_one_and_empty_zero(tmp_path: Path) -> None:
    from nvlcore.testing.metrics import check_reference_and_empty, score_file

    refs = ["B", "A", "Answer: H", "E."]
    check_reference_and_empty("raven", refs, tmp_path, ["option_accuracy"])
    assert score_file("raven", ["B", "C", "H", "E"], refs, tmp_path)["metrics"] == {"option_accuracy": 0.75}


def test_nvl_eval_end_to_end_with_the_toy_model(local_cauldron: Path, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from nvlcore.cli import build_cli
    from nvlcore.testing.metrics import run_eval_end_to_end

    toy = tmp_path / "toy"
    assert CliRunner().invoke(build_cli(), ["toy-model", str(toy)]).exit_code == 0
    kwargs = {"path": str(local_cauldron), "cache_dir": str(tmp_path / "cache")}
    summary, lines = run_eval_end_to_end(toy, "raven", kwargs, tmp_path, limit=2)  # the only split: train
    assert set(summary["metrics"]) == {"option_accuracy"}
    assert [x["reference"] for x in lines] == ["B", "A"] and lines[1]["row"] == 5
