"""Generation with caches on a tiny toy checkpoint (CPU, fp32).

* greedy decoding with the KV / conv / SSM caches equals the no-cache loop that recomputes the
  whole prefix with the training forward, for text, image, multi-image and video prompts;
* a left-padded batch of prompts of different lengths equals each prompt alone;
* text-only greedy output equals transformers' ``NemotronHForCausalLM.generate`` on the toy's
  language model (same safetensors), one by one and batched;
* ``nvl generate`` end to end.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nvlcore.generation import NoCacheReference, build_conversation, generate_tokens

NEW_TOKENS = 16


def _liven(hf_dir: Path, factor: float) -> None:
    """Make the toy sensitive to what these tests check, on its safetensors (every loader sees it):

    * scale the LM's matrices (not the embeddings): the stock N(0, 0.02) toy collapses to repeating
      one token, which would let a broken cache pass;
    * raise ``dt_bias`` (time steps ~0.2 instead of ~0.01) so that a Mamba state polluted by
      padding, or a stale one, changes the output clearly.
    """
    from safetensors.torch import load_file, save_file

    path = hf_dir / "model.safetensors"
    sd = load_file(path)
    for name, t in sd.items():
        if name.startswith("language_model.") and t.ndim == 2 and "embeddings" not in name:
            sd[name] = (t.float() * factor).to(t.dtype)
        elif name.endswith("mixer.dt_bias"):
            sd[name] = (t.float() + 3.0).to(t.dtype)
    save_file(sd, path, metadata={"format": "pt"})


def _noise_image(path: Path, w: int, h: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return path


def _noise_video(path: Path, frames: int = 12, width: int = 64, height: int = 48, seed: int = 0) -> Path:
    import av

    rng = np.random.default_rng(seed)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=6)
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuv420p"
        for _ in range(frames):
            arr = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


pytestmark = pytest.mark.usefixtures("own_process_group")


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    from nvl_nemotron_vl.toy import write_toy_checkpoint

    out = write_toy_checkpoint(tmp_path_factory.mktemp("gen") / "toy", "tiny", seed=3)
    _liven(out, 8.0)
    return out


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("media")
    return {
        "wide": _noise_image(root / "wide.png", 150, 70, 1),
        "square": _noise_image(root / "square.png", 64, 64, 2),
        "video": _noise_video(root / "clip.mp4"),
    }


@pytest.fixture(scope="module")
def generator(toy):
    from nvl_nemotron_vl import load_generator

    return load_generator(toy, device="cpu")


def _conversations(media) -> dict[str, dict]:
    return {
        "text": build_conversation("Tell me a short story about a cat.", system_prompt="/no_think"),
        "image": build_conversation("Describe this image.", images=[media["wide"]], system_prompt="/no_think"),
        "multi_image": build_conversation("Compare.", images=[media["wide"], media["square"]]),
        "video": build_conversation("What happens in this video?", video=media["video"], system_prompt="/no_think"),
    }


def _no_cache_reference(model) -> NoCacheReference:
    """The decode protocol over the training forward, recomputing the whole prefix every step."""
    cfg = model.config
    banned = [cfg.img_context_token_id, cfg.video_context_token_id]
    vocab = cfg.llm.vocab_size

    def forward(input_ids, attention_mask, pixel_values=None, num_frames=None, evs_pruning_rate=None):
        with torch.no_grad():
            logits = model(
                input_ids, attention_mask=attention_mask, pixel_values=pixel_values, num_frames=num_frames,
                evs_pruning_rate=evs_pruning_rate,
            )[..., :vocab].float()
        logits[..., banned] = float("-inf")  # the decoder never emits placeholders either
        return logits

    return NoCacheReference(forward)


@pytest.mark.parametrize("kind", ["text", "image", "multi_image", "video"])
def test_cached_greedy_equals_recomputing_the_prefix(generator, media, kind) -> None:
    conv = _conversations(media)[kind]
    inputs = generator.prepare(conv)
    ids = inputs.pop("input_ids")[None]
    if kind == "image":
        assert inputs["pixel_values"].shape[0] == 3  # 2x1 tiles + thumbnail
    if kind == "video":
        assert inputs["num_frames"] == [10]
    model = generator.model.model
    rates = [model.config.video_pruning_rate, 0.0] if kind == "video" else [0.0]
    for rate in rates:
        extra = {**inputs, "evs_pruning_rate": rate}
        cached = generate_tokens(generator.model, ids, max_new_tokens=NEW_TOKENS, model_inputs=extra)
        ref = generate_tokens(_no_cache_reference(model), ids, max_new_tokens=NEW_TOKENS, model_inputs=extra)
        assert cached.token_ids == ref.token_ids, (kind, rate)
        assert len(set(cached.token_ids[0])) >= 4  # the toy really moves from token to token


def test_prefill_and_step_logits_match_the_full_forward(generator, media) -> None:
    """Teacher-forced: each decode step's logits equal the full forward's at that position."""
    model = generator.model.model
    inputs = generator.prepare(_conversations(media)["image"])
    ids = inputs.pop("input_ids")[None]
    cont = torch.tensor([[5, 77, 300, 12, 41, 41, 9]])
    dec = generator.model
    with torch.inference_mode():
        cache = dec.allocate_cache(1, ids.shape[1] + cont.shape[1] + 1, dtype=torch.float32, device="cpu")
        steps = [dec.prefill(ids, attention_mask=torch.ones_like(ids), cache=cache, **inputs)]
        for t in cont[0]:
            steps.append(dec.decode_step(t[None], cache))
        full = model(torch.cat([ids, cont], 1), pixel_values=inputs["pixel_values"])[0, ids.shape[1] - 1 :]
        full[:, dec.suppressed_token_ids] = float("-inf")
        got = torch.cat(steps)
    finite = torch.isfinite(full)
    assert torch.equal(finite, torch.isfinite(got))
    torch.testing.assert_close(got[finite], full[finite], rtol=1e-4, atol=1e-4)


def test_batch_of_different_lengths_equals_one_by_one(generator, media) -> None:
    convs = list(_conversations(media).values())
    convs.append(build_conversation("Hi!"))
    alone = [generator.generate([c], max_new_tokens=NEW_TOKENS)[0] for c in convs]
    lengths = {len(r.prompt_token_ids) for r in alone}
    assert len(lengths) == len(convs)  # really different lengths, so rows are padded differently
    batched = generator.generate(convs, max_new_tokens=NEW_TOKENS)
    assert [r.token_ids for r in batched] == [r.token_ids for r in alone]
    assert [r.text for r in batched] == [r.text for r in alone]
    # the same again through a second cache shape (rows of two)
    assert [r.token_ids for r in generator.generate(convs, max_new_tokens=NEW_TOKENS, batch_size=2)] == [
        r.token_ids for r in alone
    ]


def test_batched_prefill_and_steps_equal_single_rows(generator, media) -> None:
    """Logit-level check of padding: a padded row's prefill and decode logits equal its own."""
    from nvlcore.generation import left_pad, merge_model_inputs

    dec = generator.model
    prepared = [generator.prepare(c) for c in _conversations(media).values()]
    prompts = [p.pop("input_ids") for p in prepared]
    steps = torch.tensor([7, 300, 41])

    def run(ids, mask, inputs):
        with torch.inference_mode():
            cache = dec.allocate_cache(ids.shape[0], ids.shape[1] + 4, dtype=torch.float32, device="cpu")
            out = [dec.prefill(ids, attention_mask=mask, cache=cache, **inputs)]
            for t in steps:
                out.append(dec.decode_step(t.repeat(ids.shape[0]), cache))
            return torch.stack(out, 1)  # [B, steps + 1, V]

    ids, mask = left_pad(prompts, generator.pad_token_id)
    batched = run(ids, mask, merge_model_inputs(prepared))
    for r, (p, inputs) in enumerate(zip(prompts, prepared, strict=True)):
        alone = run(p[None], torch.ones(1, len(p), dtype=torch.long), inputs)
        torch.testing.assert_close(batched[r], alone[0], rtol=1e-5, atol=1e-5)


