"""nvl eval's metric layer: the generic fallback, hand-computed cases, the maker contract, prediction files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nvlcore import hookimpl
from nvlcore.eval.metrics import (
    GenericMetrics,
    exact_match,
    levenshtein,
    mean_scores,
    metrics_for,
    normalize_answer,
    option_letter,
    token_f1,
)
from nvlcore.eval.runner import (
    EvalError,
    EvalRecord,
    format_table,
    read_predictions,
    score_records,
    split_conversation,
    with_system_prompt,
    write_records,
)


def test_normalisation_and_exact_match() -> None:
    assert normalize_answer("  The Red, circle! ") == "red circle"
    assert normalize_answer("An apple a day") == "apple day"
    assert exact_match("Red.", "red") == 1.0
    assert exact_match("the red one", "red") == 0.0


def test_token_f1_hand_computed() -> None:
    # pred tokens {red, circle, big}, ref {red, circle}: P = 2/3, R = 1, F1 = 0.8
    assert token_f1("a big red circle", "the red circle") == pytest.approx(0.8)
    # repeated tokens count as a bag: pred [red, red], ref [red]: common 1, P = 1/2, R = 1, F1 = 2/3
    assert token_f1("red red", "red") == pytest.approx(2 / 3)
    assert token_f1("blue", "red") == 0.0
    assert token_f1("", "red") == 0.0 and token_f1("", "") == 1.0


def test_levenshtein() -> None:
    assert levenshtein("kitten", "sitting") == 3
    assert levenshtein("", "abc") == 3 and levenshtein("abc", "abc") == 0


@pytest.mark.parametrize(
    ("text", "letter"),
    [("B", "B"), ("B.", "B"), ("(C)", "C"), ("D) a dog", "D"), ("E: five", "E"), ("Answer: F", "F"),
     ("The answer is (G).", "G"), ("answer is h", None), ("A man waves.", None), ("I think so", None),
     ("The answer is a cat", None), ("", None)],
)
def test_option_letter(text: str, letter: str | None) -> None:
    assert option_letter(text) == letter


def test_rouge_l_hand_computed() -> None:
    pytest.importorskip("rouge_score")
    from nvlcore.eval.metrics import rouge_l

    # LCS("the cat sat on the mat", "the cat is on the mat") = the cat on the mat (5): P = R = 5/6
    assert rouge_l("the cat sat on the mat", "the cat is on the mat") == pytest.approx(5 / 6)
    assert rouge_l("same text", "same text") == 1.0
    assert rouge_l("", "a reference") == 0.0


def test_generic_metrics_and_mean() -> None:
    m = GenericMetrics()
    scores = [m.score("red", "Red."), m.score("blue", "red"), m.score("big red", "red")]
    summary = mean_scores(scores, m.names)
    assert summary["exact_match"] == pytest.approx(1 / 3)
    assert summary["token_f1"] == pytest.approx((1 + 0 + 2 / 3) / 3)


class _Score:
    names = ("hit",)

    def score(self, prediction, reference, sample=None):
        return {"hit": float(prediction == reference)}


def test_metrics_for_attribute_forms() -> None:
    class NoMetrics:
        pass

    class WithClass:
        metrics = _Score

    class WithInstance:
        metrics = _Score()

    class WithLazy:
        metrics = "nvlcore.builtin.synthetic_vqa:ShapesMetrics"

    class Broken:
        metrics = object()

    assert isinstance(metrics_for(NoMetrics), GenericMetrics)
    assert metrics_for(WithClass).names == ("hit",)
    assert metrics_for(WithInstance()).score("a", "a") == {"hit": 1.0}
    assert metrics_for(WithLazy).names == ("exact_match",)
    with pytest.raises(TypeError, match="Broken.*score\\(prediction, reference, sample\\)"):
        metrics_for(Broken)


def test_split_conversation_uses_the_last_answer() -> None:
    conv = {"conversation": [
        {"role": "user", "content": [{"type": "text", "text": "Q1"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A1"}]},
        {"role": "user", "content": [{"type": "text", "text": "Q2"}]},
        {"role": "assistant", "content": [{"type": "text", "text": " A2 "}]},
    ]}
    prompt, reference, question = split_conversation(conv)
    assert reference == "A2" and question == "Q2" and len(prompt["conversation"]) == 3
    with_sys = with_system_prompt(prompt, "/no_think")
    assert with_sys["conversation"][0]["role"] == "system" and len(with_sys["conversation"]) == 4
    assert with_system_prompt(with_sys, "/think") == with_sys  # an existing system turn is kept
    with pytest.raises(EvalError, match="ds\\[3\\]: no assistant turn"):
        split_conversation({"conversation": conv["conversation"][:1]}, where="ds[3]")


def test_prediction_files_round_trip_and_errors(tmp_path: Path) -> None:
    records = [EvalRecord(id=0, prediction="red", reference="red", question="Q"),
               EvalRecord(id=1, prediction="", reference="blue")]
    summary = score_records(GenericMetrics(), records)
    assert summary == {"exact_match": 0.5, "token_f1": 0.5}
    path = write_records(tmp_path / "p.jsonl", records)
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert lines[0] == {"id": 0, "prediction": "red", "reference": "red",
                        "scores": {"exact_match": 1.0, "token_f1": 1.0},
                        "question": "Q"}
    back = read_predictions(path)
    assert [(r.id, r.prediction, r.reference,
             r.question) for r in back] == [(0, "red", "red", "Q"), (1, "", "blue", "")]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prediction": "x", "reference": "y"}\n{"prediction": "x"}\n')
    with pytest.raises(EvalError, match=r"bad.jsonl:2: 'reference' is missing"):
        read_predictions(bad)
    bad.write_text("not json\n")
    with pytest.raises(EvalError, match=r"bad.jsonl:1: not valid JSON"):
        read_predictions(bad)
    with pytest.raises(EvalError, match="no such predictions file"):
        read_predictions(tmp_path / "missing.jsonl")
    assert "exact_match" in format_table(summary, num_samples=2)


def test_nvl_eval_predictions_with_the_builtin_maker(nvl_cli, tmp_path: Path) -> None:
    """References as predictions score 1.0, empty predictions 0.0; `--output` rewrites the file with scores."""
    refs = ["red", "green", "blue", "yellow"]
    for preds, want in ((refs, 1.0), (["" for _ in refs], 0.0)):
        f = tmp_path / "preds.jsonl"
        f.write_text("".join(json.dumps({"id": i, "prediction": p, "reference": r}) + "\n"
                             for i, (p, r) in enumerate(zip(preds, refs, strict=True))))
        out = tmp_path / "scored.jsonl"
        result = nvl_cli("eval", "--predictions", str(f), "dataset.maker_name=synthetic_shapes", "--json",
                         "--output", str(out))
        assert result.exit_code == 0, result.output
        summary = json.loads(result.stdout)
        assert summary["metrics"] == {"exact_match": want} and summary["num_samples"] == 4
        assert [json.loads(x)["scores"] for x in out.read_text().splitlines()] == [{"exact_match": want}] * 4
    table = nvl_cli("eval", "--predictions", str(f), "dataset.maker_name=shapes")
    assert table.exit_code == 0 and "exact_match" in table.stdout and "0.0000" in table.stdout


def test_nvl_eval_errors_name_the_problem(nvl_cli, tmp_path: Path) -> None:
    r = nvl_cli("eval", "dataset.maker_name=synthetic_shapes")
    assert r.exit_code != 0 and "--hf-model-path DIR is required" in r.output
    r = nvl_cli("eval", "--predictions", str(tmp_path / "none.jsonl"), "dataset.maker_name=synthetic_shapes")
    assert r.exit_code != 0 and "none.jsonl: no such predictions file" in r.output
    r = nvl_cli("eval", "--predictions", str(tmp_path / "x.jsonl"), "dataset.maker_name=no_such_maker")
    assert r.exit_code != 0 and "no_such_maker" in r.output


class _PlainQA:
    """A third-party maker without metrics: scored by the generic fallback."""

    splits = ("test",)

    def __init__(self, *, split: str = "test", **kw) -> None:
        self.rows = [("2+2?", "4"), ("Capital of France?", "Paris")]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        q, a = self.rows[i]
        return {"conversation": [{"role": "user", "content": [{"type": "text", "text": q}]},
                                 {"role": "assistant", "content": [{"type": "text", "text": a}]}]}


class _LengthMetrics:
    names = ("length_ratio",)

    def score(self, prediction, reference, sample=None):
        return {"length_ratio": min(len(prediction), len(reference)) / max(len(reference), 1),
                "_question_seen": float(bool(sample and sample.get("question")))}

    def aggregate(self, scores):
        assert all(s["_question_seen"] == 1.0 for s in scores)  # the file's questions reach the metrics
        return {"length_ratio": min(s["length_ratio"] for s in scores)}


class _OwnQA(_PlainQA):
    metrics = _LengthMetrics


class _QAPlugin:
    @hookimpl
    def nvl_register_dataset_makers(self, register) -> None:
        register("plain_qa", _PlainQA)
        register("own_qa", _OwnQA)


def test_third_party_makers_generic_fallback_and_own_metrics(nvl_cli, register_plugin, tmp_path: Path) -> None:
    register_plugin(_QAPlugin(), name="qa_plugin")
    refs = ["4", "Paris"]
    for preds, want in ((refs, 1.0), (["", ""], 0.0)):
        f = tmp_path / "p.jsonl"
        f.write_text("".join(json.dumps({"prediction": p, "reference": r, "question": "q"}) + "\n"
                             for p, r in zip(preds, refs, strict=True)))
        generic = json.loads(nvl_cli("eval", "--predictions", str(f), "dataset.maker_name=plain_qa", "--json").stdout)
        assert generic["metrics"] == {"exact_match": want, "token_f1": want}
        own = json.loads(nvl_cli("eval", "--predictions", str(f), "dataset.maker_name=own_qa", "--json").stdout)
        assert own["metrics"] == {"length_ratio": want}
    f.write_text(json.dumps({"prediction": "Par", "reference": "Paris", "question": "q"}) + "\n")
    out = tmp_path / "scored.jsonl"
    nvl_cli("eval", "--predictions", str(f), "dataset.maker_name=own_qa", "--output", str(out))
    assert json.loads(out.read_text())["scores"] == {"length_ratio": 0.6}  # private "_" keys are not written


def test_eval_samples_from_a_maker() -> None:
    from nvlcore.eval.runner import eval_samples, shard

    samples = eval_samples(_PlainQA(), system_prompt="/no_think")
    assert [(s.id, s.reference, s.question) for s in samples] == [(0, "4", "2+2?"), (1, "Paris", "Capital of France?")]
    assert samples[0].prompt["conversation"][0] == {"role": "system",
                                                    "content": [{"type": "text", "text": "/no_think"}]}
    assert eval_samples(_PlainQA(), limit=1)[0].id == 0 and len(eval_samples(_PlainQA(), limit=1)) == 1
    assert shard(list(range(7)), 1, 3) == [1, 4]
