"""The Nemotron VL processor: tiling, chat template, loss mask, video, truncation, batching."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nvl_data_testing import frame_level, write_test_video
from nvl_nemotron_vl.image_processing import CLIP_MEAN, CLIP_STD, dynamic_tiles, num_tiles
from nvl_nemotron_vl.processor import NemotronVLProcessor, SampleError
from nvl_nemotron_vl.toy_tokenizer import write_toy_tokenizer
from nvlcore.data.schema import ConversationError


def make_model_dir(root: Path, *, image_size: int = 64, **extra) -> Path:
    """A toy HF dir holding what the processor reads: config.json and the toy tokenizer."""
    root.mkdir(parents=True, exist_ok=True)
    ids = write_toy_tokenizer(root)
    config = {
        "architectures": ["NemotronH_Nano_VL_V2"],
        "model_type": "NemotronH_Nano_VL_V2",
        "force_image_size": image_size,
        "patch_size": 16,
        "downsample_ratio": 0.5,
        "img_context_token_id": ids["<image>"],
        "video_context_token_id": ids["<video>"],
        "img_context_token": "<image>",
        "img_start_token": "<img>",
        "img_end_token": "</img>",
        "video_context_token": "<video>",
        **extra,
    }
    (root / "config.json").write_text(json.dumps(config))
    return root


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("toy_vl"))


@pytest.fixture(scope="module")
def proc(model_dir: Path) -> NemotronVLProcessor:
    return NemotronVLProcessor.from_hf_dir(model_dir)


def solid(w: int, h: int, color=(255, 0, 0)) -> Image.Image:
    return Image.new("RGB", (w, h), color)


def supervised_runs(p: NemotronVLProcessor, sample) -> list[str]:
    ids, mask = sample["input_ids"].tolist(), sample["loss_mask"].tolist()
    runs, cur = [], []
    for i in range(len(ids) - 1):
        if mask[i]:
            cur.append(ids[i + 1])
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return [p.tokenizer.decode(r) for r in runs]


# -- tiling -----------------------------------------------------------------------------------

TILING_VECTORS = [((512, 512), 1), ((1000, 1000), 5), ((1280, 720), 3), ((1920, 1080), 9), ((800, 600), 13),
                  ((300, 200), 7)]


@pytest.mark.parametrize(("size", "expected"), TILING_VECTORS)
def test_tiling_vectors_of_the_reference(size, expected) -> None:
    assert num_tiles(*size, image_size=512, max_num_tiles=12, use_thumbnail=True) == expected
    tiles = dynamic_tiles(solid(*size), image_size=512, max_num_tiles=12, use_thumbnail=True)
    assert len(tiles) == expected and all(t.size == (512, 512) for t in tiles)


def test_256_context_tokens_per_tile_at_512(tmp_path: Path) -> None:
    p = NemotronVLProcessor.from_hf_dir(make_model_dir(tmp_path, image_size=512))
    assert p.num_image_token == 256
    conv = {"conversation": [
        {"role": "user",
         "content": [{"type": "image", "image": solid(1920, 1080)}, {"type": "text", "text": "Describe this image."}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Red."}]},
    ]}
    s = p(conv)
    ids = s["input_ids"]
    assert s["num_tiles"] == [9]
    assert int((ids == p.img_context_id).sum()) == 9 * 256
    assert s["pixel_values"].shape == (9, 3, 512, 512)
    # <img> + 2304 context tokens + </img>, contiguous.
    start = int((ids == p.img_start_id).nonzero()[0])
    assert int(ids[start + 1 + 9 * 256]) == p.img_end_id
    assert bool((ids[start + 1 : start + 1 + 9 * 256] == p.img_context_id).all())


def test_tiles_are_row_major_with_thumbnail_last_and_clip_normalised(proc) -> None:
    image = Image.new("RGB", (128, 64))
    image.paste((255, 0, 0), (0, 0, 64, 64))
    image.paste((0, 0, 255), (64, 0, 128, 64))
    tiles = dynamic_tiles(image, image_size=64, max_num_tiles=12)
    assert len(tiles) == 3  # (2, 1) grid + thumbnail
    conv = {"conversation": [{"role": "user", "content": [{"type": "image", "image": image}]},
                             {"role": "assistant", "content": "ok"}]}
    pv = proc(conv)["pixel_values"]
    mean, std = torch.tensor(CLIP_MEAN), torch.tensor(CLIP_STD)
    red = (torch.tensor([1.0, 0.0, 0.0]) - mean) / std
    blue = (torch.tensor([0.0, 0.0, 1.0]) - mean) / std
    centre = pv[:, :, 16:48, 16:48].mean(dim=(2, 3))
    torch.testing.assert_close(centre[0], red, atol=1e-4, rtol=0)
    torch.testing.assert_close(centre[1], blue, atol=1e-4, rtol=0)
    # The thumbnail holds both halves.
    torch.testing.assert_close(pv[2, :, 32, 8], red, atol=1e-4, rtol=0)
    torch.testing.assert_close(pv[2, :, 32, 56], blue, atol=1e-4, rtol=0)


# -- chat template and loss mask ----------------------------------------------------------------


def test_multi_turn_multi_image_supervises_only_assistant_tokens_and_end_of_turn(proc) -> None:
    conv = {"conversation": [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user",
         "content": [{"type": "image", "image": solid(64, 64)}, {"type": "image", "image": solid(128, 64, (0, 255, 0))},
                                     {"type": "text", "text": "Which image is green?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "The second one."}]},
        {"role": "user", "content": [{"type": "text", "text": "And the first?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": " Red. "}]},
    ]}
    s = proc(conv)
    assert s["num_tiles"] == [1, 3]
    assert supervised_runs(proc, s) == ["The second one.\n<SPECIAL_12>", "Red.\n<SPECIAL_12>"]
    ids, labels, mask = s["input_ids"], s["labels"], s["loss_mask"]
    assert torch.equal(labels[:-1], ids[1:]) and int(labels[-1]) == -100
    targets = ids[1:][mask[:-1].bool()]
    for forbidden in (proc.img_context_id, proc.img_start_id, proc.img_end_id, 20, 21, 10, 11):
        assert forbidden not in targets.tolist()  # no media, no <think></think>, no headers
    assert int((targets == proc.eos_id).sum()) == 2
    assert s["num_supervised_tokens"] == int(mask.sum())
    text = proc.render_tokens(ids)
    assert text == (
        "<SPECIAL_10>System\nBe brief.\n<SPECIAL_11>User\n<img><image*4></img><img><image*4><image*4><image*4></img>"
        "Which image is green?\n<SPECIAL_11>Assistant\n<think></think>The second one.\n<SPECIAL_12>\n"
        "<SPECIAL_11>User\nAnd the first?\n<SPECIAL_11>Assistant\n<think></think>Red.\n<SPECIAL_12>\n"
    )


def _collapse(p: NemotronVLProcessor, ids: list[int]) -> list[int]:
    """HF-template view of a sample: each <img><ctx>...</img> block becomes one <image>/<video>."""
    out, i = [], 0
    while i < len(ids):
        if ids[i] == p.img_start_id:
            j = ids.index(p.img_end_id, i)
            out.append(ids[i + 1])
            i = j + 1
        else:
            out.append(ids[i])
            i += 1
    return out


def test_generation_prompt_equals_the_tokenizers_chat_template(proc) -> None:
    conv = {"conversation": [
        {"role": "user",
         "content": [{"type": "image", "image": solid(64, 64)},
                     {"type": "text", "text": "Describe this image. /no_think"}]},
        {"role": "assistant", "content": "<think>red everywhere</think> It is red."},
        {"role": "user", "content": "Are you sure? /think"},
    ]}
    s = proc(conv, add_generation_prompt=True)
    assert s["num_supervised_tokens"] == 0
    hf = [{"role": t["role"], "content": t["content"] if isinstance(t["content"], str)
           else [{"type": i["type"], "text": i.get("text")} for i in t["content"]]} for t in conv["conversation"]]
    expected = proc.tokenizer.apply_chat_template(hf, tokenize=False, add_generation_prompt=True)
    assert expected.endswith("<SPECIAL_11>Assistant\n<think>\n")
    assert _collapse(proc, s["input_ids"].tolist()) == proc.tokenizer(expected, add_special_tokens=False).input_ids


def test_think_block_none_renders_training_turns_like_the_template(proc) -> None:
    conv = {"conversation": [
        {"role": "user", "content": [{"type": "text", "text": "Hi /no_think"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Hello."}]},
    ]}
    s = proc.with_options(think_block="none")(conv)
    expected = proc.tokenizer.apply_chat_template(conv["conversation"], tokenize=False)
    assert s["input_ids"].tolist() == proc.tokenizer(expected, add_special_tokens=False).input_ids
    # A reasoning trace in the answer is kept and supervised; no empty block is inserted before it.
    conv["conversation"][1]["content"] = "<think>greeting</think>Hello."
    runs = supervised_runs(proc, proc(conv))
    assert runs == ["<think>greeting</think>Hello.\n<SPECIAL_12>"]
    assert "<think></think>" not in proc.render_tokens(proc(conv)["input_ids"])


def test_system_prompt_option_and_flags_are_stripped(proc) -> None:
    conv = {"conversation": [{"role": "user", "content": "What? /no_think"}, {"role": "assistant", "content": "This."}]}
    text = proc.with_options(system_prompt="You are terse.")(conv)["input_ids"]
    assert proc.render_tokens(text).startswith("<SPECIAL_10>System\nYou are terse.\n<SPECIAL_11>User\nWhat?\n")


def test_text_only_sample_and_batch_have_no_pixels(proc) -> None:
    conv = {"conversation": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}
    s = proc(conv)
    assert s["pixel_values"] is None and s["num_tiles"] == [] and s["num_frames"] == []
    batch = proc.collate([s])
    assert "pixel_values" not in batch and batch["num_image_tiles"].numel() == 0


@pytest.mark.parametrize(
    ("conv", "message"),
    [
        ({"conversation": [{"role": "user", "content": "hello"}]}, "no supervised token"),
        ({"conversation": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "  "}]}, "no text"),
        ({"conversation": [{"role": "user", "content": "see <image> here"}, {"role": "assistant", "content": "ok"}]},
         "conversation[0].content[0].text: text contains the reserved token string '<image>'"),
        ({"conversation": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "bye <SPECIAL_12>"}]},
         "reserved token string '<SPECIAL_12>'"),
    ],
)
def test_unusable_samples_are_errors(proc, conv, message) -> None:
    with pytest.raises(SampleError, match=r"^row 3 of test/train: .*" + __import__("re").escape(message)):
        proc(conv, where="row 3 of test/train")


def test_schema_errors_name_the_row_and_field(proc) -> None:
    conv = {"conversation": [{"role": "user", "content": [{"type": "image"}]}, {"role": "assistant", "content": "x"}]}
    with pytest.raises(ConversationError, match=r"row 9 of m/train: conversation\[0\]\.content\[0\]\.image"):
        proc(conv, where="row 9 of m/train")


def test_image_path_items_and_unreadable_files(proc, tmp_path: Path) -> None:
    good = tmp_path / "a.png"
    solid(64, 64).save(good)
    bad = tmp_path / "b.png"
    bad.write_bytes(b"not a png")
    conv = {"conversation": [{"role": "user", "content": [{"type": "image", "image": str(good)}]},
                             {"role": "assistant", "content": "red"}]}
    assert proc(conv)["num_tiles"] == [1]
    conv["conversation"][0]["content"][0]["image"] = str(bad)
    with pytest.raises(SampleError, match=r"conversation\[0\]\.content\[0\]\.image: cannot open image file .*b\.png"):
        proc(conv)


# -- truncation ---------------------------------------------------------------------------------


def _two_image_conv():
    return {"conversation": [
        {"role": "user", "content": [{"type": "image", "image": solid(64, 64)}, {"type": "text", "text": "Colour?"}]},
        {"role": "assistant", "content": "Red."},
        {"role": "user",
         "content": [{"type": "image", "image": solid(128, 64)}, {"type": "text", "text": "And this one?"}]},
        {"role": "assistant", "content": "Also red."},
    ]}


def test_truncation_keeps_whole_media_and_fails_loudly(proc) -> None:
    conv = _two_image_conv()
    full = proc(conv)
    ids = full["input_ids"].tolist()
    n = len(ids)
    second_img = [i for i, t in enumerate(ids) if t == proc.img_start_id][1]
    first_eos = ids.index(proc.eos_id)

    # A cut between the first answer and the second image: the second image's tiles are dropped.
    s = proc.with_options(seq_length=second_img)(conv)
    assert s["truncated_from"] == n and s["input_ids"].numel() == second_img
    assert s["num_tiles"] == [1] and s["pixel_values"].shape[0] == 1
    assert supervised_runs(proc, s) == ["Red.\n<SPECIAL_12>"]

    # A cut inside the second image's context tokens is refused.
    with pytest.raises(SampleError,
                       match=r"conversation\[2\]\.content\[0\]: truncating .* would cut through this image"):
        proc.with_options(seq_length=second_img + 3)(conv, where="row 0")

    # A cut before the first answer would leave nothing to learn: refused.
    first_answer = first_eos - 3
    with pytest.raises(SampleError, match="would leave none of its .* supervised tokens"):
        proc.with_options(seq_length=first_answer - 2)(conv)
    assert first_eos < second_img

    # An inference prompt is never cut (that would drop the question).
    with pytest.raises(SampleError, match=r"the prompt has \d+ tokens, more than seq_length=10"):
        proc.with_options(seq_length=10)(conv, add_generation_prompt=True)


# -- video ---------------------------------------------------------------------------------------


def test_video_is_decoded_with_decord_from_an_mp4(proc, tmp_path: Path) -> None:
    video = write_test_video(tmp_path / "clip.mp4", num_frames=30, fps=10, width=64, height=48)
    conv = {"conversation": [
        {"role": "user", "content": [{"type": "video", "path": str(video)}, {"type": "text", "text": "What changes?"}]},
        {"role": "assistant", "content": "It gets brighter."},
    ]}
    s = proc(conv)
    expected_idx = [0, 3, 6, 10, 13, 16, 19, 23, 26, 29]  # unique(round(linspace(0, 29, 10)))
    assert s["num_frames"] == [10] and s["num_tiles"] == []
    assert s["frame_timestamps"] == [[i / 10 for i in expected_idx]]
    assert s["pixel_values"].shape == (10, 3, 64, 64)
    # Un-normalise the green channel and compare with the grey level each frame was written with.
    green = s["pixel_values"][:, 1].mean(dim=(1, 2)) * CLIP_STD[1] + CLIP_MEAN[1]
    np.testing.assert_allclose((green * 255).numpy(), [frame_level(i) for i in expected_idx], atol=3)
    ids = s["input_ids"]
    assert int((ids == proc.video_context_id).sum()) == 10 * proc.num_image_token
    assert int((ids == proc.img_context_id).sum()) == 0
    text = proc.render_tokens(ids)
    assert "<SPECIAL_11>User\nThis is a video:\nFrame 1 sampled at 0.00 seconds: <img><video*4></img>\n" in text
    assert "Frame 10 sampled at 2.90 seconds: <img><video*4></img>\nWhat changes?\n" in text
    assert supervised_runs(proc, s) == ["It gets brighter.\n<SPECIAL_12>"]
    batch = proc.collate([s, proc(conv)])
    assert batch["num_frames"].tolist() == [10, 10] and batch["pixel_values"].shape[0] == 20

    # Target-fps sampling with a cap, and a custom frame format.
    p2 = proc.with_options(video_fps=2.0, video_max_frames=4, video_prefix="", frame_prefix="<t={seconds:.1f}>",
                           frame_suffix="")
    s2 = p2(conv)
    assert s2["num_frames"] == [4] and s2["frame_timestamps"] == [[0.0, 1.0, 1.9, 2.9]]
    assert "User\n<t=0.0><img><video*4></img><t=1.0>" in p2.render_tokens(s2["input_ids"])


def test_missing_video_file_names_the_file(proc, tmp_path: Path) -> None:
    conv = {"conversation": [{"role": "user", "content": [{"type": "video", "path": str(tmp_path / "nope.mp4")}]},
                             {"role": "assistant", "content": "x"}]}
    with pytest.raises(SampleError,
                       match=r"row 1: conversation\[0\]\.content\[0\]\.path: video file not found: .*nope\.mp4"):
        proc(conv, where="row 1")


# -- batching and workers -------------------------------------------------------------------------


def test_collate_pads_to_multiple_of_128_capped_at_seq_length(proc) -> None:
    a = proc({"conversation": [{"role": "user", "content": [{"type": "image", "image": solid(64, 64)}]},
                               {"role": "assistant", "content": "red"}]})
    b = proc({"conversation": [{"role": "user", "content": [{"type": "image", "image": solid(128, 64, (0, 0, 255))}]},
                               {"role": "assistant", "content": "blue " * 40}]})
    batch = proc.collate([a, b])
    L = batch["input_ids"].shape[1]
    assert L % 128 == 0 and L >= b["input_ids"].numel()
    na = a["input_ids"].numel()
    assert batch["attention_mask"][0].tolist() == [1] * na + [0] * (L - na)
    assert bool((batch["labels"][0, na:] == -100).all()) and float(batch["loss_mask"][0, na:].sum()) == 0
    assert bool((batch["input_ids"][0, na:] == proc.pad_token_id).all())
    # Tiles of row 0 first, then row 1's (in the order of their context tokens).
    assert batch["num_image_tiles"].tolist() == [1, 3]
    assert torch.equal(batch["pixel_values"][0], a["pixel_values"][0])
    assert torch.equal(batch["pixel_values"][1:], b["pixel_values"])
    capped = proc.with_options(seq_length=int(b["input_ids"].numel()) + 1)
    assert capped.collate([a, b])["input_ids"].shape[1] == b["input_ids"].numel() + 1
    fixed = proc.with_options(seq_length=1000, pad_to_max_length=True)
    assert fixed.collate([a])["input_ids"].shape == (1, 1000)
    with pytest.raises(ValueError, match="pad_to_max_length needs seq_length"):
        proc.with_options(pad_to_max_length=True)


def test_processor_pickles_and_runs_in_dataloader_workers(proc) -> None:
    clone = pickle.loads(pickle.dumps(proc))
    assert clone._tokenizer is None
    convs = [{"conversation": [{"role": "user", "content": [{"type": "image", "image": solid(64 * (i + 1), 64)}]},
                               {"role": "assistant", "content": f"{i} tiles"}]} for i in range(4)]
    # The clone lost its tokenizer in pickling: each worker loads it again.
    loader = torch.utils.data.DataLoader(convs, batch_size=2, num_workers=2, collate_fn=clone.process_batch)
    batches = list(loader)
    assert [b["num_image_tiles"].tolist() for b in batches] == [[1, 3], [4, 5]]


def test_from_hf_dir_reads_files_and_checks_them(tmp_path: Path) -> None:
    d = make_model_dir(tmp_path / "m", image_size=64)
    (d / "preprocessor_config.json").write_text(json.dumps({"image_size": 64, "max_num_tiles": 4,
                                                            "use_thumbnail": False}))
    p = NemotronVLProcessor.from_hf_dir(d, seq_length=1024)
    assert (p.config.max_num_tiles, p.config.use_thumbnail, p.config.seq_length) == (4, False, 1024)
    with pytest.raises(TypeError, match="unknown processor option.*max_tiles"):
        NemotronVLProcessor.from_hf_dir(d, max_tiles=3)
    bad = make_model_dir(tmp_path / "bad", img_context_token_id=131072)
    with pytest.raises(ValueError, match="img_context_token_id=131072 but the tokenizer .* gives '<image>' id 512"):
        NemotronVLProcessor.from_hf_dir(bad)
    (d / "preprocessor_config.json").write_text(json.dumps({"image_size": 448}))
    with pytest.raises(ValueError, match="preprocessor_config.json: image_size=448 disagrees"):
        NemotronVLProcessor.from_hf_dir(d)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        NemotronVLProcessor.from_hf_dir(tmp_path)
