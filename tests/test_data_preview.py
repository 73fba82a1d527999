"""``nvl data preview``: maker selection, kwargs checking, bridge selection, output formats.

The processor here is a stand-in; the Nemotron VL bridge's real one is exercised by the dataset
maker plugins' own preview tests.
"""

from __future__ import annotations

import json
import types
from pathlib import Path

import pytest
import torch

from nvlcore import hookimpl
from nvlcore.bridge import ModelBridge


class CountingProcessor:
    """One token per character of the rendered text; the last turn's characters are supervised."""

    def __init__(self, hf_dir: Path) -> None:
        self.hf_dir = hf_dir

    def __call__(self, conversation, *, where: str = "example"):
        if "fail" in str(conversation["conversation"][-1]["content"]):
            raise ValueError(f"{where}: cannot do this one")
        text = "".join(str(t["content"]) for t in conversation["conversation"])
        answer = str(conversation["conversation"][-1]["content"])
        mask = torch.zeros(len(text))
        mask[-len(answer):] = 1
        return {"input_ids": torch.arange(len(text)), "loss_mask": mask}


class FakeBridge(ModelBridge):
    """A processor-only bridge (``nvl data preview`` needs nothing else)."""

    name = "fake_vl"
    architectures = ("FakeVL",)

    def build_model(self, *, dtype, device=None, init="none", seed=1234):
        raise NotImplementedError("the processor-only test bridge builds no model")

    def mapping_table(self):
        return []

    def processor(self, *, seq_length=None, pad_to_multiple_of=None, **options):
        return CountingProcessor(self.hf_dir)


class ListMaker:
    """A maker over a fixed list; ``bad=True`` makes the second example fail in the processor."""

    splits = ("train",)

    def __init__(self, *, split: str = "train", bad: bool = False) -> None:
        self.rows = [
            {"conversation": [{"role": "user",
                               "content": [{"type": "image", "image": "/x.png"}, {"type": "text", "text": "q0"}]},
                              {"role": "assistant", "content": "answer zero"}]},
            {"conversation": [{"role": "user", "content": "q1"},
                              {"role": "assistant", "content": "fail" if bad else "one"}]},
        ]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def plugin_module():
    mod = types.ModuleType("fake_preview_plugin")

    @hookimpl
    def nvl_register_model_bridges(register):
        register("fake_vl", FakeBridge)

    @hookimpl
    def nvl_register_dataset_makers(register):
        register("list_maker", ListMaker, aliases=("lm",))

    mod.nvl_register_model_bridges = nvl_register_model_bridges
    mod.nvl_register_dataset_makers = nvl_register_dataset_makers
    return mod


@pytest.fixture
def cli(register_plugin, nvl_cli):
    register_plugin(plugin_module())
    return nvl_cli


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["FakeVL"]}))
    return tmp_path


def test_json_lines_with_model_dir(cli, model_dir: Path) -> None:
    result = cli("data", "preview", "lm", "-n", "5", "--hf-model-path", str(model_dir), "--json")
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.output.splitlines()]
    assert len(lines) == 2
    first = lines[0]
    for key in ("num_images", "tiles_per_image", "num_frames", "num_tokens", "num_supervised_tokens", "prompt",
                "target"):
        assert key in first
    assert first["num_images"] == 1 and first["target"] == "answer zero"
    assert first["num_supervised_tokens"] == len("answer zero")
    assert first["num_tokens"] > first["num_supervised_tokens"]


def test_without_model_dir_only_the_conversation(cli) -> None:
    result = cli("data", "preview", "list_maker", "-n", "1", "--json")
    assert result.exit_code == 0, result.output
    (line,) = [json.loads(x) for x in result.output.splitlines()]
    assert line["num_tokens"] is None and line["prompt"] is None and line["target"] == "answer zero"
    text = cli("data", "preview", "list_maker", "-n", "1")
    assert text.exit_code == 0
    assert "list_maker/train: 2 examples" in text.output
    assert "user: [image /x.png] q0" in text.output and "assistant: answer zero" in text.output


def test_failing_example_is_shown_and_the_exit_status_says_so(cli, model_dir: Path) -> None:
    result = cli("data", "preview", "lm", "--maker-kwargs", '{"bad": true}', "--hf-model-path", str(model_dir))
    assert result.exit_code == 1
    assert "ERROR: ValueError: row 1 of list_maker/train: cannot do this one" in result.output
    assert "1 of 2 examples failed" in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["no_such_maker"], "unknown dataset_maker 'no_such_maker'"),
        (["lm", "--maker-kwargs", "[1]"], "must be a JSON object"),
        (["lm", "--maker-kwargs", "{oops"], "not valid JSON"),
        (["lm", "--split", "test"], "list_maker has splits train; got --split 'test'"),
    ],
)
def test_bad_input_is_reported(cli, args, message) -> None:
    result = cli("data", "preview", *args)
    assert result.exit_code == 2 and message in result.output


