"""`nvl finetune` end to end on CPU: the tiny toy Nemotron VL checkpoint and a local Raven-schema dataset.

The loss falls, checkpoints appear, a run resumed from iteration 20 reproduces the uninterrupted run
bit for bit, TP=2 and DP=2 (two processes, through --nproc-per-node) match one process, and the
original workflow's command lines parse as written.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "NVL_DEVICE": "cpu", "TOKENIZERS_PARALLELISM": "false"}


def nvl(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "nvlcore.cli", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=ENV, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def losses(save: Path) -> dict[int, float]:
    out = {}
    for line in (save / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "loss" in row:
            out[row["iteration"]] = row["loss"]
    return out


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    from nvl_nemotron_vl.toy import write_toy_checkpoint

    return write_toy_checkpoint(tmp_path_factory.mktemp("toy") / "hf", "tiny", seed=0)


@pytest.fixture(scope="module")
def raven(tmp_path_factory) -> Path:
    """24 rows in the_cauldron/raven's schema: 1-2 images each, a question, a letter answer tied to the colour."""
    import random

    from datasets import Dataset, Features, List, Value
    from datasets import Image as HFImage
    from PIL import Image

    from nvl_data_testing import write_hub_dataset

    rng = random.Random(0)
    colours = {"A": (200, 30, 30), "B": (30, 200, 30), "C": (30, 30, 200), "D": (200, 200, 30)}
    rows: dict[str, list] = {"images": [], "texts": []}
    for _ in range(24):
        answer = rng.choice("ABCD")
        rows["images"].append([Image.new("RGB", (rng.choice([32, 64]), 64), colours[answer])
                               for _ in range(rng.randint(1, 2))])
        rows["texts"].append([{"user": "Which figure completes the sequence? Answer with the letter.",
                               "assistant": answer, "source": "raven"}])
    features = Features({"images": List(HFImage()),
                         "texts": List({"user": Value("string"), "assistant": Value("string"),
                                        "source": Value("string")})})
    root = tmp_path_factory.mktemp("cauldron")
    return write_hub_dataset(root, {"raven/train-00000-of-00001.parquet": Dataset.from_dict(rows, features=features)},
                             {"raven": {"train": "raven/train-*"}})


def run_args(toy: Path, raven: Path, save: Path, *extra: str) -> list[str]:
    return [
        "finetune", "--hf-model-path", str(toy), "--pretrained-checkpoint", str(toy),
        "dataset.maker_name", "make_raven_dataset", "dataset.maker_kwargs", json.dumps({"path": str(raven)}),
        "train.train_iters=30", "train.global_batch_size=4", "model.tensor_model_parallel_size=1",
        "model.seq_length=256", "dataset.seq_length=256", "dataset.num_workers=0", "optimizer.lr=1e-3",
        "optimizer.min_lr=1e-4", "checkpoint.save_interval=10", f"checkpoint.save={save}", *extra,
    ]


@pytest.fixture(scope="module")
def baseline(toy, raven, tmp_path_factory) -> Path:
    save = tmp_path_factory.mktemp("run") / "base"
    nvl(*run_args(toy, raven, save))
    return save


