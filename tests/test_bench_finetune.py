"""The CPU path of bench/finetune_gpu.py at toy size: it runs `nvl finetune` per workload, reads each run's
metrics.jsonl, measures the transformers+PEFT peer, and writes the records the issue asks for."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench" / "finetune_gpu.py"
KEYS = {"system", "workload", "method", "seq", "gpus", "tp", "tokens_per_s", "mfu", "peak_gb", "kernels", "command",
        "date", "status"}


@pytest.mark.slow
def test_finetune_bench_cpu_path_writes_the_records(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(BENCH), "--size", "tiny", "--device", "cpu", "--seq", "256", "--steps", "3",
           "--warmup", "1", "--gbs", "2", "--samples", "6", "--workloads", "text,medpix", "--peer-seqs", "128",
           "--peer-steps", "1", "--peer-variants", "torch", "--peer-batches", "1", "--peer-checkpointing", "off",
           "--variants", "model.kernels=reference", "--out", str(tmp_path / "out"),
           "--work", str(tmp_path / "work")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = json.loads((tmp_path / "out" / "finetune_gpu.json").read_text())
    assert [(r["system"], r["workload"], r.get("variant")) for r in records] == [
        ("nvl", "text", {}), ("nvl", "text", {"model.kernels": "reference"}),
        ("nvl", "medpix", {}), ("nvl", "medpix", {"model.kernels": "reference"}),
        ("transformers+peft", "text", {"mamba": "torch", "gradient_checkpointing": "off", "micro_batch_size": 1})]
    for r in records:
        assert KEYS <= set(r), KEYS - set(r)
        assert r["status"] == "ok" and r["tokens_per_s"] > 0, r
    nvl = [r for r in records if r["system"] == "nvl"]
    for r in nvl:
        assert r["command"].startswith("nvl finetune ") and "--lora-on-language-model" in r["command"]
        assert set(r["kernels"]) >= {"scan", "conv", "gated_norm", "loss", "attention"}
        assert all(x == x and x > 0 for x in r["losses"])  # finite
    # the reference variant really ran the reference path
    assert "full logits" in nvl[1]["kernels"]["loss"] and "chunked" in nvl[0]["kernels"]["loss"]
    # same data and seed: the kernel choice does not change the first loss on CPU
    assert abs(nvl[0]["losses"][0] - nvl[1]["losses"][0]) < 1e-4
    md = (tmp_path / "out" / "finetune_gpu.md").read_text()
    assert "| nvl | text | lora | 256 |" in md and "transformers+peft" in md


def test_readme_table_is_generated_from_the_bench_records():
    """The README's throughput table is exactly what bench/finetune_gpu.py --readme makes of the records."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("finetune_gpu_bench", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    root = BENCH.parent.parent
    records = json.loads((root / "bench" / "results" / "finetune_gpu.json").read_text())
    for r in records:
        assert KEYS <= set(r), (r["system"], KEYS - set(r))
    readme = (root / "README.md").read_text()
    block = readme.split(bench.README_BEGIN, 1)[1].split(bench.README_END, 1)[0]
    assert block.strip() == bench.readme_table(records).strip()


