"""make_cord_v2_dataset on a local copy in cord-v2's real schema (parquet: Image + JSON-string ground_truth)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from nvl_data_cord_v2.maker import CordV2Dataset, json2token, target_text
from nvl_data_testing import write_hub_dataset
from nvlcore.data.makers import SplitNotAvailableError

PARSE = {"total": {"total_price": "45,500"}, "menu": [{"nm": "A", "price": "1"}]}
PARSE_TOKENS = ("<s_total><s_total_price>45,500</s_total_price></s_total>"
                "<s_menu><s_price>1</s_price><s_nm>A</s_nm></s_menu>")


def test_json2token_reference_example_and_special_cases() -> None:
    assert json2token(PARSE) == PARSE_TOKENS  # the workflow reference's example
    assert json2token({"text_sequence": "raw text"}) == "raw text"
    assert json2token({"text_sequence": "x", "other": 1}) == "<s_text_sequence>x</s_text_sequence><s_other>1</s_other>"
    assert json2token({"menu": [{"nm": "A"}, {"nm": "B"},
                                "C"]}) == "<s_menu><s_nm>A</s_nm><sep/><s_nm>B</s_nm><sep/>C</s_menu>"
    assert json2token({"b": 2, "a": 1.5}, sort_json_key=False) == "<s_b>2</s_b><s_a>1.5</s_a>"
    # Keys reverse-sorted as strings, so "sub_total" comes before "menu" and after "total".
    assert json2token({"menu": "m", "total": "t",
                       "sub_total": "s"}) == "<s_total>t</s_total><s_sub_total>s</s_sub_total><s_menu>m</s_menu>"


def gt(parse=None, parses=None, **extra) -> str:
    obj = {"meta": {"version": "2.0.0", "split": "train", "image_id": 0}, "valid_line": [], **extra}
    if parse is not None:
        obj["gt_parse"] = parse
    if parses is not None:
        obj["gt_parses"] = parses
    return json.dumps(obj)


def cord_split(rows):
    from datasets import Dataset, Features, Value
    from datasets import Image as HFImage

    feats = Features({"image": HFImage(), "ground_truth": Value("string")})
    return Dataset.from_dict({"image": [r[0] for r in rows], "ground_truth": [r[1] for r in rows]}, features=feats)


@pytest.fixture(scope="module")
def local_cord(tmp_path_factory: pytest.TempPathFactory) -> Path:
    red = Image.new("RGB", (40, 60), (255, 0, 0))
    train = cord_split([
        (red, gt(PARSE)),                                                    # 0: usable
        (red, gt(parses=[{"total": {"cashprice": "9"}}, {"total": {"cashprice": "8"}}])),  # 1: first parse wins
        (red, "{not json"),                                                  # 2: skipped
        (red, gt()),                                                         # 3: skipped, no parse
        ({"bytes": b"\x89PNG broken", "path": None}, gt(PARSE)),             # 4: skipped, bad image
        (red, gt({"text_sequence": "  "})),                                  # 5: skipped, empty target
    ])
    val = cord_split([(Image.new("RGB", (20, 20)), gt({"menu": [{"nm": "V"}]}))])
    test = cord_split([(Image.new("RGB", (20, 20)), gt({"menu": [{"nm": "T"}]}))])
    return write_hub_dataset(
        tmp_path_factory.mktemp("cord-v2"),
        {"data/train-00000-of-00001.parquet": train, "data/validation-00000-of-00001.parquet": val,
         "data/test-00000-of-00001.parquet": test},
        {"default": {"train": "data/train-*", "validation": "data/validation-*", "test": "data/test-*"}},
    )


def test_train_split_conversations_and_skips(local_cord: Path, tmp_path: Path) -> None:
    made = CordV2Dataset(split="train", path=str(local_cord), cache_dir=str(tmp_path))
    assert len(made) == 2
    assert dict(made.skipped) == {"ground_truth is not valid JSON": 1, "ground_truth has no gt_parse or gt_parses": 1,
                                  "unreadable image": 1, "ground_truth gives an empty target": 1}
    conv = made[0]["conversation"]
    assert conv[0]["content"][0]["image"].size == (40, 60)
    assert conv[0]["content"][1] == {"type": "text", "text": "Describe this image."}
    assert conv[1]["content"] == [{"type": "text", "text": PARSE_TOKENS}]
    # Deterministic: the first of several parses, every time.
    assert made[1]["conversation"][1]["content"][0]["text"] == "<s_total><s_cashprice>9</s_cashprice></s_total>"
    assert made[1] == made[1]


def test_other_splits_and_prompt(local_cord: Path, tmp_path: Path) -> None:
    val = CordV2Dataset(split="validation", path=str(local_cord), cache_dir=str(tmp_path), prompt="Read the receipt.")
    conv = val[0]["conversation"]
    assert conv[0]["content"][1]["text"] == "Read the receipt."
    assert conv[1]["content"][0]["text"] == "<s_menu><s_nm>V</s_nm></s_menu>"
    test = CordV2Dataset(split="test", path=str(local_cord), cache_dir=str(tmp_path))
    assert test[0]["conversation"][1]["content"][0]["text"] == "<s_menu><s_nm>T</s_nm></s_menu>"
    with pytest.raises(SplitNotAvailableError, match="has the splits 'train', 'validation', 'test'; got split 'dev'"):
        CordV2Dataset(split="dev", path=str(local_cord))


def test_target_text_errors() -> None:
    with pytest.raises(ValueError, match="gt_parses is not a non-empty list"):
        target_text(gt(parses=[]))
    with pytest.raises(ValueError, match="not a string"):
        target_text(None)


def test_registered_under_name_and_alias() -> None:
    from nvlcore.plugins import get_registry

    reg = get_registry("dataset_maker")
    assert reg.get("cord_v2") is CordV2Dataset and reg.get("make_cord_v2_dataset") is CordV2Dataset


def test_nvl_data_preview_with_the_toy_model(local_cord: Path, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from nvlcore.cli import build_cli

    runner = CliRunner()
    toy = tmp_path / "toy"
    assert runner.invoke(build_cli(), ["toy-model", str(toy)]).exit_code == 0
    kwargs = json.dumps({"path": str(local_cord), "cache_dir": str(tmp_path / "cache")})
    result = runner.invoke(build_cli(),
                           ["data", "preview", "cord_v2", "--split", "validation", "--maker-kwargs", kwargs,
                                         "--hf-model-path", str(toy), "--json"])
    assert result.exit_code == 0, result.output
    (line,) = [json.loads(x) for x in result.stdout.splitlines()]
    assert line["num_images"] == 1 and line["tiles_per_image"] == [1]
    assert line["target"] == "<s_menu><s_nm>V</s_nm></s_menu>"
    assert line["supervised"] == "<s_menu><s_nm>V</s_nm></s_menu>\n<SPECIAL_12>"
    assert "<image*" in line["prompt"]
    assert "Describe this image.\n<SPECIAL_11>Assistant\n<think></think><s_menu>" in line["prompt"]


# -- nvl eval: Donut's metrics ------------------------------------------------------------------


def test_token2json_inverts_json2token() -> None:
    from nvl_data_cord_v2.metrics import token2json

    assert token2json(PARSE_TOKENS) == {"total": {"total_price": "45,500"}, "menu": {"price": "1", "nm": "A"}}
    two = json2token({"menu": [{"nm": "A"}, {"nm": "B"}]})
    assert token2json(two) == {"menu": [{"nm": "A"}, {"nm": "B"}]}
    assert token2json("<s_menu><s_nm>A</s_nm>") == {"nm": "A"}  # an unclosed tag is dropped
    assert token2json("plain words") == {"text_sequence": "plain words"}
    assert token2json("<s_a>x<sep/>y</s_a>") == {"a": ["x", "y"]}


def test_cord_metrics_hand_computed_one_field_differs() -> None:
    from nvl_data_cord_v2.metrics import CordMetrics, normalize_dict, tree_distance

    ref = json2token({"menu": [{"nm": "A", "price": "1,000"}, {"nm": "B", "price": "2,000"}],
                      "total": {"total_price": "3,000"}})
    pred = json2token({"menu": [{"nm": "A", "price": "1,000"}, {"nm": "B", "price": "2,500"}],
                       "total": {"total_price": "3,000"}})
    # Tree of the reference: 10 inner nodes (menu, 2 x <subtree>, 2 x nm, 2 x price, total, <subtree>,
    # total_price) cost 1 each to insert, 5 leaves cost their length: A 1, 1,000 5, B 1, 2,000 5, 3,000 5.
    assert tree_distance({}, normalize_dict({"menu": [{"nm": "A", "price": "1,000"}, {"nm": "B", "price": "2,000"}],
                                             "total": {"total_price": "3,000"}})) == 27
    m = CordMetrics()
    s = m.score(pred, ref)
    # one leaf differs by one character: TED 1 -> 1 - 1/27; fields: 4 of 5 right, 1 wrong each side -> 4 / (4 + 2/2)
    assert s["ted_accuracy"] == pytest.approx(1 - 1 / 27)
    assert s["field_f1"] == pytest.approx(0.8)
    # a missing field: the price "2,000" subtree node loses its leaf and its key (1 + 5 = 6 of 27);
    # fields: 4 right, 1 missing -> 4 / (4 + 1/2)
    missing = json2token({"menu": [{"nm": "A", "price": "1,000"}, {"nm": "B"}], "total": {"total_price": "3,000"}})
    s2 = m.score(missing, ref)
    assert s2["ted_accuracy"] == pytest.approx(1 - 6 / 27)
    assert s2["field_f1"] == pytest.approx(4 / 4.5)
    # corpus-level F1 (Donut): tp and errors are summed over receipts before dividing
    agg = m.aggregate([s, s2, m.score(ref, ref)])
    assert agg["field_f1"] == pytest.approx((4 + 4 + 5) / ((4 + 4 + 5) + (2 + 1 + 0) / 2))
    assert agg["ted_accuracy"] == pytest.approx((1 - 1 / 27 + 1 - 6 / 27 + 1) / 3)
    assert m.score("garbage without tags", ref) == {"ted_accuracy": 0.0, "field_f1": 0.0, "_tp": 0.0, "_wrong": 6.0}


def test_nvl_eval_predictions_references_score_one_and_empty_zero(local_cord: Path, tmp_path: Path) -> None:
    from nvlcore.testing.metrics import check_reference_and_empty

    made = CordV2Dataset(split="train", path=str(local_cord), cache_dir=str(tmp_path / "cache"))
    refs = [made[i]["conversation"][1]["content"][0]["text"] for i in range(len(made))]
    check_reference_and_empty("cord_v2", refs, tmp_path, ["ted_accuracy", "field_f1"])


def test_nvl_eval_end_to_end_with_the_toy_model(local_cord: Path, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from nvlcore.cli import build_cli
    from nvlcore.testing.metrics import run_eval_end_to_end

    toy = tmp_path / "toy"
    assert CliRunner().invoke(build_cli(), ["toy-model", str(toy)]).exit_code == 0
    kwargs = {"path": str(local_cord), "cache_dir": str(tmp_path / "cache")}
    summary, lines = run_eval_end_to_end(toy, "cord_v2", kwargs, tmp_path, split="train", limit=2)
    assert set(summary["metrics"]) == {"ted_accuracy", "field_f1"}
    assert lines[0]["reference"] == PARSE_TOKENS
    # the default split is test
    summary, lines = run_eval_end_to_end(toy, "cord_v2", kwargs, tmp_path, limit=1)
    assert lines[0]["reference"] == "<s_menu><s_nm>T</s_nm></s_menu>"