def test_model_dir_without_a_matching_bridge(cli, tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    result = cli("data", "preview", "lm", "--hf-model-path", str(tmp_path))
    assert result.exit_code == 1
    assert "no installed model bridge handles architectures ['LlamaForCausalLM']" in result.output
    (tmp_path / "config.json").unlink()
    result = cli("data", "preview", "lm", "--hf-model-path", str(tmp_path))
    assert result.exit_code == 2 and "has no config.json" in result.output


def test_maker_kwargs_are_checked_against_the_makers_schema(register_plugin, nvl_cli) -> None:
    import attrs

    @attrs.define
    class Kw:
        path: str
        n: int = 1

    class SchemaMaker(ListMaker):
        Kwargs = Kw

        def __init__(self, *, split="train", path, n=1):
            super().__init__(split=split)

    mod = types.ModuleType("schema_plugin")

    @hookimpl
    def nvl_register_dataset_makers(register):
        register("schema_maker", SchemaMaker)

    mod.nvl_register_dataset_makers = nvl_register_dataset_makers
    register_plugin(mod)
    missing = nvl_cli("data", "preview", "schema_maker")
    assert missing.exit_code == 2 and "--maker-kwargs.path: required" in missing.output
    typo = nvl_cli("data", "preview", "schema_maker", "--maker-kwargs", '{"path": "x", "nn": 2}')
    assert typo.exit_code == 2 and "did you mean '--maker-kwargs.n'" in typo.output
    ok = nvl_cli("data", "preview", "schema_maker", "--maker-kwargs", '{"path": "x", "n": "2"}', "--json")
    assert ok.exit_code == 0, ok.output


class ManyMaker(ListMaker):
    """Ten examples of different lengths (the counting processor: one token per character)."""

    def __init__(self, *, split: str = "train", bad: bool = False) -> None:
        self.rows = [{"conversation": [{"role": "user", "content": "q" * (10 * (i % 4) + 5)},
                                       {"role": "assistant", "content": "a" * 5}]} for i in range(10)]


def test_packing_preview_shows_samples_per_row_and_fill(register_plugin, nvl_cli, model_dir: Path) -> None:
    mod = plugin_module()

    @hookimpl
    def nvl_register_dataset_makers(register):
        register("many_maker", ManyMaker)

    mod.nvl_register_dataset_makers = nvl_register_dataset_makers
    register_plugin(mod)
    # lengths (rendered characters): 10, 20, 30, 40, 10, 20, 30, 40, 10, 20; rows of 50, windows of 5
    result = nvl_cli("data", "preview", "many_maker", "--hf-model-path", str(model_dir), "--seq-length", "50",
                     "--packing-buffer-size", "5", "-n", "2", "--json", "--packing")
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.output.splitlines()]
    rows, summary = lines[:-1], lines[-1]["summary"]
    # window 0 (10, 20, 30, 40, 10) -> rows [0, 1], [2], [3, 4]: the 10 goes where it fits tightest
    assert [r["examples"] for r in rows] == [[0, 1], [2]]
    assert rows[0]["fill"] == pytest.approx(0.6) and rows[0]["num_samples"] == 2 and rows[0]["lengths"] == [10, 20]
    # the summary covers the windows read to show the rows: window 0, 110 tokens in 3 rows of 50
    assert summary["examples"] == 5 and summary["rows"] == 3
    assert summary["fill"] == pytest.approx(110 / 150) and summary["fill_unpacked"] == pytest.approx(110 / 250)
    text = nvl_cli("data", "preview", "many_maker", "--hf-model-path", str(model_dir), "--seq-length", "50",
                   "--packing-buffer-size", "5", "--packing", "first_fit")
    assert text.exit_code == 0, text.output
    # first fit puts example 4 (10 tokens) into the first row with room, where best fit chose the full one
    assert "row 0: 3 samples (examples 0, 1, 4; tokens 10 + 20 + 10 = 40), fill 80.0%" in text.output
    assert "5 examples in 3 rows" in text.output and "samples per row" in text.output
    no_model = nvl_cli("data", "preview", "many_maker", "--packing")
    assert no_model.exit_code == 2 and "--packing needs --hf-model-path" in no_model.output
