"""`nvl eval` with the Nemotron VL bridge: data-parallel sharding, LoRA adapters merged in memory,
and generation-based validation during training (tiny toy, CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("nvl_nemotron_vl.model")

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "NVL_DEVICE": "cpu", "PYTHONWARNINGS": "ignore"}


def _liven(hf_dir: Path) -> None:
    """Scale the toy's LM matrices so that its answers depend on the prompt (the stock toy repeats one token)."""
    from safetensors.torch import load_file, save_file

    path = hf_dir / "model.safetensors"
    sd = load_file(path)
    for name, t in sd.items():
        if name.startswith("language_model.") and t.ndim == 2 and "embeddings" not in name:
            sd[name] = (t.float() * 8.0).to(t.dtype)
    save_file(sd, path, metadata={"format": "pt"})


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    from nvl_nemotron_vl.toy import write_toy_checkpoint

    out = Path(write_toy_checkpoint(tmp_path_factory.mktemp("eval") / "toy", "tiny", seed=5))
    _liven(out)
    return out


def nvl(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "nvlcore", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=ENV)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


SHAPES = ["dataset.maker_name=synthetic_shapes", 'dataset.maker_kwargs={"num_examples": 6}']


@pytest.mark.slow
@pytest.mark.distributed
def test_data_parallel_shards_and_gathers_the_same_answers(toy: Path, tmp_path: Path) -> None:
    from nemotron_vl_testing_generate import dp_eval_worker

    from nvl_dist_testing import run_distributed

    single = nvl("eval", "--hf-model-path", toy, *SHAPES, "--max-new-tokens", "4", "--batch-size", "2",
                 "--output", tmp_path / "one.jsonl", "--json")
    want = [json.loads(x) for x in (tmp_path / "one.jsonl").read_text().splitlines()]
    assert len({x["prediction"] for x in want}) > 1  # the answers depend on the prompt
    ranks = run_distributed(dp_eval_worker, 2, str(toy), 6)
    assert [r["shard"] for r in ranks] == [3, 3]  # each rank answered half
    for r in ranks:  # every rank holds everything, in id order, equal to one process's answers
        assert [(x["id"], x["prediction"], x["reference"]) for x in r["records"]] == \
            [(x["id"], x["prediction"], x["reference"]) for x in want]
        assert r["summary"]["metrics"] == json.loads(single.stdout.splitlines()[-1])["metrics"]


@pytest.mark.slow
def test_training_logs_generation_metrics_and_lora_eval_matches(toy: Path, tmp_path: Path) -> None:
    """validation.generate_eval_interval logs val_gen_* every N iterations; `nvl eval --lora-checkpoint`
    of the saved adapters gives the same numbers as the last in-training evaluation."""
    run = tmp_path / "run"
    proc = nvl("finetune", "--hf-model-path", toy, "--pretrained-checkpoint", toy, "--lora-on-language-model",
               "dataset.maker_name=synthetic_shapes",
               'dataset.maker_kwargs={"num_examples": 8, "questions": ["color"]}',
               "dataset.num_workers=0", "dataset.seq_length=256", "model.seq_length=256",
               "model.tensor_model_parallel_size=1", "train.global_batch_size=4", "train.micro_batch_size=4",
               "train.train_iters=4", "checkpoint.save_interval=4", "logger.log_interval=1", "optimizer.lr=5e-3",
               "scheduler.lr_warmup_iters=1", "validation.eval_iters=0", "validation.generate_eval_interval=2",
               "validation.generate_eval_samples=6", f"checkpoint.save={run}")
    assert "generation-based validation: 6 example(s) every 2 iterations, metrics exact_match" in proc.stdout
    assert "val exact_match" in proc.stdout  # the console logger shows it
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    gen = {r["iteration"]: r for r in rows if "val_gen_exact_match" in r}
    assert sorted(gen) == [2, 4]
    assert all(0.0 <= r["val_gen_exact_match"] <= 1.0 and r["val_gen_seconds"] > 0 for r in gen.values())
    ev = nvl("eval", "--hf-model-path", toy, "--lora-checkpoint", run, "dataset.maker_name=synthetic_shapes",
             'dataset.maker_kwargs={"num_examples": 8, "questions": ["color"]}', "--split", "validation",
             "--limit", "6", "--batch-size", "4", "--json", "--output", tmp_path / "lora.jsonl")
    assert "adapters from" in ev.stderr
    assert json.loads(ev.stdout.splitlines()[-1])["metrics"]["exact_match"] == gen[4]["val_gen_exact_match"]


@pytest.mark.slow
@pytest.mark.distributed
def test_nproc_per_node_launch_writes_what_one_process_writes(toy: Path, tmp_path: Path) -> None:
    """`nvl eval --nproc-per-node 2` (torchrun's library, gloo on CPU): rank 0 gathers and writes the
    same file and summary as one process."""
    common = ["eval", "--hf-model-path", toy, *SHAPES, "--max-new-tokens", "4", "--batch-size", "2", "--json"]
    one = nvl(*common, "--output", tmp_path / "one.jsonl")
    two = nvl(*common, "--output", tmp_path / "two.jsonl", "--nproc-per-node", "2")
    assert "starting 2 worker(s)" in two.stderr and "over 2 data-parallel rank(s)" in two.stderr
    lines = {name: [json.loads(x) for x in (tmp_path / name).read_text().splitlines()]
             for name in ("one.jsonl", "two.jsonl")}
    assert lines["two.jsonl"] == lines["one.jsonl"]
    s1, s2 = (json.loads(p.stdout.splitlines()[-1]) for p in (one, two))
    assert s2["metrics"] == s1["metrics"] and s2["num_samples"] == s1["num_samples"] == 6


def test_lora_checkpoint_must_be_an_adapter_run_and_splits_are_checked(toy: Path, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from nvlcore.cli import build_cli

    base = tmp_path / "base"
    nvl("convert", "import", "--hf-model", toy, "--megatron-path", base, "--no-progress")
    runner = CliRunner()
    r = runner.invoke(build_cli(), ["eval", "--hf-model-path", str(toy), "--lora-checkpoint", str(base), *SHAPES])
    assert r.exit_code == 1
    assert "has no peft.method, so it holds full weights; pass it as --megatron-model-path instead" in r.output
    r = runner.invoke(build_cli(), ["eval", "--hf-model-path", str(toy), *SHAPES, "--split", "dev"])
    assert r.exit_code == 1 and "got 'dev'" in r.output
    # a full checkpoint as --megatron-model-path answers exactly as the HF weights it was imported from
    a = runner.invoke(build_cli(), ["eval", "--hf-model-path", str(toy), *SHAPES, "--max-new-tokens", "3",
                                    "--output", str(tmp_path / "hf.jsonl")])
    b = runner.invoke(build_cli(), ["eval", "--hf-model-path", str(toy), "--megatron-model-path", str(base), *SHAPES,
                                    "--max-new-tokens", "3", "--output", str(tmp_path / "mg.jsonl")])
    assert a.exit_code == b.exit_code == 0, a.output + b.output
    preds = [[json.loads(x)["prediction"] for x in (tmp_path / f).read_text().splitlines()]
             for f in ("hf.jsonl", "mg.jsonl")]
    assert preds[0] == preds[1] and len(preds[0]) == 6