def test_text_greedy_equals_transformers_generate(toy, generator) -> None:
    from nemotron_vl_testing import hf_lm_from_toy

    # transformers' model on the toy's language_model.* tensors (renamed to its keys, loaded strictly;
    # its PyTorch prefill's dt clamp at time_step_min is switched off, as in the released kernels)
    hf = hf_lm_from_toy(toy)
    cfg = generator.model.model.config
    stop = generator.stop_token_ids
    prompts = ["Tell me a short story about a cat.", "Hi!", "Why is the sky blue? Explain it to a child, please."]
    convs = [build_conversation(p, system_prompt="/no_think") for p in prompts]
    ours = generator.generate(convs, max_new_tokens=NEW_TOKENS)
    ids = [torch.as_tensor(generator.prepare(c)["input_ids"]) for c in convs]

    def hf_generate(input_ids, mask):
        out = hf.generate(
            input_ids=input_ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
            eos_token_id=stop, pad_token_id=generator.pad_token_id,
            suppress_tokens=[cfg.img_context_token_id, cfg.video_context_token_id],
        )[:, input_ids.shape[1]:].tolist()
        return [r[: next((i for i, t in enumerate(r) if t in stop), len(r) - 1) + 1] for r in out]

    for i, p in enumerate(ids):
        assert hf_generate(p[None], torch.ones(1, len(p), dtype=torch.long)) == [ours[i].token_ids]
    from nvlcore.generation import left_pad

    batch, mask = left_pad(ids, generator.pad_token_id)
    assert hf_generate(batch, mask) == [r.token_ids for r in ours]


