"""make_medpix_dataset on a local copy in MedPix-VQA's real schema (parquet; ``image_id`` is an Image)."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from nvl_data_medpix.maker import MedPixDataset
from nvl_data_testing import write_hub_dataset
from nvlcore.data.makers import SplitNotAvailableError


def medpix_split(rows):
    from datasets import Dataset, Features, Value
    from datasets import Image as HFImage

    feats = Features({"image_id": HFImage(), "mode": Value("string"), "case_id": Value("string"),
                      "question": Value("string"), "answer": Value("string")})
    cols = {k: [r[i] for r in rows] for i, k in enumerate(["image_id", "mode", "case_id", "question", "answer"])}
    return Dataset.from_dict(cols, features=feats)


@pytest.fixture(scope="module")
def local_medpix(tmp_path_factory: pytest.TempPathFactory) -> Path:
    ct = Image.new("L", (50, 40), 128)  # greyscale, as many scans are
    train = medpix_split([
        (ct, "CT", "MPX1009", "What organ is shown? ", " The liver."),
        (ct, "MRI", "MPX1010", "Where is the lesion?", ""),            # skipped: empty answer
        (None, "CT", "MPX1011", "What is shown?", "Kidney."),          # skipped: missing image
        (ct, "CT", "MPX1012", None, "Spleen."),                        # skipped: no question
    ])
    val = medpix_split([(ct, "CT", "MPX2000", "Is there a fracture?", "No.")])
    return write_hub_dataset(
        tmp_path_factory.mktemp("MedPix-VQA"),
        {"data/train-00000-of-00001.parquet": train, "data/validation-00000-of-00001.parquet": val},
        {"default": {"train": "data/train-*", "validation": "data/validation-*"}},
    )


def test_image_id_column_is_the_image(local_medpix: Path, tmp_path: Path) -> None:
    made = MedPixDataset(split="train", path=str(local_medpix), cache_dir=str(tmp_path))
    assert len(made) == 1 and made.num_skipped == 3
    assert dict(made.skipped) == {"empty answer": 1, "missing image": 1, "empty question": 1}
    conv = made[0]["conversation"]
    image = conv[0]["content"][0]["image"]
    assert conv[0]["content"][0]["type"] == "image" and image.size == (50, 40) and image.mode == "L"
    assert conv[0]["content"][1] == {"type": "text", "text": "What organ is shown?"}
    assert conv[1] == {"role": "assistant", "content": [{"type": "text", "text": "The liver."}]}


def test_validation_split_and_no_test_split(local_medpix: Path, tmp_path: Path) -> None:
    val = MedPixDataset(split="validation", path=str(local_medpix), cache_dir=str(tmp_path))
    assert val[0]["conversation"][1]["content"][0]["text"] == "No."
    with pytest.raises(SplitNotAvailableError, match="has the splits 'train', 'validation'; got split 'test'"):
        MedPixDataset(split="test", path=str(local_medpix))


def test_registered_under_name_and_alias() -> None:
    from nvlcore.plugins import get_registry

    reg = get_registry("dataset_maker")
    assert reg.get("medpix") is MedPixDataset and reg.get("make_medpix_dataset") is MedPixDataset


def test_nvl_data_preview_with_the_toy_model(local_medpix: Path, tmp_path: Path) -> None:
    import json

    from click.testing import CliRunner

    from nvlcore.cli import build_cli

    runner = CliRunner()
    toy = tmp_path / "toy"
    assert runner.invoke(build_cli(), ["toy-model", str(toy)]).exit_code == 0
    kwargs = json.dumps({"path": str(local_medpix), "cache_dir": str(tmp_path / "cache")})
    result = runner.invoke(build_cli(), ["data", "preview", "medpix", "--maker-kwargs", kwargs,
                                         "--hf-model-path", str(toy), "--json"])
    assert result.exit_code == 0, result.output
    (line,) = [json.loads(x) for x in result.stdout.splitlines()]
    assert line["num_images"] == 1 and line["tiles_per_image"] == [13]  # 50x40 -> a 4x3 grid + thumbnail
    assert line["target"] == "The liver." and line["supervised"] == "The liver.\n<SPECIAL_12>"
    assert "What organ is shown?\n<SPECIAL_11>Assistant\n<think></think>The liver.\n<SPECIAL_12>\n" in line["prompt"]


# -- nvl eval: exact match, token F1, ROUGE-L ----------------------------------------------------


def test_medpix_metrics_hand_computed() -> None:
    from nvl_data_medpix.metrics import MedPixMetrics

    m = MedPixMetrics()
    assert m.score("the liver", "The liver.") == {"exact_match": 1.0, "token_f1": 1.0, "rouge_l": 1.0}
    s = m.score("A lesion in the liver", "Liver lesion")
    # normalised tokens: pred [lesion, in, liver], ref [liver, lesion]: common 2, P 2/3, R 1 -> F1 0.8
    assert s["exact_match"] == 0.0 and s["token_f1"] == pytest.approx(0.8)
    # ROUGE-L (rouge-score's tokens: a lesion in the liver / liver lesion): LCS 1 ("lesion" or "liver"),
    # P = 1/5, R = 1/2 -> F = 2PR/(P+R) = 2/7
    assert s["rouge_l"] == pytest.approx(2 / 7)


def test_nvl_eval_predictions_references_score_one_and_empty_zero(local_medpix: Path, tmp_path: Path) -> None:
    from nvlcore.testing.metrics import check_reference_and_empty

    refs = ["The liver.", "No.", "Axial CT of the abdomen shows a hypodense lesion."]
    check_reference_and_empty("medpix", refs, tmp_path, ["exact_match", "token_f1", "rouge_l"])


def test_nvl_eval_end_to_end_with_the_toy_model(local_medpix: Path, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from nvlcore.cli import build_cli
    from nvlcore.testing.metrics import run_eval_end_to_end

    toy = tmp_path / "toy"
    assert CliRunner().invoke(build_cli(), ["toy-model", str(toy)]).exit_code == 0
    kwargs = {"path": str(local_medpix), "cache_dir": str(tmp_path / "cache")}
    summary, lines = run_eval_end_to_end(toy, "medpix", kwargs, tmp_path, limit=1)  # default: validation
    assert set(summary["metrics"]) == {"exact_match", "token_f1", "rouge_l"}
    assert lines[0]["reference"] == "No." and lines[0]["question"] == "Is there a fracture?"
