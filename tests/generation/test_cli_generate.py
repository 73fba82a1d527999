"""``nvl generate`` driven through click with an in-test model bridge (model-agnostic CLI parts)."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from nvlcore import hookimpl
from nvlcore.bridge import ModelBridge
from nvlcore.cli import build_cli
from nvlcore.generation import Generator
from nvlcore.plugins import NvlPluginManager, set_plugin_manager

EOS = 5


class ScriptedModel:
    def __init__(self, script):
        self.script = script

    def allocate_cache(self, batch_size, max_length, *, dtype, device):
        return {"step": 0}

    def _logits(self, step):
        out = torch.full((1, 32), -5.0)
        out[0, self.script[min(step, len(self.script) - 1)]] = 5.0
        return out

    def prefill(self, input_ids, *, attention_mask, cache, **inputs):
        return self._logits(0)

    def decode_step(self, token_ids, cache):
        cache["step"] += 1
        return self._logits(cache["step"])


class CharTok:
    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(ord("a") + i) for i in ids if not (skip_special_tokens and i == EOS))


class FakeBridge(ModelBridge):
    """A bridge whose "model" is scripted: the core's inference path builds it, loads it and hands it to
    generator_for_model, which wraps it."""

    name = "fake"
    architectures = ("FakeArch",)
    seen: dict = {}

    def build_model(self, *, dtype, device=None, init="none", seed=1234):
        FakeBridge.seen.update(device=device, dtype=dtype, init=init)
        return torch.nn.Module()

    def load_hf_weights(self, model, hf_dir, *, strict=True):
        FakeBridge.seen["weights"] = hf_dir
        return {}

    def processor(self, *, seq_length=None, pad_to_multiple_of=None, **options):
        raise NotImplementedError("the generation-only test bridge has no processor")

    def mapping_table(self):
        return []

    def generator_for_model(self, model, *, device=None, dtype=None, cuda_graph=None, **options):
        if options:
            raise ValueError(f"fake bridge has no generation options {sorted(options)}")
        FakeBridge.seen["training"] = model.training

        def prepare(conv):
            FakeBridge.seen["conversation"] = conv
            return {"input_ids": torch.tensor([1, 2, 3])}

        return Generator(ScriptedModel([7, 0, 4, 4, EOS]), CharTok(), prepare, stop_token_ids=[EOS], pad_token_id=0,
                         max_length=FakeBridge.seen.get("max_length"))


class FakePlugin:
    @hookimpl
    def nvl_register_model_bridges(self, register):
        register("fake", FakeBridge)


@pytest.fixture
def cli():
    manager = NvlPluginManager(entry_points=False, plugins=[("fake_plugin", FakePlugin())])
    old = set_plugin_manager(manager)
    try:
        yield build_cli(manager)
    finally:
        set_plugin_manager(old)


@pytest.fixture
def hf_dir(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["FakeArch"]}))
    return tmp_path


def test_streams_text_and_reports_speed(cli, hf_dir) -> None:
    res = CliRunner().invoke(cli, ["generate", "--hf-model-path", str(hf_dir), "--prompt", "hi", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert res.stdout == "haee\n"
    assert "prefill: 3 tokens" in res.stderr and "tokens/s" in res.stderr and "end-of-turn" in res.stderr
    conv = FakeBridge.seen["conversation"]["conversation"]
    assert conv[0]["content"][0]["text"] == "/no_think" and conv[1]["content"] == [{"type": "text", "text": "hi"}]
    assert FakeBridge.seen["dtype"] == torch.float32


def test_json_output(cli, hf_dir, tmp_path) -> None:
    from PIL import Image

    imgs = [tmp_path / "a.png", tmp_path / "b.png"]
    for p in imgs:  # images are decoded before the model loads: they must be real ones
        Image.new("RGB", (2, 2)).save(p)
    res = CliRunner().invoke(
        cli,
        ["generate", "--hf-model-path", str(hf_dir), "--json", "--max-new-tokens", "3", "--device", "cpu",
         "--image-path", ",".join(map(str, imgs)), "--system-prompt", ""],
    )
    assert res.exit_code == 0, res.output
    obj = json.loads(res.stdout)
    assert obj["text"] == "hae" and obj["token_ids"] == [7, 0, 4] and obj["prompt_token_ids"] == [1, 2, 3]
    assert obj["finish_reason"] == "length" and obj["decode_tokens_per_s"] > 0 and obj["prefill_tokens_per_s"] > 0
    conv = FakeBridge.seen["conversation"]["conversation"]
    assert len(conv) == 1 and [c["type"] for c in conv[0]["content"]] == ["text", "image", "text", "image", "text"]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--top-p", "0.5"], "--temperature"),
        (["--image-path", "/nonexistent.png"], "is not a file"),
        (["--tp", "2"], "torchrun --nproc-per-node 2"),
    ],
)
def test_bad_arguments_are_explained(cli, hf_dir, extra, message) -> None:
    res = CliRunner().invoke(cli, ["generate", "--hf-model-path", str(hf_dir), "--device", "cpu", *extra])
    assert res.exit_code != 0 and message in res.output


def test_unknown_architecture_and_missing_config(cli, tmp_path) -> None:
    res = CliRunner().invoke(cli, ["generate", "--hf-model-path", str(tmp_path)])
    assert res.exit_code != 0 and "config.json" in res.output
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["Other"]}))
    res = CliRunner().invoke(cli, ["generate", "--hf-model-path", str(tmp_path)])
    assert res.exit_code != 0 and "no installed model bridge handles architectures ['Other']" in res.output


def test_prompt_file_carries_a_prompt_longer_than_argv_allows(cli, hf_dir, tmp_path) -> None:
    """--prompt-file: the text as the prompt (one trailing newline dropped), past argv's 128 KB cap."""
    text = "x" * 200_000
    (tmp_path / "p.txt").write_text(text + "\n")
    res = CliRunner().invoke(cli, ["generate", "--hf-model-path", str(hf_dir), "--prompt-file", str(tmp_path / "p.txt"),
                                   "--system-prompt", "", "--device", "cpu", "--quiet"])
    assert res.exit_code == 0, res.output
    assert FakeBridge.seen["conversation"]["conversation"][0]["content"] == [{"type": "text", "text": text}]
    res = CliRunner().invoke(cli, ["generate", "--hf-model-path", str(hf_dir), "--prompt-file", "-", "--quiet"],
                             input="from stdin\n")
    assert res.exit_code == 0, res.output
    assert FakeBridge.seen["conversation"]["conversation"][-1]["content"][0]["text"] == "from stdin"
    both = CliRunner().invoke(cli, ["generate", "--hf-model-path", str(hf_dir), "--prompt", "a", "--prompt-file",
                                    str(tmp_path / "p.txt")])
    assert both.exit_code == 2 and "--prompt or --prompt-file, not both" in both.output
    (tmp_path / "empty.txt").write_text("\n")
    empty = CliRunner().invoke(cli, ["generate", "--hf-model-path", str(hf_dir), "--prompt-file",
                                     str(tmp_path / "empty.txt")])
    assert empty.exit_code == 2 and "is empty" in empty.output