def test_toy_raven_run_loss_falls_and_checkpoints_appear(baseline):
    got = losses(baseline)
    assert sorted(got) == list(range(1, 31))
    first, last = sum(got[i] for i in (1, 2, 3)) / 3, sum(got[i] for i in (28, 29, 30)) / 3
    assert last < first - 1.0, (first, last)
    for it in (10, 20, 30):
        d = baseline / f"iter_{it:07d}"
        assert (d / "run_config.yaml").is_file() and (d / "train_state.pt").is_file()
    cfg = yaml.safe_load((baseline / "iter_0000030" / "run_config.yaml").read_text())
    assert cfg["dataset"]["maker_name"] == "make_raven_dataset" and cfg["rng"]["seed"] == 42  # the default YAML's
    row = json.loads((baseline / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["tflops_per_gpu"] > 0 and row["tokens_per_s"] > 0 and row["skipped_iterations"] == 0


def test_resume_from_iteration_20_reproduces_the_losses_bit_for_bit(baseline, toy, raven, tmp_path):
    save = tmp_path / "resumed"
    proc = nvl(*run_args(toy, raven, save, f"checkpoint.load={baseline}", "checkpoint.ckpt_step=20"))
    assert f"resuming {baseline / 'iter_0000020'}" in proc.stdout
    a, b = losses(baseline), losses(save)
    assert sorted(b) == list(range(21, 31))
    assert [a[i] for i in range(21, 31)] == [b[i] for i in range(21, 31)]


@pytest.mark.distributed
@pytest.mark.parametrize("tp, sp", [(2, False), (1, False), (2, True)], ids=["tp2", "dp2", "tp2-sequence-parallel"])
def test_two_processes_match_one(baseline, toy, raven, tmp_path, tp, sp):
    """TP=2 (also with model.sequence_parallel=true: its checkpoint then resumes without it) and DP=2."""
    save = tmp_path / f"tp{tp}"
    extra = ["model.sequence_parallel=true"] if sp else []
    proc = nvl(*run_args(toy, raven, save, f"model.tensor_model_parallel_size={tp}", *extra), "--nproc-per-node", "2")
    assert ("sequence parallelism over the 2 tensor-parallel ranks" in proc.stdout) == sp
    a, b = losses(baseline), losses(save)
    assert sorted(b) == list(range(1, 31))
    worst = max(abs(a[i] - b[i]) / abs(a[i]) for i in a)
    assert worst < 1e-4, worst
    if tp == 2:
        # checkpoints hold logical components: the TP=2 one resumes on one process with the same losses
        one = tmp_path / "tp1"
        nvl(*run_args(toy, raven, one, f"checkpoint.load={save / 'iter_0000020'}"))
        c = losses(one)
        assert max(abs(a[i] - c[i]) / abs(a[i]) for i in range(21, 31)) < 1e-4


def test_trained_checkpoint_exports_to_hf_with_the_trained_weights(baseline, toy, tmp_path):
    """`nvl convert export` of a training checkpoint: the HF directory holds exactly the trained weights."""
    import torch

    from nvl_nemotron_vl.bridge import NemotronVLBridge
    from nvlcore.parallel import destroy_parallel, init_parallel
    from nvlcore.training.checkpointing import load_model_weights

    out = tmp_path / "hf_out"
    nvl("convert", "export", "--hf-model", str(toy), "--megatron-path", str(baseline), "--hf-path", str(out),
        "--no-progress")
    ctx = init_parallel(1, device_type="cpu")
    try:
        bridge = NemotronVLBridge.from_hf_dir(toy)
        trained = bridge.build_model(dtype=torch.float32, device="cpu", init="none")
        load_model_weights(trained, baseline / "iter_0000030", bridge=bridge, ctx=ctx)
        exported = bridge.build_model(dtype=torch.float32, device="cpu", init="none")
        bridge.load_hf_weights(exported, out)
        original = bridge.build_model(dtype=torch.float32, device="cpu", init="none")
        bridge.load_hf_weights(original, toy)
        ex, tr, orig = dict(exported.named_parameters()), dict(trained.named_parameters()), dict(
            original.named_parameters())
        for name, p in tr.items():
            assert torch.equal(ex[name], p), name
        assert sum(not torch.equal(orig[n], p) for n, p in tr.items()) > len(tr) // 2  # training changed them
    finally:
        destroy_parallel(ctx)


def test_lora_run_saves_adapter_only_checkpoints_and_resumes_bit_for_bit(toy, raven, tmp_path):
    from nvlcore.checkpoint import open_checkpoint

    first, second = tmp_path / "lora", tmp_path / "lora_resumed"
    lora = ["--lora-on-language-model", "train.train_iters=8", "checkpoint.save_interval=4"]
    proc = nvl(*run_args(toy, raven, first, *lora))
    # a frozen base: the logged TFLOP/s counts 2/3 of the training formula (no weight gradients) and says so
    assert "TFLOP/s counts the work executed" in proc.stdout + proc.stderr
    ckpt = open_checkpoint(first / "iter_0000004")
    keys = set(ckpt.keys())
    assert any(".adapter." in k for k in keys)
    # LM-only LoRA: the language model's base weights stay frozen and are not saved; ViT and projector are trained
    assert not any(k.startswith("language_model.") and ".adapter." not in k for k in keys)
    assert any(k.startswith("vision_model.") for k in keys) and any(k.startswith("vision_projection.") for k in keys)
    assert ckpt.extra_state()["adapter_only"] is True
    assert ckpt.run_config()["checkpoint"]["pretrained_checkpoint"] == str(toy)
    nvl(*run_args(toy, raven, second, *lora, f"checkpoint.load={first / 'iter_0000004'}"))
    a, b = losses(first), losses(second)
    assert [a[i] for i in range(5, 9)] == [b[i] for i in range(5, 9)]


# -- the original workflow's command lines --------------------------------------------------------
def print_config(toy: Path, *args: str) -> dict:
    from click.testing import CliRunner

    from nvlcore.cli import build_cli

    res = CliRunner().invoke(build_cli(), ["finetune", "--hf-model-path", str(toy), "--pretrained-checkpoint",
                                           str(toy), "--print-config", *args])
    assert res.exit_code == 0, res.output
    return yaml.safe_load("\n".join(l for l in res.stdout.splitlines() if not l.startswith("#")))


def test_original_command_lines_parse_as_written(toy):
    from nvl_nemotron_vl.recipes import VIDEO_CONFIG_FILE

    # finetune_nemotron_nano_v2_vl.py --hf-model-path ... --lora-on-language-model dataset.maker_name=... (<= v0.5.1)
    c = print_config(toy, "--lora-on-language-model", "dataset.maker_name=make_raven_dataset",
                     "logger.wandb_project=proj", "logger.wandb_save_dir=/save", "checkpoint.save=/save/exp",
                     "model.freeze_language_model=True", "model.freeze_vision_model=False",
                     "model.freeze_vision_projection=False")
    assert c["peft"]["method"] == "lora" and c["peft"]["target_modules"][0] == "*language_model*.linear_qkv"
    assert c["peft"]["freeze_language_model"] and not c["peft"]["freeze_vision_model"]
    assert c["model"]["freeze_language_model"] is True and c["model"]["tensor_model_parallel_size"] == 2
    assert c["checkpoint"]["save"] == "/save/exp" and c["logger"]["wandb_project"] == "proj"
    assert c["optimizer"]["lr"] == 2e-5 and c["rng"]["seed"] == 42  # the default YAML over the PEFT recipe
    # video: --config-file .../nemotron_nano_v2_vl_video.yaml dataset.maker_kwargs={"video_root_path":$VIDEO_ROOT}
    # (the shell leaves {video_root_path:/data/videos} of it)
    c = print_config(toy, "--config-file", str(VIDEO_CONFIG_FILE),
                     "dataset.maker_kwargs={video_root_path:/data/videos}")
    assert c["dataset"]["maker_name"] == "make_llava_video_178k_dataset"
    kw = c["dataset"]["maker_kwargs"]
    assert kw["video_root_path"] == "/data/videos" and kw["subsets"] == ["0_30_s_nextqa"]
    assert c["model"]["seq_length"] == 8192 and c["model"]["tensor_model_parallel_size"] == 8
    assert c["train"]["train_iters"] == 300 and c["optimizer"]["lr"] == 2e-6
    assert c["checkpoint"]["save"] is None  # the video YAML replaces the default one and sets no save dir
    # the space-separated and mapping-valued forms of the command line
    c = print_config(toy, "dataset.maker_name", "make_raven_dataset", "dataset.maker_kwargs", '{"path": "/data/raven"}',
                     "train.train_iters=30")
    assert c["dataset"]["maker_kwargs"]["path"] == "/data/raven" and c["train"]["train_iters"] == 30
    # recipe defaults without flags: full fine-tuning, TP 4, effective weight decay 0.033
    c = print_config(toy)
    assert c["peft"]["method"] is None and c["model"]["tensor_model_parallel_size"] == 4
    assert c["scheduler"]["start_weight_decay"] == c["scheduler"]["end_weight_decay"] == 0.033
    assert (c["optimizer"]["adam_beta2"], c["optimizer"]["clip_grad"],
            c["scheduler"]["lr_warmup_iters"]) == (0.95, 1.0, 5)
    assert (c["train"]["global_batch_size"], c["train"]["micro_batch_size"],
            c["checkpoint"]["save_interval"]) == (32, 1, 200)


def test_missing_mandatory_save_and_bad_inputs_fail_with_clear_messages(toy, tmp_path):
    from click.testing import CliRunner

    from nvlcore.cli import build_cli

    cli = build_cli()
    res = CliRunner().invoke(cli, ["finetune", "--hf-model-path", str(toy), "--pretrained-checkpoint", str(toy)])
    assert res.exit_code == 2 and "checkpoint.save" in res.output
    res = CliRunner().invoke(cli, ["finetune", "--hf-model-path", str(tmp_path), "--pretrained-checkpoint", str(toy)])
    assert res.exit_code != 0 and "config.json" in res.output
    res = CliRunner().invoke(cli, ["finetune", "--hf-model-path", str(toy), "checkpoint.save=/x"])
    assert res.exit_code == 2 and "--pretrained-checkpoint" in res.output
    res = CliRunner().invoke(cli, ["finetune", "--hf-model-path", str(toy), "--pretrained-checkpoint", str(toy),
                                   "train.global_batch_sise=4"])
    assert res.exit_code == 2 and "global_batch_size" in res.output


def run_nvl(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nvlcore.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=ENV, stdin=subprocess.DEVNULL)


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    """The one ``Error:`` line of a failed command; no traceback, no Python class name."""
    errors = [x for x in proc.stderr.splitlines() if x.startswith("Error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-4000:]
    assert not any(f"{name}:" in errors[0] for name in ("ValueError", "RuntimeError", "ConfigError", "SampleError",
                                                         "CheckpointCorruptError")), errors[0]
    return errors[0]


@pytest.mark.parametrize("args, expected", [
    (["--lora-on-langauge-model"], "did you mean --lora-on-language-model?"),
    (["checkpoint.save"], "override 'checkpoint.save' has no value"),
    (["dataset.maker_kwargs", '{"path": "/x"'], "cannot parse value"),
])
def test_command_line_mistakes_are_one_line_and_exit_2(toy, args, expected):
    """Issue 27 item 3: a misspelled flag, a bare key, an unterminated maker_kwargs: one line, exit 2."""
    proc = run_nvl("finetune", "--hf-model-path", str(toy), "--pretrained-checkpoint", str(toy), *args)
    assert proc.returncode == 2 and expected in one_error_line(proc)


def test_a_recipe_tp_that_does_not_divide_the_processes_names_the_override_that_runs_here(toy, tmp_path):
    proc = run_nvl("finetune", "--hf-model-path", str(toy), "--pretrained-checkpoint", str(toy),
                   "model.tensor_model_parallel_size=4", f"checkpoint.save={tmp_path / 'run'}")
    line = one_error_line(proc)
    assert proc.returncode == 2 and "does not divide the number of processes (1)" in line
    assert "model.tensor_model_parallel_size=1" in line and not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_sample_too_long_for_seq_length_is_one_line_naming_the_row_and_leaves_no_metrics(toy, tmp_path):
    """The processor truncates as Megatron-Bridge does and refuses a sample whose supervised tokens would
    all be cut: the DataLoader worker's traceback is not shown, nor an empty metrics.jsonl left."""
    save = tmp_path / "run"
    proc = run_nvl("finetune", "--hf-model-path", str(toy), "--pretrained-checkpoint", str(toy),
                   "dataset.maker_name=synthetic_shapes", "model.seq_length=32", "dataset.seq_length=32",
                   "train.global_batch_size=2", "train.micro_batch_size=1", "model.tensor_model_parallel_size=1",
                   "train.train_iters=2", "scheduler.lr_warmup_iters=1", "dataset.num_workers=1",
                   f"checkpoint.save={save}")
    line = one_error_line(proc)
    assert proc.returncode == 1 and "dataset split 'train', row " in line and "raise dataset.seq_length" in line
    assert "Original Traceback" not in proc.stderr and not save.exists()
