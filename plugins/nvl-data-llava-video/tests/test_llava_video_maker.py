"""make_llava_video_178k_dataset on a local copy in LLaVA-Video-178K's real layout (JSON per subset + videos)."""

from __future__ import annotations

from pathlib import Path

import pytest

from nvl_data_llava_video.maker import LlavaVideo178kDataset
from nvl_data_testing import write_hub_dataset, write_test_video
from nvlcore.data.makers import SplitNotAvailableError

REL = "NextQA/NExTVideo/0000/2440175990.mp4"


def row(i: int, video: str, conversations) -> dict:
    return {"id": f"row{i}", "conversations": conversations, "data_source": "0_30_s_nextqa", "video": video}


def qa(*pairs):
    out = []
    for q, a in pairs:
        out += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
    return out


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("llava_video")
    videos = base / "videos"
    write_test_video(videos / REL, num_frames=12, fps=6, width=32, height=32)
    write_test_video(videos / "NextQA/NExTVideo/0001/other.mp4", num_frames=6, fps=6, width=32, height=32)
    write_test_video(base / "outside.mp4", num_frames=4, fps=4, width=32, height=32)  # exists, but outside the root
    nextqa = [
        row(0, REL,
            qa(("<image>\nWhat does the man do?", "He waves."),
               ("And then? <video>", " He leaves. "))),  # usable, 2 turns
        row(1, "NextQA/NExTVideo/0000/missing.mp4", qa(("<image>\nQ?", "A."))),   # missing file
        row(2, "../outside.mp4", qa(("<image>\nQ?", "A."))),                         # escapes the root
        row(3, str(base / "outside.mp4"), qa(("<image>\nQ?", "A."))),               # absolute path elsewhere
        row(4, REL, qa(("<image>\nQ?", "<video>  "))),                              # no answer left
        row(5, "", qa(("Q?", "A."))),                                                 # no video
        row(6, REL,
            [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "Red."}, {"from": "human", "value": ""}]),
    ]
    other = [row(7, "NextQA/NExTVideo/0001/other.mp4", qa(("<image>\nHow many?", "Two.")))]
    annotations = write_hub_dataset(
        base / "LLaVA-Video-178K",
        {"0_30_s_nextqa/0_30_s_nextqa_oe_qa_processed.json": nextqa,
         "1_2_m_nextqa/1_2_m_nextqa_oe_qa_processed.json": other},
        {"0_30_s_nextqa": {"open_ended": "0_30_s_nextqa/*oe*.json"},
         "1_2_m_nextqa": {"open_ended": "1_2_m_nextqa/*oe*.json"}},
    )
    return annotations, videos


def make(layout, tmp_path: Path, **kw) -> LlavaVideo178kDataset:
    annotations, videos = layout
    return LlavaVideo178kDataset(path=str(annotations), video_root_path=str(videos), cache_dir=str(tmp_path), **kw)