@pytest.mark.parametrize("max_length, new_tokens, message", [
    (3, 1, "the prompt is 3 tokens, longer than the model's context of 3 tokens"),
    (5, 3, "max_new_tokens=3 would run past the model's context of 5 tokens; lower max_new_tokens to 2"),
])
def test_a_prompt_past_the_models_context_is_one_line(cli, hf_dir, max_length, new_tokens, message) -> None:
    FakeBridge.seen["max_length"] = max_length
    try:
        res = CliRunner().invoke(cli, ["generate", "--hf-model-path", str(hf_dir), "--max-new-tokens", str(new_tokens),
                                       "--device", "cpu"])
        fits = CliRunner().invoke(cli, ["generate", "--hf-model-path", str(hf_dir), "--max-new-tokens", "1",
                                        "--device", "cpu"]) if max_length > 4 else None
    finally:
        FakeBridge.seen.pop("max_length")
    assert res.exit_code == 1 and message in res.output, res.output
    assert sum(line.startswith("Error:") for line in res.output.splitlines()) == 1 and "Traceback" not in res.output
    assert fits is None or fits.exit_code == 0, fits.output


def test_generate_tears_down_the_process_group_it_set_up(cli, hf_dir) -> None:
    """A plain `nvl generate` sets up a one-rank gloo group and destroys it before exit (no PyTorch
    warning about a group never destroyed); a group the caller set up is left alone."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    assert not dist.is_initialized()
    res = CliRunner().invoke(cli, ["generate", "--hf-model-path", str(hf_dir), "--device", "cpu", "--quiet"])
    assert res.exit_code == 0, res.output
    assert not dist.is_initialized() and not parallel_state.model_parallel_is_initialized()

    from nvlcore.parallel import destroy_parallel, init_parallel

    init_parallel(1, device_type="cpu")
    try:
        res = CliRunner().invoke(cli, ["generate", "--hf-model-path", str(hf_dir), "--device", "cpu", "--quiet"])
        assert res.exit_code == 0, res.output
        assert dist.is_initialized() and parallel_state.model_parallel_is_initialized()
    finally:
        destroy_parallel()