def test_prefill_runs_the_models_selected_kernels_and_step_continues_the_state(generator) -> None:
    """The prefill is the mixers' training path: the model's kernels (``set_kernels``) compute it; the
    state it leaves lets ``step`` continue exactly as the full forward over the longer sequence."""
    import dataclasses

    dec = generator.model
    model = dec.model
    mixers = [layer.mixer for layer in model.language_model.decoder.layers if hasattr(layer, "mixer")]
    calls: list[str] = []

    def spy(name, fn):
        def run(*args, **kwargs):
            calls.append(name)
            return fn(*args, **kwargs)
        return run

    saved = [m.kernels for m in mixers]
    k = saved[0]
    spied = dataclasses.replace(k, scan=spy("scan", k.scan), conv=spy("conv", k.conv),
                                gated_norm=spy("gated_norm", k.gated_norm))
    ids = torch.tensor([[5, 17, 3, 99, 42, 8, 61]])
    try:
        for m in mixers:
            m.kernels = spied
        cache = dec.allocate_cache(1, ids.shape[1] + 2, dtype=torch.float32, device="cpu")
        dec.prefill(ids[:, :-1], attention_mask=torch.ones_like(ids[:, :-1]), cache=cache)
        assert calls.count("scan") == calls.count("conv") == calls.count("gated_norm") == len(mixers)
        calls.clear()
        stepped = dec.decode_step(ids[:, -1], cache)
        assert calls == []  # the one-token step is plain PyTorch
    finally:
        for m, kern in zip(mixers, saved, strict=True):
            m.kernels = kern
    with torch.no_grad():
        full = model.forward_inference(ids, last_only=True)[:, 0].float()
    full[:, dec.suppressed_token_ids] = float("-inf")
    torch.testing.assert_close(stepped, full, rtol=1e-4, atol=1e-4)


def test_packed_rows_cannot_fill_a_cache(generator) -> None:
    lm = generator.model.model.language_model
    cache = lm.allocate_inference_cache(1, 8, dtype=torch.float32, device="cpu")
    h = torch.zeros(1, 4, lm.cfg.hidden_size)
    with pytest.raises(ValueError, match="one prompt per row"):
        lm.decoder(h, None, cache, torch.tensor([[0, 0, 1, 1]]))


def test_cache_memory_is_constant_per_mamba_layer(generator) -> None:
    from nvl_nemotron_vl.model.cache import AttentionState, MambaState

    dec = generator.model
    small = dec.allocate_cache(2, 16, dtype=torch.float32, device="cpu")
    mamba_small = [s.ssm.numel() + s.conv.numel() for s in small.layers if isinstance(s, MambaState)]
    big = dec.allocate_cache(2, 4096, dtype=torch.float32, device="cpu")
    mamba_big = [s.ssm.numel() + s.conv.numel() for s in big.layers if isinstance(s, MambaState)]
    assert mamba_small == mamba_big and mamba_small
    attn = [s for s in big.layers if isinstance(s, AttentionState)]
    assert attn and all(s.keys.shape[2] == 4096 for s in attn)


def test_cli_generate_streams_and_prints_json(toy, media) -> None:
    from click.testing import CliRunner

    from nvlcore.cli import build_cli

    args = ["generate", "--hf-model-path", str(toy), "--image-path", f"{media['wide']},{media['square']}",
            "--max-new-tokens", "8", "--device", "cpu"]
    runner = CliRunner()
    res_json = runner.invoke(build_cli(), [*args, "--json"])
    assert res_json.exit_code == 0, res_json.output
    obj = json.loads(res_json.stdout)
    assert set(obj) >= {"text", "prompt_token_ids", "token_ids", "prefill_tokens_per_s", "decode_tokens_per_s"}
    assert 1 <= len(obj["token_ids"]) <= 8 and obj["prefill_tokens_per_s"] > 0
    res = runner.invoke(build_cli(), args)
    assert res.exit_code == 0, res.output
    assert res.stdout == obj["text"] + "\n"
    assert "decode:" in res.stderr and "tokens/s" in res.stderr