def test_kernel_report_parsing_keeps_implementations_that_hold_semicolons():
    import importlib.util

    spec = importlib.util.spec_from_file_location("finetune_gpu_bench", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    report = "scan: mamba-ssm (Triton); relu2: torch.compile; attention: SDPA (causal; no dense mask); loss: chunked"
    assert bench.parse_kernels(report) == {"scan": "mamba-ssm (Triton)", "relu2": "torch.compile",
                                           "attention": "SDPA (causal; no dense mask)", "loss": "chunked"}


@pytest.mark.slow
def test_finetune_bench_measures_packing_against_one_sample_per_row(tmp_path):
    """The issue-14 measurement's command at toy size: medpix with and without dataset.packing in one run."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(BENCH), "--size", "tiny", "--device", "cpu", "--seq", "512", "--steps", "3",
           "--warmup", "1", "--gbs", "2", "--samples", "24", "--workloads", "medpix", "--peer-seqs", "",
           "--variants", "dataset.packing=best_fit", "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    plain, packed = json.loads((tmp_path / "out" / "finetune_gpu.json").read_text())
    assert plain["variant"] == {} and packed["variant"] == {"dataset.packing": "best_fit"}
    assert plain["status"] == packed["status"] == "ok"
    assert plain["samples_per_step"] == 2 and packed["samples_per_step"] > 4  # several samples per row
    assert "dataset.packing=best_fit" in packed["command"]
    md = (tmp_path / "out" / "finetune_gpu.md").read_text()
    assert "Sequence packing" in md and "medpix lora:" in md


@pytest.mark.slow
def test_finetune_bench_runs_the_video_recipe_on_carried_clips(tmp_path):
    """The video workload: clips made by --make-videos (as they are made here and carried to the GPU machine),
    read back by decord, then the LLaVA-Video recipe (its YAML) through `nvl finetune` on a local copy."""
    import numpy as np

    decord = pytest.importorskip("decord")
    pytest.importorskip("av")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    videos = tmp_path / "videos"
    make = [sys.executable, str(BENCH), "--make-videos", str(videos), "--count", "2", "--resolution", "64"]
    proc = subprocess.run(make, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    clips = sorted(videos.rglob("*.mp4"))
    assert [c.relative_to(videos).as_posix() for c in clips] == [
        "NextQA/NExTVideo/0000/clip00.mp4", "NextQA/NExTVideo/0000/clip01.mp4"]
    for clip in clips:
        reader = decord.VideoReader(str(clip))
        frames = reader.get_batch(list(range(len(reader)))).asnumpy().astype(np.float32)
        assert frames.shape[1:] == (64, 64, 3) and len(reader) >= 20
        assert frames[0].std() > 10 and np.abs(frames[-1] - frames[0]).mean() > 5  # structure, and it moves
    again = subprocess.run(make, capture_output=True, text=True, timeout=300, env=env)
    assert again.returncode != 0 and "--overwrite" in again.stderr.strip().splitlines()[-1]

    def bench(videos_dir, out):
        cmd = [sys.executable, str(BENCH), "--size", "tiny", "--device", "cpu", "--seq", "512", "--steps", "2",
               "--warmup", "0", "--gbs", "2", "--samples", "4", "--workloads", "video", "--peer-seqs", "",
               "--videos", str(videos_dir), "--out", str(tmp_path / out), "--work", str(tmp_path / f"work-{out}")]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)

    empty = tmp_path / "no-clips"
    empty.mkdir()
    refused = bench(empty, "refused")
    assert refused.returncode != 0 and "--videos: no .mp4 clips under" in refused.stderr.strip().splitlines()[-1]
    proc = bench(videos, "out")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (rec,) = json.loads((tmp_path / "out" / "finetune_gpu.json").read_text())
    assert KEYS <= set(rec) and rec["workload"] == "video" and rec["status"] == "ok" and rec["tokens_per_s"] > 0, rec
    assert "--config-file" in rec["command"] and "nemotron_nano_v2_vl_video.yaml" in rec["command"]
    assert f'"video_root_path": "{videos.resolve()}"' in rec["command"]
    assert all(x == x and x > 0 for x in rec["losses"]) and rec["samples_per_step"] == 2
    # ten frames a sample went in (the text alone is about 100 tokens), and the recipe's YAML set the lr (2e-6)
    assert rec["tokens_per_sample"] > 200, rec
    rows = [json.loads(x) for x in (tmp_path / "work-out" / "metrics-video-lora.jsonl").read_text().splitlines()]
    assert rows[-1]["lr"] == pytest.approx(2e-6)


def test_cuda_graph_variants_keep_their_scope_list_and_refuse_a_short_warmup():
    import importlib.util

    spec = importlib.util.spec_from_file_location("finetune_gpu_bench", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    graphs = "model.cuda_graph_impl=local,model.cuda_graph_scope=[mamba,mlp],dataset.pad_to_max_length=true"
    args = bench.parse_args(["--variants", f"{graphs};dataset.pad_to_max_length=true", "--warmup", "4"])
    assert bench._variants(args) == [
        {"model.cuda_graph_impl": "local", "model.cuda_graph_scope": ["mamba", "mlp"],
         "dataset.pad_to_max_length": "true"},
        {"dataset.pad_to_max_length": "true"}]
    assert bench._override_value(["mamba", "mlp"]) == "[mamba,mlp]"
    bench.check_graph_warmup(args)
    with pytest.raises(SystemExit, match=r"--warmup 2 would average in the eager steps of a CUDA-graph row"):
        bench.check_graph_warmup(bench.parse_args(["--variants", graphs]))


def test_packing_is_measured_against_the_fastest_unpacked_micro_batch():
    """The packing summary picks the best unpacked micro-batch of the same workload as the baseline, names every
    micro-batch tried (OOMs too), and ignores rows of other workloads or other variants."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("finetune_gpu_bench", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)

    def row(variant, tps, status="ok", workload="medpix"):
        return {"system": "nvl", "workload": workload, "method": "lora", "seq": 4096, "variant": variant,
                "tokens_per_s": tps, "status": status, "samples_per_step": 4}

    packed = row({"dataset.packing": "best_fit"}, 6000.0)
    records = [row({}, 3000.0), row({"train.micro_batch_size": "4"}, 4500.0),
               row({"train.micro_batch_size": "16"}, None, "oom"), row({}, 9000.0, workload="text"),
               row({"mixed_precision": "bf16_with_fp8_current_scaling_mixed"}, 9999.0), packed]
    unpacked = bench._unpacked_rows(records, packed)
    assert [int(r["variant"].get("train.micro_batch_size", 1)) for r in unpacked] == [1, 4, 16]
    line = bench._packing_line(packed, unpacked)
    assert "6,000 vs 4,500 tokens/s unpacked at its best micro-batch (4) = 1.33x" in line, line
    assert "1: 3,000, 4: 4,500, 16: oom" in line, line
    assert "none in this run" in bench._packing_line(packed, [])