def test_conversations_keep_every_turn_with_the_video_first(layout, tmp_path: Path) -> None:
    made = make(layout, tmp_path)
    assert len(made) == 2
    conv = made[0]["conversation"]
    video = str((layout[1] / REL).resolve())
    assert conv == [
        {"role": "user",
         "content": [{"type": "video", "path": video}, {"type": "text", "text": "What does the man do?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "He waves."}]},
        {"role": "user", "content": [{"type": "text", "text": "And then?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "He leaves."}]},
    ]
    # A first human turn that is only a placeholder keeps the video; empty later turns are dropped.
    assert made[1]["conversation"] == [
        {"role": "user", "content": [{"type": "video", "path": video}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Red."}]},
    ]


def test_bad_rows_are_skipped_and_escaping_paths_refused(layout, tmp_path: Path) -> None:
    made = make(layout, tmp_path)
    assert dict(made.skipped) == {"missing video file": 1, "video path escapes video_root_path": 2, "no answer": 1,
                                  "no video": 1}
    with pytest.raises(ValueError, match="escapes video_root_path"):
        made.convert({"video": "../outside.mp4", "conversations": qa(("q", "a"))})


def test_splits_train_is_open_ended(layout, tmp_path: Path) -> None:
    assert make(layout, tmp_path, split="open_ended")[0] == make(layout, tmp_path, split="train")[0]
    with pytest.raises(SplitNotAvailableError,
                       match=r"got split 'validation'.*'train' is the source's 'open_ended' split"):
        make(layout, tmp_path, split="validation")


def test_subsets_are_concatenated(layout, tmp_path: Path) -> None:
    made = make(layout, tmp_path, subsets=["0_30_s_nextqa", "1_2_m_nextqa"])
    assert len(made) == 3
    assert made[2]["conversation"][1]["content"][0]["text"] == "Two."
    assert len(make(layout, tmp_path, subsets="1_2_m_nextqa")) == 1


def test_video_root_path_is_required_and_must_exist(layout, tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="video_root_path is required.*docs/datasets.md"):
        LlavaVideo178kDataset(path=str(layout[0]))
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        LlavaVideo178kDataset(path=str(layout[0]), video_root_path=str(tmp_path / "nope"))


def test_registered_under_name_and_alias() -> None:
    from nvlcore.plugins import get_registry

    reg = get_registry("dataset_maker")
    assert reg.get("llava_video_178k") is LlavaVideo178kDataset
    assert reg.get("make_llava_video_178k_dataset") is LlavaVideo178kDataset


def test_nvl_data_preview_with_the_toy_model(layout, tmp_path: Path) -> None:
    import json

    from click.testing import CliRunner

    from nvlcore.cli import build_cli

    runner = CliRunner()
    toy = tmp_path / "toy"
    assert runner.invoke(build_cli(), ["toy-model", str(toy)]).exit_code == 0
    kwargs = json.dumps({"path": str(layout[0]), "video_root_path": str(layout[1]),
                         "cache_dir": str(tmp_path / "cache")})
    result = runner.invoke(build_cli(), ["data", "preview", "llava_video_178k", "--maker-kwargs", kwargs,
                                         "--hf-model-path", str(toy), "--json"])
    assert result.exit_code == 0, result.output
    first, second = [json.loads(x) for x in result.stdout.splitlines()]
    assert first["num_images"] == 0 and first["num_frames"] == 10  # 12-frame clip, 10 sampled
    assert first["target"] == "He waves.\nHe leaves."
    assert first["supervised"] == "He waves.\n<SPECIAL_12>\nHe leaves.\n<SPECIAL_12>"
    assert "<SPECIAL_11>User\nThis is a video:\nFrame 1 sampled at 0.00 seconds: <img><video*" in first["prompt"]
    assert "Frame 10 sampled at 1.83 seconds: " in first["prompt"]  # frame index 11 of a 6-fps clip
    assert second["num_frames"] == 10 and second["supervised"] == "Red.\n<SPECIAL_12>"
    missing = runner.invoke(build_cli(), ["data", "preview", "llava_video_178k", "--hf-model-path", str(toy)])
    assert missing.exit_code == 2 and "video_root_path: required" in missing.output


# -- nvl eval: multiple-choice accuracy, token F1 and ROUGE-L ------------------------------------


def test_llava_video_metrics_hand_computed() -> None:
    from nvl_data_llava_video.metrics import LlavaVideoMetrics, is_multiple_choice

    assert is_multiple_choice("C.") and is_multiple_choice("(B) a dog") and is_multiple_choice("A")
    assert not is_multiple_choice("A man waves.") and not is_multiple_choice("He waves.")
    m = LlavaVideoMetrics()
    assert m.score("C. He runs", "C.") == {"mc_accuracy": 1.0}
    assert m.score("B", "C.") == {"mc_accuracy": 0.0}
    s = m.score("he waves his hand", "He waves.")
    # tokens: pred [he, waves, his, hand], ref [he, waves]: common 2, P 1/2, R 1 -> F1 2/3; ROUGE-L the same (LCS 2)
    assert s == {"token_f1": pytest.approx(2 / 3), "rouge_l": pytest.approx(2 / 3)}
    # each summary metric averages over its kind of question
    from nvlcore.eval.metrics import aggregate_scores

    summary = aggregate_scores(m, [m.score("C", "C."), m.score("A", "B"), s])
    assert summary == {"mc_accuracy": 0.5, "token_f1": pytest.approx(2 / 3), "rouge_l": pytest.approx(2 / 3)}


def test_nvl_eval_predictions_references_score_one_and_empty_zero(layout, tmp_path: Path) -> None:
    from nvlcore.testing.metrics import check_reference_and_empty

    check_reference_and_empty("llava_video_178k", ["He waves.", "He leaves.", "C.", "A"], tmp_path,
                              ["mc_accuracy", "token_f1", "rouge_l"])


@pytest.fixture(scope="module")
def mc_layout(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Both kinds of question, as the source ships them: open_ended and multi_choice files per subset."""
    base = tmp_path_factory.mktemp("llava_video_mc")
    videos = base / "videos"
    write_test_video(videos / REL, num_frames=12, fps=6, width=32, height=32)
    oe = [row(0, REL, qa(("<image>\nWhat does the man do?", "He waves.")))]
    mc = [row(1, REL, qa(("<image>\nWhat does the man do?\nA. runs\nB. waves\nC. sits\n"
                          "Answer with the option's letter from the given choices directly.", "B.")))]
    annotations = write_hub_dataset(
        base / "LLaVA-Video-178K",
        {"0_30_s_nextqa/0_30_s_nextqa_oe_qa_processed.json": oe,
         "0_30_s_nextqa/0_30_s_nextqa_mc_qa_processed.json": mc},
        {"0_30_s_nextqa": {"open_ended": "0_30_s_nextqa/*oe*.json", "multi_choice": "0_30_s_nextqa/*mc*.json"}},
    )
    return annotations, videos


def test_nvl_eval_end_to_end_with_the_toy_model(mc_layout, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from nvlcore.cli import build_cli
    from nvlcore.testing.metrics import run_eval_end_to_end

    toy = tmp_path / "toy"
    assert CliRunner().invoke(build_cli(), ["toy-model", str(toy)]).exit_code == 0
    kwargs = {"path": str(mc_layout[0]), "video_root_path": str(mc_layout[1]), "cache_dir": str(tmp_path / "cache")}
    summary, lines = run_eval_end_to_end(toy, "llava_video_178k", kwargs, tmp_path, split="multi_choice", limit=1)
    assert set(summary["metrics"]) == {"mc_accuracy"} and lines[0]["reference"] == "B."
    summary, lines = run_eval_end_to_end(toy, "llava_video_178k", kwargs, tmp_path, limit=1)  # default: train
    assert set(summary["metrics"]) == {"token_f1", "rouge_l"} and lines[0]["reference"] == "He waves."