def test_cli_refuses_tensor_parallel_without_a_launcher(toy) -> None:
    from click.testing import CliRunner

    from nvlcore.cli import build_cli

    res = CliRunner().invoke(build_cli(), ["generate", "--hf-model-path", str(toy), "--tp", "2", "--device", "cpu"])
    assert res.exit_code != 0 and "torchrun --nproc-per-node 2" in res.output


@pytest.mark.distributed
def test_tensor_parallel_2_equals_tp_1(toy, media, generator) -> None:
    """Two gloo ranks (heads, groups and vocabulary split) give TP=1's tokens and logits."""
    from nemotron_vl_testing_generate import tp_generate_worker

    from nvl_dist_testing import run_distributed

    convs = [_conversations(media)["image"], build_conversation("Hi!")]
    ranks = run_distributed(tp_generate_worker, 2, str(toy), convs, NEW_TOKENS)
    single = generator.generate(convs, max_new_tokens=NEW_TOKENS)
    assert ranks[0]["tokens"] == ranks[1]["tokens"] == [r.token_ids for r in single]
    torch.testing.assert_close(ranks[0]["prefill_logits"], ranks[1]["prefill_logits"], rtol=0, atol=0)


def test_megatron_checkpoint_weights_give_the_same_output(toy, media, generator, tmp_path) -> None:
    """`nvl convert import` of the toy, then generation with --megatron-model-path: the same tokens."""
    from click.testing import CliRunner

    from nvl_nemotron_vl import load_generator
    from nvlcore.cli import build_cli

    ck = tmp_path / "ck"
    # Its own process, as a user runs it (the importer refuses to stream inside a process that already
    # holds a process group, which this module's model loading has set up).
    proc = subprocess.run(
        [sys.executable, "-m", "nvlcore", "convert", "import", "--hf-model", str(toy), "--megatron-path", str(ck),
         "--no-progress"], capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stderr
    convs = [_conversations(media)["multi_image"], build_conversation("Hi!")]
    from_ckpt = load_generator(toy, megatron_model_path=ck, device="cpu").generate(convs, max_new_tokens=NEW_TOKENS)
    assert [r.token_ids for r in from_ckpt] == [r.token_ids
                                                for r in generator.generate(convs, max_new_tokens=NEW_TOKENS)]

    empty = tmp_path / "not_a_checkpoint"
    empty.mkdir()
    res = CliRunner().invoke(build_cli(), ["generate", "--hf-model-path", str(toy), "--megatron-model-path", str(empty),
                                           "--device", "cpu"])
    assert res.exit_code != 0 and str(empty) in res.output


def test_cli_video_frames_fps_and_pruning_rate(toy, media, tmp_path) -> None:
    """--num-frames / --fps choose the sampled frames; --video-pruning-rate overrides the config's EVS rate
    (0 = off, as the original script): the tokens equal those of a copy of the model whose config.json
    says that rate."""
    import shutil

    from click.testing import CliRunner

    from nvl_nemotron_vl.bridge import NemotronVLBridge
    from nvlcore.cli import build_cli

    video_id = NemotronVLBridge.from_hf_dir(toy).config.video_context_token_id

    def run(model: Path, *extra: str) -> dict:
        res = CliRunner().invoke(build_cli(), ["generate", "--hf-model-path", str(model), "--video-path",
                                               str(media["video"]), "--max-new-tokens", "6", "--device", "cpu",
                                               "--json", "--quiet", *extra])
        assert res.exit_code == 0, res.output
        return json.loads(res.stdout)

    def video_tokens(out: dict) -> int:
        return sum(t == video_id for t in out["prompt_token_ids"])

    three, five = run(toy, "--num-frames", "3", "--video-pruning-rate", "0"), run(toy, "--num_frames", "5")
    assert video_tokens(three) * 5 == video_tokens(five) * 3 > 0
    # the clip: 12 frames at 6 fps = 2 s; --fps 1 samples 2 frames
    assert video_tokens(run(toy, "--fps", "1")) * 3 == video_tokens(three) * 2

    config = json.loads((toy / "config.json").read_text())
    assert config["video_pruning_rate"] > 0
    off = tmp_path / "toy_evs_off"
    shutil.copytree(toy, off)
    (off / "config.json").write_text(json.dumps({**config, "video_pruning_rate": 0.0}))
    assert run(toy, "--video-pruning-rate", "0")["token_ids"] == run(off)["token_ids"]
    assert run(off, "--video_pruning_rate", str(config["video_pruning_rate"]))["token_ids"] == run(toy)["token_ids"]

    # The tiny toy's greedy tokens barely depend on the video, so compare what the option sets, the
    # prefill logits: rate 0 on the toy = the EVS-off copy, and differs from the config's rate.
    from nvl_nemotron_vl import load_generator

    conv = build_conversation("What happens?", video=media["video"])

    def prefill_logits(model: Path, rate: float | None) -> torch.Tensor:
        gen = load_generator(model, device="cpu", video_pruning_rate=rate)
        p = gen.prepare(conv)
        ids = p["input_ids"].reshape(1, -1)
        cache = gen.model.allocate_cache(1, ids.shape[1] + 1, dtype=torch.float32, device="cpu")
        with torch.no_grad():
            return gen.model.prefill(ids, attention_mask=torch.ones_like(ids), cache=cache,
                                     pixel_values=p["pixel_values"].float(), num_frames=p["num_frames"])

    zero, off_logits, default = prefill_logits(toy, 0.0), prefill_logits(off, None), prefill_logits(toy, None)
    torch.testing.assert_close(zero, off_logits, rtol=0, atol=0)
    assert (zero - default).nan_to_num(0.0).abs().max() > 1e-3  # (-inf - -inf at suppressed ids)
    torch.testing.assert_close(prefill_logits(off, config["video_pruning_rate"]), default, rtol=0, atol=0)

    runner = CliRunner()
    for bad, msg in ((["--num-frames", "3"], "also give --video-path"),
                     (["--video-path", str(media["video"]), "--num-frames", "3", "--fps", "1"], "not both"),
                     (["--video-path", str(media["video"]), "--video-pruning-rate", "1"], "video-pruning-rate")):
        res = runner.invoke(build_cli(), ["generate", "--hf-model-path", str(toy), *bad])
        assert res.exit_code == 2 and msg in res.output, res.output


def test_cli_checks_the_video_before_the_model_loads(toy, tmp_path) -> None:
    """An unreadable video is one line naming it, said before any weights load (images already were)."""
    from click.testing import CliRunner

    from nvlcore.cli import build_cli

    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"this is not a video" * 10)
    res = CliRunner().invoke(build_cli(), ["generate", "--hf-model-path", str(toy), "--video-path", str(bad),
                                           "--device", "cpu"])
    assert res.exit_code == 1 and f"--video-path {bad}" in res.stderr, res.output
    assert "loading" not in res.stderr and "Traceback" not in res.output


def test_cli_refuses_a_prompt_longer_than_the_models_context(toy, tmp_path) -> None:
    """The model's context (llm_config.max_position_embeddings) bounds prompt + new tokens: one line, no decode."""
    import shutil

    from click.testing import CliRunner

    from nvlcore.cli import build_cli

    short = tmp_path / "short_context"
    shutil.copytree(toy, short)
    config = json.loads((short / "config.json").read_text())
    config["llm_config"]["max_position_embeddings"] = 64
    (short / "config.json").write_text(json.dumps(config))
    (tmp_path / "long.txt").write_text("word " * 200)
    res = CliRunner().invoke(build_cli(), ["generate", "--hf-model-path", str(short), "--prompt-file",
                                           str(tmp_path / "long.txt"), "--device", "cpu"])
    assert res.exit_code == 1 and "longer than the model's context of 64 tokens" in res.output, res.output
    res = CliRunner().invoke(build_cli(), ["generate", "--hf-model-path", str(short), "--prompt", "Hi",
                                           "--max-new-tokens", "100", "--device", "cpu"])
    assert res.exit_code == 1 and "lower max_new_tokens to" in res.output, res.output
    ok = CliRunner().invoke(build_cli(), ["generate", "--hf-model-path", str(short), "--prompt", "Hi",
                                          "--max-new-tokens", "4", "--device", "cpu", "--quiet"])
    assert ok.exit_code == 0, ok.output
