"""Throughput and memory of `nvl finetune` itself on the 12b-shape model, against transformers + PEFT.

Every nvl figure comes from the user's command: each measured run is ``nvl finetune --random-init ...``
(the click command, the trainer, the data pipeline from a dataset maker, the optimizer, the loggers),
started in a fresh process so that peak memory is its own; tokens/s, TFLOP/s and peak memory are read
from the run's ``metrics.jsonl`` (``logger.jsonl_path``, no checkpoint written). The first
``--warmup`` iterations (compilation, allocator growth) are left out of the averages.

Workloads, generated on the machine in each source's real schema (nothing is downloaded):

* ``text``: a bench-local dataset maker of text-only conversations of about ``--seq`` tokens (added to
  the plugin manager in the child process, as a third-party maker plugin would be);
* ``cord``: CORD-v2 receipts through ``make_cord_v2_dataset`` (a local parquet copy): tall 768x1152
  images (2x3 tiles + thumbnail = 7 tiles, 1,792 image tokens) and ~300 tokens of XML-like target;
* ``medpix``: MedPix-VQA through ``make_medpix_dataset``: one 512x512 image (1 tile), a short question
  and answer (~300 tokens a sample; what packing is for: ``--variants 'dataset.packing=best_fit'``
  measures packed rows of ``--seq`` tokens against one sample per row in the same run, and the
  markdown states the speed-up);
* ``video``: LLaVA-Video-178K (subset ``0_30_s_nextqa``, the video recipe's) through
  ``make_llava_video_178k_dataset``, run on the recipe's own file (``--config-file``
  ``nemotron_nano_v2_vl_video.yaml``): a short question and answer (every third row two turns) about a
  clip of 2-4 s, of which the processor takes 10 frames, one 512x512 tile each (2,560 image tokens;
  ~2,800 tokens a sample: as in Megatron-Bridge, rows are padded to a multiple of 128, not to the
  recipe's seq 8192, unless ``dataset.pad_to_max_length=true`` is passed as a variant).
  The clips come from ``--videos DIR`` (the ``video_root_path``): the GPU machine can decode but not
  encode video, so they are made beforehand with ``--make-videos DIR`` (PyAV) and carried.

The peer, in the same run: transformers' ``NemotronHForCausalLM`` at the same LM shape (random bf16
weights, SDPA, ``use_cache=False``) with PEFT LoRA r=16 alpha=32 on q/k/v/o/up/down, AdamW on the adapters,
``--peer-batches`` micro-batches (default 1 and 2) of text rows of exactly ``seq`` tokens. Each try runs in
a fresh process (``--peer-child``; the row's ``command`` runs it again alone), since transformers 5.x binds
each Mamba op when its NemotronH module is imported: the Hub kernel if asked (never here), else the
installed package (mamba-ssm, causal-conv1d), else its PyTorch code. ``--peer-variants``:

* ``torch``: mamba-ssm and causal-conv1d blocked (``sys.modules`` entries of None), every Mamba op in
  transformers' PyTorch code: what the earlier records measured (they also left the config's
  ``use_cache=True``, which built a generation cache in each training forward);
* ``mamba-ssm triton``: mamba-ssm importable. On the GPU machine it is built without CUDA
  (``MAMBA_SKIP_CUDA_BUILD``: Triton kernels only) and ``import mamba_ssm`` fails on its Mamba-1 CUDA
  extension ``selective_scan_cuda``; only for that failure a stand-in module of that name (any use of it
  raises) is put on ``sys.modules`` and the import retried. NemotronH (Mamba-2) never calls Mamba-1, so every
  kernel the peer then runs is mamba-ssm's or transformers' own. In training transformers first calls
  mamba-ssm's fused conv+scan+norm+out_proj, which needs causal-conv1d's CUDA functions; causal-conv1d is
  not installed there (a CUDA extension: no compiler), so its first call raises, the row records that,
  and from then on it returns None, as transformers' own stand-in does without a kernel, so that
  transformers runs its unfused path: conv in PyTorch, mamba-ssm's Triton chunk scan, gated norm in
  PyTorch. On CPU inputs transformers 5.25 takes PyTorch even with mamba-ssm importable.

Gradient checkpointing (``--peer-checkpointing``, default ``auto``: without, then with
``gradient_checkpointing_enable(use_reentrant=False)`` where a micro-batch ran out of memory without) is
the variant's ``gradient_checkpointing``. Each try gets ``nvl finetune``'s caching-allocator setting
(``PYTORCH_CUDA_ALLOC_CONF``, the row's ``allocator``) unless one is set. Every try is a row, an
out-of-memory one ``"status": "oom"``; ``variant`` is ``{"mamba", "gradient_checkpointing",
"micro_batch_size"}``, ``kernels`` what each Mamba op resolved to and how many of its calls ran where
(counted in the try, not assumed), ``mamba_ops_ran`` that in words. The markdown compares nvl with the
peer at each side's best (the fastest row of each at a length) and at equal micro-batch; ``--peer-only``
runs the peer tries alone.

FLOPs and MFU (written into each record): ``tflops_per_gpu`` is what ``nvl finetune`` logs, the work a
step executes: the bridge's count (Megatron-Bridge's hybrid formula for the LM at each sample's real
length, plus the ViT and projector per tile), training = 3 x forward, times
``nvlcore.bridge.FROZEN_BASE_FLOPS_SHARE`` (2/3) for LoRA, whose frozen base gets no weight gradients.
``mfu = tflops_per_gpu / 790``, 790 TFLOP/s being the measured bf16 matmul ceiling of one H200
(shared/reference/performance-anchors.md). The peer is counted with the same formula and share at its
sequence length.

Records: ``finetune_gpu.json`` (a list, one object per measured run: ``system``, ``workload``,
``method``, ``seq``, ``gpus``, ``tp``, ``tokens_per_s`` (all GPUs), ``mfu``, ``peak_gb``, ``kernels``,
``command``, ``date``, ``status``) and ``finetune_gpu.md`` under ``--out``. Memory, per GPU: ``peak_gb`` is
the trainer's ``mem_gb`` (``torch.cuda.max_memory_allocated``); an nvl run on CUDA adds ``reserved_gb`` (the
largest ``mem_reserved_gb``, ``torch.cuda.max_memory_reserved``), ``peak_gb_nvidia_smi`` (the driver's peak,
sampled every second, of the fullest GPU), ``outside_allocator_gb`` (that less ``reserved_gb``: the CUDA
context, kernel modules, cuBLAS and NCCL memory the caching allocator does not count; with several GPUs the
reservation is the logging rank's, the driver's peak the fullest GPU's) and
``gpu_used_at_start_gb`` (what nvidia-smi showed when the run started: each run first waits up to 60 s for
every GPU to be under 1,000 MiB, so that a killed run's memory, still being released, is not counted in the
next). A profiled run names its files in ``--out``: ``profile_file`` and ``profile_syncs_file`` (None where
the run did not write them). Every file the bench writes is named with letters, digits, ``.``, ``_`` and
``-`` only (``safe_name``: the GPU machine's file return refuses other characters), so an override's ``=``
becomes ``_``. Each run is its own process group: on ``--run-timeout`` (or when it exits) the whole group is
killed, with the groups of its descendants (torchrun's ranks, each in a session of its own, and
their DataLoader workers).

Usage (one H200; the 12b shape needs no weights on disk with --random-init)::

    python bench/finetune_gpu.py --size 12b-shape --workloads text,cord,medpix --out bench/results
    # two H200s, full fine-tuning at TP=2:
    python bench/finetune_gpu.py --size 12b-shape --methods full --tp 2 --nproc 2 --workloads text --peer-seqs ''
    # sequence packing (issue 14): MedPix-like samples packed into rows of 4096 tokens vs the fastest unpacked
    # micro-batch of the same run (the report names each one tried); the packed run (--profile-variant 3)
    # profiled and its host syncs traced
    python bench/finetune_gpu.py --size 12b-shape --workloads medpix \
        --variants 'train.micro_batch_size=4;train.micro_batch_size=16;dataset.packing=best_fit' \
        --gbs 16 --peer-seqs '' --steps 12 --warmup 3 --profile medpix --profile-variant 3 --tag packing \
        --out bench/results
    # FP8 full fine-tuning at TP=2 beside its bf16 row (issue 23; CUDA compute capability 8.9+), variant
    # {"mixed_precision": "bf16_with_fp8_current_scaling_mixed"} in the record, the speed-up in the markdown:
    python bench/finetune_gpu.py --size 12b-shape --methods full --tp 2 --nproc 2 --workloads text --peer-seqs '' \
        --variants 'mixed_precision=bf16_with_fp8_current_scaling_mixed' --tag fp8 --out bench/results
    # one record from several invocations of the same visit:
    python bench/finetune_gpu.py --merge bench/results/finetune_gpu part1.json part2.json
    # the video workload: clips made where PyAV can encode (~250 KB), carried, then the recipe at seq 8192
    python bench/finetune_gpu.py --make-videos .whl/videos --count 6
    python bench/finetune_gpu.py --size 12b-shape --workloads video --videos .whl/videos --seq 8192 --peer-seqs ''
    # the peer alone (issue 23): both Mamba-op variants, micro-batches 1 and 2, checkpointing where needed
    python bench/finetune_gpu.py --size 12b-shape --peer-only --peer-seqs 4096 --tag peer --out bench/results
    # CPU smoke test at toy size (what the test suite runs; no mamba-ssm on CPU machines):
    python bench/finetune_gpu.py --size tiny --device cpu --seq 256 --steps 3 --warmup 1 --gbs 2 --peer-seqs 128 \
        --peer-variants torch
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
H200_BF16_TFLOPS = 790.0
WORKLOADS = ("text", "cord", "medpix", "video")
CHILD_ENV = "NVL_BENCH_CHILD"


def log(msg: str) -> None:
    print(f"[finetune_gpu {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ------------------------------------------------------------------------------------ run hygiene
#: what a file name the bench writes may hold: the GPU machine's file return refuses any other character
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
#: GPU memory (MiB, per GPU, as nvidia-smi reports it) below which a GPU counts as idle before a run starts
IDLE_GPU_MIB = 1000


def safe_name(name: str) -> str:
    """``name`` with every character but letters, digits, ``.``, ``_`` and ``-`` replaced by ``_``: every file the
    bench writes (into --out, which the GPU machine returns, and --work) is named through this."""
    return _UNSAFE.sub("_", name)


def profile_file_names(name: str) -> tuple[str, str]:
    """The per-op profile's and the host-sync trace's file names (in --out) of the run called ``name``."""
    stem = "profile_" + safe_name(name)
    return stem + ".txt", stem + "_syncs.txt"


def query_gpu_used_mib() -> list[int] | None:
    """Every GPU's ``memory.used`` in MiB as nvidia-smi reports it (the driver's view: any process's memory), or
    None where nvidia-smi is missing or fails."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10)
        return [int(v) for v in out.stdout.split()] if out.returncode == 0 else None
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return None


def wait_for_idle_gpus(threshold_mib: int = IDLE_GPU_MIB, limit_s: float = 60.0,
                       poll_s: float = 0.5) -> tuple[list[int] | None, bool]:
    """Wait until every GPU's used memory is below ``threshold_mib`` (the driver may still be releasing a killed
    run's memory, which the next run's sampled peak would count), polling every ``poll_s`` for at most
    ``limit_s``. Returns (the last reading, whether it was idle); (None, False) where nvidia-smi cannot be read."""
    deadline = time.monotonic() + limit_s
    while True:
        used = query_gpu_used_mib()
        if used is None:
            return None, False
        if all(v < threshold_mib for v in used):
            return used, True
        if time.monotonic() >= deadline:
            return used, False
        time.sleep(poll_s)


def start_gpu_run(device: str) -> float | None:
    """Before a run on CUDA: wait for idle GPUs (``wait_for_idle_gpus``) and return the largest GPU's used
    memory then, in GB (``gpu_used_at_start_gb``, the unit of ``peak_gb_nvidia_smi``); None on CPU or without
    nvidia-smi. Says so in one line when the GPUs never got idle."""
    if device != "cuda":
        return None
    used, idle = wait_for_idle_gpus()
    if used is None:
        return None
    if not idle:
        log(f"GPUs not idle before the run: {used} MiB used (threshold {IDLE_GPU_MIB} MiB per GPU); the run's "
            "nvidia-smi peak counts that")
    return round(max(used) * 1.048576 / 1000, 1)


def run_child(cmd: list[str], env: dict[str, str], log_file: Any, timeout: float) -> int | None:
    """Run ``cmd`` in its own session (process group) with stdout and stderr into ``log_file``; its exit status,
    or None if it ran past ``timeout`` seconds. On a timeout, an interruption of the bench, or after it exits,
    the child's process group and the groups of all its descendants are killed (SIGKILL) and the child reaped,
    so its DataLoader workers and torchrun's ranks die with it and hold no GPU memory into the next run."""
    proc = subprocess.Popen(cmd, env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return None
    finally:
        # the descendants are looked up only while the child is unreaped: once reaped, its pid may be another's
        kill_process_tree(proc.pid, descendants=proc.returncode is None)
        proc.wait()


def exit_on_sigterm() -> None:
    """Turn SIGTERM (what ``timeout`` sends a bench that runs past its limit) into SystemExit, so that
    ``run_child``'s ``finally`` kills the running child's process tree: by default Python dies at once and the
    child keeps the GPU busy into the next call on the same machine."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def _descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (from /proc; [] where there is none)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])  # the field after the state
        except (OSError, IndexError, ValueError):  # the process ended meanwhile
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill_process_tree(pid: int, descendants: bool = True) -> None:
    """SIGKILL the process group led by ``pid`` (a child started with ``start_new_session``) and, with
    ``descendants``, the groups of all its live descendants: torchrun starts each rank in a session of its own,
    which a kill of the child's group alone would leave running. The bench's own group is never signalled."""
    own = os.getpgrp()
    tree = _descendants(pid) if descendants else []
    groups = {pid}
    for p in tree:
        try:
            groups.add(os.getpgid(p))
        except ProcessLookupError:
            pass
    for target, kill in [*((g, os.killpg) for g in groups - {own}), *((p, os.kill) for p in tree)]:
        try:
            kill(target, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):  # already gone
            pass


# ----------------------------------------------------------------------------------------- data
def write_model_dir(out: Path, size: str) -> Path:
    """A toy HF directory without weights (config, tokenizer, processor files): enough for --random-init."""
    from nvl_nemotron_vl.toy import _side_files, toy_config
    from nvl_nemotron_vl.toy_tokenizer import write_toy_tokenizer

    if (out / "config.json").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    ids = write_toy_tokenizer(out)
    raw = toy_config(size, ids)
    (out / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
    for name, content in _side_files(raw, ids).items():
        (out / name).write_text(json.dumps(content, indent=2) + "\n")
    return out


def _words(n: int, seed: int) -> str:
    import random

    rng = random.Random(seed)
    vocab = ["total", "price", "menu", "item", "cash", "change", "tax", "receipt", "liver", "scan", "lesion",
             "normal", "left", "right", "upper", "lower", "the", "a", "of", "and", "with", "shows", "no", "yes"]
    return " ".join(rng.choice(vocab) for _ in range(n))


def write_cord(root: Path, n: int) -> Path:
    """A local copy of naver-clova-ix/cord-v2 (parquet: image + JSON-string ground_truth): tall receipts."""
    from datasets import Dataset, Features, Value
    from datasets import Image as HFImage
    from PIL import Image, ImageDraw

    sys.path.insert(0, str(ROOT / "tests" / "support"))  # the tests' support modules (not installed)
    from nvl_data_testing import write_hub_dataset

    rows_img, rows_gt = [], []
    for i in range(n):
        img = Image.new("RGB", (768, 1152), (250, 250, 245))
        d = ImageDraw.Draw(img)
        for y in range(20, 1130, 24):
            d.text((30, y), _words(6, i * 1000 + y), fill=(20, 20, 20))
        menu = [{"nm": _words(3, i * 100 + j), "cnt": str(j + 1), "price": f"{(j + 3) * 1250:,}"} for j in range(14)]
        parse = {"menu": menu, "sub_total": {"subtotal_price": "91,000", "tax_price": "9,100"},
                 "total": {"total_price": "100,100", "cashprice": "101,000", "changeprice": "900"}}
        rows_img.append(img)
        rows_gt.append(json.dumps({"gt_parse": parse, "meta": {"version": "2.0.0", "split": "train", "image_id": i},
                                   "valid_line": []}))
    feats = Features({"image": HFImage(), "ground_truth": Value("string")})
    ds = Dataset.from_dict({"image": rows_img, "ground_truth": rows_gt}, features=feats)
    return write_hub_dataset(root, {"data/train-00000-of-00001.parquet": ds}, {"default": {"train": "data/train-*"}})


def write_medpix(root: Path, n: int) -> Path:
    """A local copy of mmoukouba/MedPix-VQA (parquet; ``image_id`` is the image): 512x512 scans."""
    from datasets import Dataset, Features, Value
    from datasets import Image as HFImage
    from PIL import Image, ImageDraw

    sys.path.insert(0, str(ROOT / "tests" / "support"))  # the tests' support modules (not installed)
    from nvl_data_testing import write_hub_dataset

    imgs, q, a = [], [], []
    for i in range(n):
        img = Image.new("L", (512, 512), 40 + i % 50)
        ImageDraw.Draw(img).ellipse((100 + i % 60, 120, 380, 400), fill=160)
        imgs.append(img)
        q.append("What abnormality is seen in the " + _words(8, i) + "?")
        a.append(_words(10, 7 * i + 1) + ".")
    feats = Features({"image_id": HFImage(), "mode": Value("string"), "case_id": Value("string"),
                      "question": Value("string"), "answer": Value("string")})
    ds = Dataset.from_dict({"image_id": imgs, "mode": ["CT"] * n, "case_id": [f"MPX{i}" for i in range(n)],
                            "question": q, "answer": a}, features=feats)
    return write_hub_dataset(root, {"data/train-00000-of-00001.parquet": ds}, {"default": {"train": "data/train-*"}})


VIDEO_SUBDIR = Path("NextQA") / "NExTVideo" / "0000"  # where the source's 0_30_s_nextqa clips sit


def write_video_clips(out: Path, count: int = 6, size: int = 512, fps: int = 10, overwrite: bool = False) -> list[Path]:
    """``count`` short mp4 clips (h264, 2-4 s at ``fps``, ``size`` x ``size``: the frame size the recipe's
    processor resizes every sampled frame to) under ``out/NextQA/NExTVideo/0000/``, laid out as the
    LLaVA-Video-178K archives extract. Each clip: a drifting colour field, grid lines, four shapes moving
    on their own paths and a caption naming the clip and time (structure for the encoder, cheap to code:
    ~40 KB a clip at 512). Needs PyAV with an encoder (made on the CPU machine; decord reads them)."""
    import av
    import numpy as np
    from PIL import Image, ImageDraw

    folder = out / VIDEO_SUBDIR
    if folder.is_dir() and any(folder.glob("*.mp4")) and not overwrite:
        raise SystemExit(f"--make-videos: {folder} already holds clips; pass --overwrite to replace them")
    folder.mkdir(parents=True, exist_ok=True)
    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    paths = []
    for i in range(count):
        rng = np.random.default_rng(1000 + i)
        base, frames = rng.uniform(40, 200, 3), int((2 + i % 3) * fps)
        phase = [2 * np.pi * (xx * (k + 1) + yy * (2 - k) * 0.5) for k in range(3)]
        shapes = [(rng.uniform(0, size, 2), rng.uniform(-0.025, 0.025, 2) * size, rng.uniform(0.06, 0.18) * size,
                   tuple(int(v) for v in rng.integers(0, 256, 3)), j % 2) for j in range(4)]
        path = folder / f"clip{i:02d}.mp4"
        tmp = path.with_suffix(".part.mp4")
        with av.open(str(tmp), mode="w") as container:
            stream = container.add_stream(codec, rate=fps)
            stream.width = stream.height = size
            stream.pix_fmt = "yuv420p"
            if codec == "libx264":
                stream.options = {"crf": "32"}
            for t in range(frames):
                field = np.stack([base[k] + 40 * np.sin(phase[k] + 2 * np.pi * t / frames) for k in range(3)], -1)
                img = Image.fromarray(field.clip(0, 255).astype(np.uint8))
                draw = ImageDraw.Draw(img)
                for y in range(0, size, max(8, size // 8)):
                    draw.line([(0, y), (size, y)], fill=(255, 255, 255), width=1)
                for start, step, r, colour, round_ in shapes:
                    x, y = (start + step * t) % size
                    box = (x - r / 2, y - r / 2, x + r / 2, y + r / 2)
                    (draw.ellipse if round_ else draw.rectangle)(box, fill=colour, outline=(0, 0, 0))
                draw.text((4, 4), f"clip {i} t={t / fps:.1f}s", fill=(0, 0, 0))
                for packet in stream.encode(av.VideoFrame.from_ndarray(np.asarray(img), format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        tmp.replace(path)
        paths.append(path)
    return paths


def write_llava_video(root: Path, n: int, videos: Path) -> Path:
    """A local copy of lmms-lab/LLaVA-Video-178K's ``0_30_s_nextqa`` subset (the video recipe's): the JSON
    annotations of its ``open_ended`` split, ``n`` rows over the clips under ``videos`` (the
    ``video_root_path``; made by ``--make-videos``), each a question and answer, every third row a second
    turn, with the source's ``<image>`` placeholder in the first human turn."""
    sys.path.insert(0, str(ROOT / "tests" / "support"))  # the tests' support modules (not installed)
    from nvl_data_testing import write_hub_dataset

    clips = sorted(p.relative_to(videos).as_posix() for p in videos.rglob("*.mp4")) if videos.is_dir() else []
    if not clips:
        raise SystemExit(f"--videos: no .mp4 clips under {videos}; make them with "
                         "`python bench/finetune_gpu.py --make-videos DIR` (needs PyAV) and pass --videos DIR")
    rows = []
    for i in range(n):
        turns = [{"from": "human", "value": "<image>\nWhat happens to the " + _words(6, 3 * i) + "?"},
                 {"from": "gpt", "value": _words(12, 3 * i + 1) + "."}]
        if i % 3 == 2:
            turns += [{"from": "human", "value": "And after that, " + _words(5, 3 * i + 2) + "?"},
                      {"from": "gpt", "value": _words(9, 5 * i) + "."}]
        rows.append({"id": f"nextqa_{i}", "conversations": turns, "data_source": "0_30_s_nextqa",
                     "video": clips[i % len(clips)]})
    return write_hub_dataset(root, {"0_30_s_nextqa/0_30_s_nextqa_oe_qa_processed.json": rows},
                             {"0_30_s_nextqa": {"open_ended": "0_30_s_nextqa/*oe*.json"}})


class BenchText:
    """The ``bench_text`` dataset maker: text-only conversations of about ``words`` words each."""

    splits = ("train",)

    def __init__(self, *, split: str = "train", words: int = 3000, num_examples: int = 256) -> None:
        self.words, self.n = int(words), int(num_examples)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, Any]:
        half = self.words // 2
        return {"conversation": [
            {"role": "user", "content": [{"type": "text", "text": _words(half, 2 * i)}]},
            {"role": "assistant", "content": [{"type": "text", "text": _words(self.words - half, 2 * i + 1)}]},
        ]}


# ---------------------------------------------------------------------------------- nvl (child)
def child_main(argv: list[str]) -> int:
    """Run ``nvl finetune ARGV`` in this process with the bench's text maker registered."""
    from nvlcore.cli import build_cli
    from nvlcore.hookspecs import hookimpl
    from nvlcore.plugins import get_plugin_manager

    class BenchPlugin:
        @hookimpl
        def nvl_register_dataset_makers(self, register: Any) -> None:
            register("bench_text", BenchText)

    pm = get_plugin_manager()
    pm.add_plugin(BenchPlugin(), name="nvl_bench")
    cap_gb = float(os.environ.get("NVL_BENCH_MEMORY_CAP_GB", "0"))
    if cap_gb:
        from nvlcore.training.finetune import ALLOCATOR_DEFAULT

        os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", ALLOCATOR_DEFAULT)  # nvl finetune's, before CUDA starts
        # a smaller card emulated on this one (bench/memory_gpu.py): the process may use ``cap_gb`` (the card) as
        # the driver counts it, so the caching allocator gets that less the CUDA context this process already
        # holds; nvl finetune lowers it further to its own train.memory_budget_gb
        import torch

        free, total = torch.cuda.mem_get_info()
        context = total - free - torch.cuda.memory_reserved()
        torch.cuda.set_per_process_memory_fraction((cap_gb * 1e9 - context) / total)
        print(f"[bench] a {cap_gb:g} GB card emulated: the allocator may hold at most "
              f"{(cap_gb * 1e9 - context) / 1e9:.2f} GB beside a {context / 1e9:.2f} GB CUDA context", flush=True)
    profile_at = int(os.environ.get("NVL_BENCH_PROFILE_ITER", "0"))
    if profile_at:
        _profile_one_step(profile_at, Path(os.environ["NVL_BENCH_PROFILE_OUT"]),
                          Path(os.environ["NVL_BENCH_PROFILE_SYNCS_OUT"]))
    cli = build_cli(pm)
    return cli.main(args=["finetune", *argv], prog_name="nvl", standalone_mode=True)


def _profile_one_step(iteration: int, out: Path, syncs_out: Path) -> None:
    """Wrap the trainer's step so that iteration ``iteration`` runs under torch.profiler; the per-op
    table (CUDA time, top 40) is written to ``out``, and the iteration before it records its host
    synchronisations (``syncs_out``). The steps themselves are unchanged."""
    import torch

    from nvlcore.training.trainer import Trainer

    original = Trainer.train_step
    count = {"n": 0}

    def step(self: Any, micro_batches: Any) -> Any:
        count["n"] += 1
        if count["n"] == iteration - 1:
            return _trace_syncs(lambda: original(self, micro_batches), syncs_out)
        if count["n"] != iteration:
            return original(self, micro_batches)
        import time

        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
            t0 = time.perf_counter()
            result = original(self, micro_batches)
            torch.cuda.synchronize()
            wall = time.perf_counter() - t0
        averages = prof.key_averages()
        busy = sum(getattr(e, "self_device_time_total", 0.0) for e in averages) / 1e6
        table = averages.table(sort_by="cuda_time_total", row_limit=40, max_name_column_width=70)
        shapes = prof.key_averages(group_by_input_shape=True).table(
            sort_by="self_cuda_time_total", row_limit=30, max_name_column_width=50, max_shapes_column_width=90)
        out.write_text(f"torch.profiler, iteration {iteration} of `nvl finetune` (all micro-batches of one step)\n"
                       f"step wall {wall:.3f} s (under the profiler); kernels (self device time summed) {busy:.3f} "
                       "s\n\n"
                       + table + "\n\nby input shape (self CUDA time)\n\n" + shapes + "\n")
        return result

    Trainer.train_step = step


def parse_kernels(report: str) -> dict[str, str]:
    """``op: implementation; op: implementation`` (the finetune log's kernels line) -> a dict; an
    implementation may itself hold "; " (only "; " before ``word: `` starts the next op)."""
    import re

    out = {}
    for part in re.split(r"; (?=\w+: )", report.strip()):
        op, _, impl = part.partition(": ")
        out[op] = impl
    return out


def _trace_syncs(run: Any, out: Path) -> Any:
    """Run ``run()`` with CUDA's sync debug mode on and write where the host waited for the GPU: each
    synchronising call site (the innermost frames of nvl, its plugins and the libraries under them),
    with its count, most frequent first."""
    import collections
    import traceback
    import warnings

    import torch

    sites: collections.Counter = collections.Counter()
    previous = warnings.showwarning

    def record(message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
        if "synchroniz" not in str(message):
            return previous(message, category, filename, lineno, file, line)
        frames = [f for f in traceback.extract_stack()[:-1] if "/warnings.py" not in f.filename]
        sites[" <- ".join(f"{Path(f.filename).name}:{f.lineno}({f.name})" for f in reversed(frames[-4:]))] += 1
        return None

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            result = run()
        finally:
            torch.cuda.set_sync_debug_mode("default")
            warnings.showwarning = previous
    out.write_text(f"host synchronisations in one training step: {sum(sites.values())} at {len(sites)} sites\n\n"
                   + "\n".join(f"{n:5d}  {site}" for site, n in sites.most_common()) + "\n")
    return result


class GpuMemorySampler:
    """Peak GPU memory as the driver sees it (nvidia-smi every second), per GPU (``peak_mib``)."""

    def __init__(self) -> None:
        self.peak_mib: list[int] = []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            vals = query_gpu_used_mib()
            if vals is None or (self.peak_mib and len(vals) != len(self.peak_mib)):
                return
            self.peak_mib = [max(a, b) for a, b in zip(self.peak_mib or vals, vals, strict=True)]
            self._stop.wait(1.0)

    def __enter__(self) -> GpuMemorySampler:
        self._t.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._t.join(timeout=15)


def run_nvl(args: argparse.Namespace, model_dir: Path, data: dict[str, Path], workload: str, method: str,
            variant: dict[str, Any], work: Path, seq: int, extra_args: tuple[str, ...] = (),
            name_suffix: str = "", profile: bool = False) -> dict[str, Any]:
    """One ``nvl finetune`` run as a child process, timed from its metrics.jsonl. ``profile``: profile its last
    iteration (as --profile does for a chosen workload; left out of the averages)."""
    first_seq = seq == _seqs(args)[0]
    name = run_name(workload, method, None if first_seq else seq, variant, name_suffix)
    metrics = work / f"metrics-{name}.jsonl"
    metrics.unlink(missing_ok=True)
    cmd_args = ["--hf-model-path", str(model_dir), "--random-init"]
    if method == "lora":
        cmd_args.append("--lora-on-language-model")
    cmd_args += list(extra_args)
    # Several GPUs: torchrun starts the workers, each of them this script's child (so the bench's text maker
    # is registered in every rank) running `nvl finetune` as that rank; the same code path as
    # `nvl finetune --nproc-per-node N`, whose launcher is torch.distributed.run with `-m nvlcore`.
    launcher = ["torchrun", "--standalone", "--nproc-per-node", str(args.nproc)] if (args.nproc or 1) > 1 else []
    if workload == "text":
        maker = ["dataset.maker_name=bench_text", f'dataset.maker_kwargs={{"words": {int(seq * 0.33)}}}']
    elif workload == "cord":
        maker = ["dataset.maker_name=make_cord_v2_dataset", f'dataset.maker_kwargs={{"path": "{data["cord"]}"}}']
    elif workload == "medpix":
        maker = ["dataset.maker_name=make_medpix_dataset", f'dataset.maker_kwargs={{"path": "{data["medpix"]}"}}']
    else:
        # the recipe's own file (the original's video YAML: its maker, subset, freezing, optimizer) replaces
        # the default one; frames (10 a clip, one 512 x 512 tile each) are the processor's defaults, which the
        # YAML leaves as they are. The overrides below set what the bench measures (TP, length, steps, batch).
        from nvl_nemotron_vl.recipes import VIDEO_CONFIG_FILE

        cmd_args += ["--config-file", str(VIDEO_CONFIG_FILE)]
        maker = ["dataset.maker_name=make_llava_video_178k_dataset", "dataset.maker_kwargs="
                 + json.dumps({"path": str(data["video"]), "video_root_path": str(Path(args.videos).resolve())})]
    overrides = maker + [
        f"model.tensor_model_parallel_size={args.tp}", f"dataset.seq_length={seq}", f"model.seq_length={seq}",
        f"train.train_iters={args.steps}", f"train.global_batch_size={args.gbs}", "train.micro_batch_size=1",
        "logger.log_interval=1", f"logger.jsonl_path={metrics}", "validation.eval_iters=0",
        "dataset.num_workers=2" if args.device == "cuda" else "dataset.num_workers=0",
        "scheduler.lr_warmup_iters=1", "checkpoint.save=null",
    ] + [f"{k}={_override_value(v)}" for k, v in variant.items()]
    shown = (" ".join(launcher + ["-m", "nvlcore"]) + " " if launcher else "nvl ") + "finetune " + " ".join(
        shlex.quote(a) for a in cmd_args + overrides)
    log(f"run: {shown}")
    env = {**os.environ, CHILD_ENV: "1", "PYTHONUNBUFFERED": "1"}  # the log file gets lines as printed
    profiled = -1
    # The profiled run: --profile-variant picks it among the runs of a workload (0: the first one, the
    # default or with --skip-default the first variant).
    runs = ([] if args.skip_default else [{}]) + _variants(args)
    chosen = runs[args.profile_variant] if args.profile_variant < len(runs) else None
    profile_files: tuple[str, str] | None = None
    if (profile or (workload in args.profile.split(",") and variant == chosen and first_seq)) and args.device == "cuda":
        profiled = args.steps  # the last iteration; left out of the averages below
        profile_files = profile_file_names(name)
        env.update(NVL_BENCH_PROFILE_ITER=str(profiled), NVL_BENCH_PROFILE_OUT=str(Path(args.out) / profile_files[0]),
                   NVL_BENCH_PROFILE_SYNCS_OUT=str(Path(args.out) / profile_files[1]))
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    rec: dict[str, Any] = {"system": "nvl", "workload": workload, "method": method, "seq": seq,
                           "gpus": max(1, args.nproc or 1), "tp": args.tp, "command": shown,
                           "date": _dt.date.today().isoformat(), "variant": variant}
    # the previous run's memory (a killed one's the driver may still be releasing) must not count in this one's
    rec["gpu_used_at_start_gb"] = start_gpu_run(args.device)
    t0 = time.perf_counter()
    log_path = work / f"log-{name}.txt"
    # the child writes straight into its log, so a run the limit kills still leaves what it printed
    with GpuMemorySampler() if args.device == "cuda" else _Null() as sampler, log_path.open("w") as log_file:
        start = [sys.executable, "-m", "torch.distributed.run", *launcher[1:]] if launcher else [sys.executable]
        exit_status = run_child([*start, __file__, "--child", *cmd_args, *overrides], env, log_file,
                                args.run_timeout)
    timed_out, returncode = exit_status is None, -9 if exit_status is None else exit_status
    rec["wall_s"] = round(time.perf_counter() - t0, 1)
    if profile_files is not None:  # the files in --out the profiled run wrote (None: it did not get that far)
        rec["profile_file"], rec["profile_syncs_file"] = (f if (Path(args.out) / f).is_file() else None
                                                         for f in profile_files)
    out = log_path.read_text(errors="replace")
    rec["_log"] = str(log_path)  # for benches built on this one; not written to the record
    kernels = {}
    for line in out.splitlines():
        if "nvl finetune: kernels: " in line:
            kernels.update(parse_kernels(line.split("nvl finetune: kernels: ", 1)[1]))
        if "nvl finetune: kernels that ran: " in line:  # after the first step: what ran, where it depends on inputs
            kernels.update(parse_kernels(line.split("nvl finetune: kernels that ran: ", 1)[1]))
        if "nvl finetune: memory plan: " in line:
            rec["memory_plan"] = line.split("memory plan: ", 1)[1]
        if " linear layer(s) in FP8" in line:  # an FP8 mixed_precision run: which linears ran FP8
            rec["fp8_linears"] = line.split(": ", 2)[-1]
    rec["kernels"] = kernels
    if sampler is not None and getattr(sampler, "peak_mib", None):
        rec["peak_gb_nvidia_smi"] = round(max(sampler.peak_mib) * 1.048576 / 1000, 1)
    rows = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()] if metrics.exists() else []
    rec.update(memory_outside_allocator(rows, rec.get("peak_gb_nvidia_smi")))
    rows = [r for r in rows if "tokens_per_s" in r]
    if timed_out:
        rec["status"] = f"timeout: killed after {args.run_timeout} s ({len(rows)} iteration(s) logged)"
        rec["iterations_logged"] = [{k: r.get(k) for k in ("iteration", "step_time_s", "tokens_per_s", "mem_gb")}
                                    for r in rows]
        log(f"  -> {rec['status']}")
        return rec
    if returncode != 0 or not rows:
        oom = "out of memory" in out.lower() or "OutOfMemoryError" in out
        last = (out.strip().splitlines() or ["?"])[-1][:300]
        rec["status"] = "oom" if oom else f"error (exit {returncode}): {last}"
        log(f"  -> {rec['status']}")
        return rec
    # the profiled iteration and the one before it (its host synchronisations traced) are left out
    timed = [r for r in rows if args.warmup < r["iteration"]
             and r["iteration"] not in (profiled - 1, profiled)] or rows[-1:]
    secs = sum(r["step_time_s"] for r in timed)
    toks = sum(r["tokens_per_s"] * r["step_time_s"] for r in timed)
    tflops = sum(r["tflops_per_gpu"] * r["step_time_s"] for r in timed) / secs
    step_s = secs / len(timed)
    rec.update(  # tflops_per_gpu is the work executed (a LoRA run's log already counts 2/3 of 3 x forward)
        status="ok", tokens_per_s=round(toks / secs, 1), step_time_s=round(step_s, 3),
        tflops_per_gpu=round(tflops, 1), mfu=round(tflops / H200_BF16_TFLOPS, 4),
        peak_gb=round(max(r.get("mem_gb", 0.0) for r in rows), 1),
        losses=[round(r["loss"], 4) for r in rows], tokens_per_sample=round(toks / len(timed) / args.gbs),
        timed_iterations=len(timed),
    )
    if len(rows) > 1 and "consumed_samples" in rows[0]:
        # samples trained per iteration: the global batch, or with dataset.packing the samples in its rows
        per_step = (rows[-1]["consumed_samples"] - rows[0]["consumed_samples"]) / (len(rows) - 1)
        rec["samples_per_step"] = round(per_step, 2)
        rec["tokens_per_sample"] = round(toks / len(timed) / per_step)
        rec["tokens_per_row"] = round(toks / len(timed) / args.gbs)
    log(f"  -> {rec['tokens_per_s']:,.0f} tokens/s, MFU {rec['mfu']:.1%}, peak {rec['peak_gb']} GB")
    return rec


def run_name(workload: str, method: str, seq: int | None, variant: dict[str, Any], suffix: str = "") -> str:
    """The run's name in its file names (log, metrics, profile): workload, method, ``seq`` unless None (the first
    length), each override's last key part and value, then ``suffix``; made safe by ``safe_name``."""
    parts = [workload, method] + ([] if seq is None else [f"seq{seq}"])
    parts += [f"{k.split('.')[-1]}={_override_value(v).strip('[]')}" for k, v in variant.items()]
    return safe_name("-".join(parts) + suffix)


def memory_outside_allocator(rows: list[dict[str, Any]], driver_peak_gb: float | None) -> dict[str, Any]:
    """The driver's view beside the allocator's, from a run's metrics rows: ``reserved_gb``, the largest
    ``mem_reserved_gb`` (torch.cuda.max_memory_reserved; None on CPU), and ``outside_allocator_gb``, the nvidia-smi
    peak less it: the CUDA context, kernel modules, cuBLAS and NCCL memory the caching allocator does not count
    (None without both)."""
    reserved = [r["mem_reserved_gb"] for r in rows if r.get("mem_reserved_gb") is not None]
    reserved_gb = round(max(reserved), 1) if reserved else None
    outside = (round(driver_peak_gb - reserved_gb, 1) if reserved_gb is not None and driver_peak_gb is not None
               else None)
    return {"reserved_gb": reserved_gb, "outside_allocator_gb": outside}


class _Null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


# -------------------------------------------------------------------------------------- the peer
# transformers + PEFT LoRA at the same LM shape, each try (Mamba ops x gradient checkpointing x micro-batch x seq)
# in a fresh process: transformers 5.x picks each Mamba op's implementation when its NemotronH module is imported
# (``use_kernel_func_from_hub_with_fallback``: the Hub kernel if asked, else the installed package, else PyTorch),
# so what a try runs is set up before that import; and a fresh process has its own peak memory and a clean CUDA
# state after another try's out-of-memory.
PEER_VARIANTS = ("torch", "mamba-ssm triton")
PEER_CHECKPOINTING = ("off", "on", "auto")
PEER_RESULT = "NVL_PEER_RESULT "
MAMBA1_EXTENSION = "selective_scan_cuda"
NEMOTRON_H_MODELING = "transformers.models.nemotron_h.modeling_nemotron_h"
# the NemotronH module's ops that choose an implementation at import, by the kernel-report key of nvl's rows
PEER_OPS = {"fused_split": "mamba2_split_conv1d_scan_combined", "scan": "mamba2_chunk_scan",
            "conv": "causal_conv1d_fn"}


def _peer_list(value: str, key: str, allowed: tuple[str, ...] | None = None) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if allowed is not None and v not in allowed]
    if bad:
        raise SystemExit(f"{key}: unknown {bad}; choose from {list(allowed or ())}")
    return items


def peer_plan(args: argparse.Namespace) -> tuple[list[int], list[str], list[int], list[str]]:
    """(seqs, Mamba-op variants, micro-batches, checkpointing modes) of the peer tries, each key checked."""
    seqs = [int(s) for s in _peer_list(args.peer_seqs, "--peer-seqs")]
    variants = _peer_list(args.peer_variants, "--peer-variants", PEER_VARIANTS)
    batches = [int(b) for b in _peer_list(args.peer_batches, "--peer-batches")]
    if any(b < 1 for b in batches):
        raise SystemExit(f"--peer-batches: micro-batches must be >= 1, got {batches}")
    ckpt = _peer_list(args.peer_checkpointing, "--peer-checkpointing", PEER_CHECKPOINTING)
    if "auto" in ckpt and len(ckpt) > 1:
        raise SystemExit("--peer-checkpointing: 'auto' stands alone (off, then on where off ran out of memory)")
    if seqs and (not variants or not batches or not ckpt):
        raise SystemExit("--peer-variants, --peer-batches and --peer-checkpointing: each needs a value when "
                         "--peer-seqs names a length (pass --peer-seqs '' for no peer)")
    return seqs, variants, batches, ckpt


def _mamba1_stand_in() -> Any:
    """A module named like mamba-ssm's Mamba-1 CUDA extension: every attribute asked of it fails loudly, so a
    call into Mamba-1 (which NemotronH never makes) could not pass unnoticed."""
    import types

    mod = types.ModuleType(MAMBA1_EXTENSION, "nvl bench stand-in: the Mamba-1 CUDA extension is not built here")

    def __getattr__(name: str) -> Any:
        raise AttributeError(f"{MAMBA1_EXTENSION} is bench/finetune_gpu.py's stand-in for mamba-ssm's Mamba-1 CUDA "
                             f"extension (not built on this machine); {name!r} was asked of it")

    mod.__getattr__ = __getattr__  # type: ignore[attr-defined]  # PEP 562: the module's own __getattr__
    mod.NVL_STAND_IN = True  # type: ignore[attr-defined]
    return mod


def ensure_mamba_ssm(import_module: Any = None) -> tuple[bool, str]:
    """Make ``import mamba_ssm`` work where the one thing it lacks is its Mamba-1 CUDA extension; (importable, note).

    mamba-ssm built without CUDA (``MAMBA_SKIP_CUDA_BUILD=TRUE``) has all its Triton kernels, but its
    ``__init__`` imports ``selective_scan_interface``, which imports ``selective_scan_cuda``, the Mamba-1 selective
    scan; so the package import fails and transformers takes PyTorch for every Mamba op. Only in that case a stand-in
    module is put on ``sys.modules`` under that name and the import retried. This is fair: NemotronH (Mamba-2) never
    calls the Mamba-1 scan, and the stand-in fails on any use; every kernel the peer then runs is mamba-ssm's own
    (its Triton SSD kernels) or transformers'. Any other import failure is reported, not worked around."""
    import importlib

    import_module = import_module or importlib.import_module
    try:
        import_module("mamba_ssm")
        return True, "import mamba_ssm: ok"
    except ModuleNotFoundError as exc:
        if exc.name != MAMBA1_EXTENSION:
            return False, f"import mamba_ssm failed: {type(exc).__name__}: {exc}"
        first = f"{type(exc).__name__}: {exc}"
    except Exception as exc:
        return False, f"import mamba_ssm failed: {type(exc).__name__}: {exc}"
    # the failed import left its finished submodules behind: a clean retry imports the package whole
    for name in [m for m in sys.modules if m == "mamba_ssm" or m.startswith("mamba_ssm.")]:
        del sys.modules[name]
    sys.modules[MAMBA1_EXTENSION] = _mamba1_stand_in()
    try:
        import_module("mamba_ssm")
    except Exception as exc:
        del sys.modules[MAMBA1_EXTENSION]
        return False, (f"import mamba_ssm failed ({first}), and again with a stand-in for {MAMBA1_EXTENSION}: "
                       f"{type(exc).__name__}: {exc}")
    return True, (f"import mamba_ssm: ok with a stand-in for {MAMBA1_EXTENSION} (without it: {first}; NemotronH "
                  "never calls that Mamba-1 extension)")


def _resolved_implementation(op: Any) -> tuple[Any, Any] | None:
    """(implementation, torch function) that transformers' ``use_kernel_func_from_hub_with_fallback`` bound for
    ``op``: read from its wrapper's closure (``kernels``, where installed, wraps that wrapper in a module whose
    forward closes over it), or None where no such wrapper is found."""
    todo, seen = [op], set()
    while todo:
        f = todo.pop()
        if f is None or id(f) in seen:
            continue
        seen.add(id(f))
        code = getattr(f, "__code__", None)
        if code is not None and {"implementation", "torch_function"} <= set(code.co_freevars):
            cells = dict(zip(code.co_freevars, f.__closure__ or (), strict=True))
            return cells["implementation"].cell_contents, cells["torch_function"].cell_contents
        for cell in getattr(f, "__closure__", None) or ():
            try:
                todo.append(cell.cell_contents)
            except ValueError:  # an empty cell
                pass
        if code is None:  # a module standing for the function (kernels'): its forward closes over it
            todo.append(getattr(type(f), "forward", None))
        todo.append(getattr(f, "__func__", None))
    return None


def _qualname(fn: Any) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


def _instrument_mamba_ssm(calls: dict[str, int], notes: dict[str, str]) -> None:
    """Count the calls that reach mamba-ssm's SSD kernels; its fused conv+scan+norm+out_proj, where it cannot run
    (it needs causal-conv1d's CUDA functions), returns None from then on, as transformers' own stand-in for it does
    when no kernel is present, so that transformers runs its unfused path. Done before transformers' NemotronH
    module is imported, since that import binds these functions."""
    import functools
    import importlib

    sys.path.insert(0, str(ROOT / "bench"))
    from lora_gpu import is_oom

    ssd = importlib.import_module("mamba_ssm.ops.triton.ssd_combined")
    scan, fused = ssd.mamba_chunk_scan_combined, ssd.mamba_split_conv1d_scan_combined

    @functools.wraps(scan)
    def counted_scan(*args: Any, **kwargs: Any) -> Any:
        calls["scan:package"] += 1
        return scan(*args, **kwargs)

    @functools.wraps(fused)
    def fused_or_fall_through(*args: Any, **kwargs: Any) -> Any:
        if "fused_split" in notes:
            return None
        try:
            out = fused(*args, **kwargs)
        except Exception as exc:
            if is_oom(exc):
                raise
            notes["fused_split"] = f"its first call raised {type(exc).__name__}: {str(exc)[:200]}"
            return None
        calls["fused_split:package"] += 1
        return out

    ssd.mamba_chunk_scan_combined = counted_scan
    ssd.mamba_split_conv1d_scan_combined = fused_or_fall_through


def _count_ops(modeling: Any, calls: dict[str, int]) -> dict[str, str]:
    """Wrap the NemotronH module's Mamba ops (module globals, looked up at each call) and its gated norm with call
    counters; returns what each op resolved to."""
    resolved = {}
    for key, name in PEER_OPS.items():
        op = getattr(modeling, name)
        pair = _resolved_implementation(op)
        resolved[key] = ("? (transformers' fallback wrapper not found)" if pair is None
                         else "transformers' own PyTorch code" if pair[0] is pair[1] else _qualname(pair[0]))

        def counted(*args: Any, _op: Any = op, _key: str = key, **kwargs: Any) -> Any:
            calls[_key] += 1
            return _op(*args, **kwargs)

        setattr(modeling, name, counted)
    norm_cls = modeling.NemotronHRMSNormGated
    norm_forward = norm_cls.forward

    def counted_norm(self: Any, *args: Any, **kwargs: Any) -> Any:
        calls["gated_norm"] += 1
        return norm_forward(self, *args, **kwargs)

    norm_cls.forward = counted_norm
    return resolved


def _peer_kernels(resolved: dict[str, str], calls: dict[str, int], notes: dict[str, str],
                  attention: str) -> dict[str, str]:
    """The row's ``kernels``: what each op resolved to and how many of its calls (forward passes, recomputation
    included) ran where: counted, not assumed."""
    out = {}
    for key, name in PEER_OPS.items():
        n, pkg = calls[key], calls.get(f"{key}:package", 0)
        head = f"{name} -> {resolved[key]}; {n} calls"
        if key == "fused_split":
            out[key] = (f"{head}: {pkg} ran it, {n - pkg} returned None so transformers ran its unfused path"
                        + (f" ({notes[key]})" if key in notes else ""))
        elif key == "scan":
            out[key] = f"{head}: {pkg} in mamba-ssm's Triton kernel, {n - pkg} in transformers' PyTorch code"
        else:
            out[key] = head + (" (transformers' PyTorch F.conv1d)" if resolved[key].startswith("transformers")
                               else "")
    out["gated_norm"] = f"transformers NemotronHRMSNormGated (PyTorch); {calls['gated_norm']} calls"
    out["attention"] = attention
    return out


def _peer_record(spec: dict[str, Any]) -> dict[str, Any]:
    """A peer row's fixed fields: ``variant`` says what the try ran, ``command`` how to run it again alone."""
    return {"system": "transformers+peft", "workload": "text", "method": "lora", "seq": int(spec["seq"]), "gpus": 1,
            "tp": 1, "variant": {"mamba": spec["mamba"],
                                 "gradient_checkpointing": "on" if spec["gradient_checkpointing"] else "off",
                                 "micro_batch_size": int(spec["micro_batch_size"])},
            "command": "python bench/finetune_gpu.py --peer-child " + shlex.quote(json.dumps(spec, sort_keys=True)),
            "date": _dt.date.today().isoformat(), "kernels": {}}


def _mamba_ops_ran(resolved: dict[str, str], calls: dict[str, int]) -> str:
    """What the try's Mamba ops ran, in words, from the counted calls (the README and markdown quote it)."""
    n, pkg = calls["scan"], calls.get("scan:package", 0)
    if calls.get("fused_split:package", 0):
        head = f"mamba-ssm's fused conv+scan+norm+out_proj ({calls['fused_split:package']} of "
        return head + f"{calls['fused_split']} calls), the rest in PyTorch"
    if n == 0:
        return "no Mamba op called"
    if pkg == 0:
        return "Mamba ops in PyTorch"
    scan = "mamba-ssm's Triton chunk scan" + ("" if pkg == n else f" ({pkg} of {n} calls)")
    conv = "conv1d" if resolved["conv"].startswith("transformers") else ""
    return f"{scan}, {conv + ' and ' if conv else ''}gated norm in PyTorch"


def peer_try(spec: dict[str, Any], build: Any = None) -> dict[str, Any]:
    """One peer try in this process: ``spec`` = size, device, seq, micro_batch_size, mamba (a PEER_VARIANTS name),
    gradient_checkpointing (bool), warmup, steps. ``build(cfg, device, dtype)`` makes the model (default: transformers'
    NemotronHForCausalLM at the toy's LM shape, lora_gpu.peer_model); an out-of-memory error anywhere is the row's
    ``"status": "oom"``."""
    import collections
    import gc
    import importlib

    import torch

    sys.path.insert(0, str(ROOT / "bench"))
    from lora_gpu import PEER_TARGETS, is_oom, lora_flops_per_token, nvl_config, peer_model, text_tokens

    from nvlcore.bridge import FROZEN_BASE_FLOPS_SHARE

    seq, mb, mamba, ckpt = int(spec["seq"]), int(spec["micro_batch_size"]), spec["mamba"], bool(
        spec["gradient_checkpointing"])
    rec = _peer_record(spec)
    resolved: dict[str, str] | None = None
    calls: collections.Counter = collections.Counter()
    notes: dict[str, str] = {}
    setup: dict[str, str] = {}
    model = opt = None
    try:
        if NEMOTRON_H_MODELING in sys.modules:
            raise RuntimeError(f"{NEMOTRON_H_MODELING} was imported before the try's Mamba ops were set up")
        if mamba == "torch":
            for pkg in ("mamba_ssm", "causal_conv1d"):  # blocked: import fails, transformers takes PyTorch
                sys.modules[pkg] = None  # type: ignore[assignment]
            setup["mamba_ssm"] = "blocked (sys.modules entry None): every Mamba op in PyTorch"
        elif mamba == "mamba-ssm triton":
            ok, note = ensure_mamba_ssm()
            setup["mamba_ssm"] = note
            if not ok:
                rec.update(status=f"error: mamba-ssm not importable, so no Triton kernel could run ({note[:300]})",
                           setup=setup)
                return rec
            _instrument_mamba_ssm(calls, notes)
            import mamba_ssm

            rec.setdefault("versions", {})["mamba_ssm"] = getattr(mamba_ssm, "__version__", "?")
        else:
            raise ValueError(f"--peer-variants: unknown {mamba!r}; choose from {list(PEER_VARIANTS)}")
        try:
            importlib.import_module("causal_conv1d")
            setup["causal_conv1d"] = "importable"
        except Exception as exc:
            setup["causal_conv1d"] = f"not importable ({type(exc).__name__}: {str(exc)[:120]})"
        import peft
        import transformers
        from peft import LoraConfig, get_peft_model

        rec.setdefault("versions", {}).update(transformers=transformers.__version__, peft=peft.__version__,
                                              torch=torch.__version__)
        modeling = importlib.import_module(NEMOTRON_H_MODELING)
        resolved = _count_ops(modeling, calls)
        device = torch.device(spec["device"])
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        cfg = nvl_config(spec["size"])
        base = (build or peer_model)(cfg, device, dtype)
        if ckpt:
            # non-reentrant: recomputes each NemotronHBlock in backward; the frozen embeddings need no
            # enable_input_require_grads with it
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=PEER_TARGETS))
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        ids = torch.cat([text_tokens(cfg, seq) for _ in range(mb)]).to(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times, losses = [], []
        for step in range(int(spec["warmup"]) + int(spec["steps"])):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t = time.perf_counter()
            # use_cache=False: training builds no generation cache (the config's default would, and its mixers
            # then skip the fused training path)
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if step >= int(spec["warmup"]):
                times.append(time.perf_counter() - t)
            losses.append(round(loss.detach().item(), 4))
        s = sum(times) / len(times)
        _, full_fpt = lora_flops_per_token(cfg, seq, 16, [])
        rec.update(status="ok", tokens_per_s=round(mb * seq / s, 1), step_time_s=round(s, 3), losses=losses,
                   mfu=round(full_fpt * FROZEN_BASE_FLOPS_SHARE * mb * seq / s / 1e12 / H200_BF16_TFLOPS, 4))
        rec["kernels"] = _peer_kernels(resolved, calls, notes, getattr(base.config, "_attn_implementation", "?"))
        rec["mamba_ops_ran"] = _mamba_ops_ran(resolved, calls)
    except Exception as exc:
        rec["status"] = "oom" if is_oom(exc) else f"error: {type(exc).__name__}: {str(exc)[:300]}"
        if not rec["kernels"] and resolved is not None:
            rec["kernels"] = _peer_kernels(resolved, calls, notes, "?")
    finally:
        if spec["device"] == "cuda" and torch.cuda.is_available():
            rec["peak_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 1)
        model = opt = None  # noqa: F841
        gc.collect()
    rec["setup"] = setup
    return rec


def peer_child_main(argv: list[str]) -> int:
    """``--peer-child SPEC_JSON``: one peer try; its record is printed on the last line after PEER_RESULT."""
    rec = peer_try(json.loads(argv[0]))
    print(PEER_RESULT + json.dumps(rec), flush=True)
    return 0


def run_peer_try(args: argparse.Namespace, seq: int, mamba: str, mb: int, ckpt: bool, work: Path) -> dict[str, Any]:
    """One peer try in a fresh process (see the section's comment); a try that dies or hangs is a row too."""
    spec = {"size": args.size, "device": args.device, "seq": seq, "micro_batch_size": mb, "mamba": mamba,
            "gradient_checkpointing": ckpt, "warmup": args.warmup, "steps": args.peer_steps}
    name = safe_name(f"peer-seq{seq}-{mamba}-mb{mb}{'-ckpt' if ckpt else ''}")
    log_path = work / f"log-{name}.txt"
    from nvlcore.training.finetune import ALLOCATOR_DEFAULT

    # the caching allocator `nvl finetune` sets for itself (unless the user set one), so that neither side's
    # fragmentation decides an out-of-memory the other would not have
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "PYTORCH_CUDA_ALLOC_CONF": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ALLOCATOR_DEFAULT)}
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    log(f"peer: {name}")
    used_at_start = start_gpu_run(args.device)
    t0 = time.perf_counter()
    with log_path.open("w") as log_file:
        returncode = run_child([sys.executable, __file__, "--peer-child", json.dumps(spec)], env, log_file,
                               args.run_timeout)
    out = log_path.read_text(errors="replace")
    results = [line[len(PEER_RESULT):] for line in out.splitlines() if line.startswith(PEER_RESULT)]
    if results:
        rec = json.loads(results[-1])
    else:  # the child died (e.g. killed by the host for memory) or hung: what its log says
        oom = "out of memory" in out.lower() or "OutOfMemoryError" in out
        last = (out.strip().splitlines() or ["?"])[-1][:300]
        rec = _peer_record(spec)
        rec["status"] = (f"timeout: killed after {args.run_timeout} s" if returncode is None else "oom" if oom
                         else f"error (exit {returncode}): {last}")
    rec["wall_s"] = round(time.perf_counter() - t0, 1)
    rec["gpu_used_at_start_gb"] = used_at_start
    rec["allocator"] = env["PYTORCH_CUDA_ALLOC_CONF"]
    log(f"  -> {rec['status']}" + (f": {rec['tokens_per_s']:,.0f} tokens/s, peak {rec.get('peak_gb')} GB"
                                   if rec.get("tokens_per_s") else ""))
    return rec


def run_peers(args: argparse.Namespace, work: Path, emit: Any) -> None:
    """Every peer try of the plan, each record passed to ``emit`` as it comes; with --peer-checkpointing auto a
    (variant, micro-batch) is tried again with gradient checkpointing only where it ran out of memory without."""
    seqs, variants, batches, ckpt = peer_plan(args)
    for seq in seqs:
        for mamba in variants:
            for mb in batches:
                for mode in (["off"] if ckpt == ["auto"] else ckpt):
                    rec = run_peer_try(args, seq, mamba, mb, mode == "on", work)
                    emit(rec)
                    if ckpt == ["auto"] and rec["status"] == "oom":
                        emit(run_peer_try(args, seq, mamba, mb, True, work))


# ---------------------------------------------------------------------------------------- report
def _baselines(records: list[dict[str, Any]], r: dict[str, Any], without: tuple[str, ...]) -> list[dict[str, Any]]:
    """nvl rows of ``r``'s workload, method and seq whose variant is ``r``'s without the keys ``without``."""
    rest = {k: v for k, v in (r.get("variant") or {}).items() if k not in without}
    return [b for b in records if b["system"] == "nvl" and b["workload"] == r["workload"]
            and b["method"] == r["method"] and b["seq"] == r["seq"] and (b.get("variant") or {}) == rest]


def markdown(records: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [f"# `nvl finetune` throughput ({meta['date']}, {meta['machine']})", "",
             "Each nvl row is one `nvl finetune --random-init` run (the command below it), timed from its own",
             f"metrics.jsonl after {meta['warmup']} warm-up iteration(s); the peer is transformers + PEFT in the",
             "same bench run. MFU = executed TFLOP/s (bridge formula: LM at real length + ViT + projector, 3 x",
             "forward; x 2/3 for LoRA, whose frozen base computes no weight gradients) / 790 TFLOP/s.", "",
             "| system | workload | method | seq | GPUs | TP | variant | tokens/s | MFU | peak GB | status |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        var = ", ".join(f"{k}={_override_value(v)}" for k, v in (r.get("variant") or {}).items()) or "default"
        tps = f"{r['tokens_per_s']:,.0f}" if r.get("tokens_per_s") else "-"
        mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "-"
        lines.append(f"| {r['system']} | {r['workload']} | {r['method']} | {r['seq']} | {r['gpus']} | {r['tp']} | "
                     f"{var} | {tps} | {mfu} | {r.get('peak_gb') or '-'} | {r['status']} |")
    packed = [r for r in records if (r.get("variant") or {}).get("dataset.packing", "none") != "none"
              or (r.get("variant") or {}).get("dataset.enable_in_batch_packing") in ("true", "True")]
    if packed:
        lines += ["", "Sequence packing against the strongest baseline without it: the fastest unpacked micro-batch "
                  "of the same workload and method in this run (pass several, e.g. --variants "
                  "'train.micro_batch_size=2;train.micro_batch_size=4;dataset.packing=best_fit'):", ""]
    for r in packed:
        lines.append(_packing_line(r, _unpacked_rows(records, r)))
    fp8 = [r for r in records if "_fp8_" in (r.get("variant") or {}).get("mixed_precision", "")]
    if fp8:
        lines += ["", "FP8 (the same workload and method under bf16_mixed, without the mixed_precision override = 1x):",
                  ""]
    for r in fp8:
        base = _baselines(records, r, ("mixed_precision",))
        if base and base[0].get("tokens_per_s") and r.get("tokens_per_s"):
            lines.append(f"- {r['workload']} {r['method']} seq {r['seq']} {r['variant']['mixed_precision']}: "
                         f"{r['tokens_per_s']:,.0f} vs {base[0]['tokens_per_s']:,.0f} tokens/s = "
                         f"{r['tokens_per_s'] / base[0]['tokens_per_s']:.2f}x; peak {r.get('peak_gb')} vs "
                         f"{base[0].get('peak_gb')} GB; {r.get('fp8_linears', '?')}")
        else:
            lines.append(f"- {r['workload']} {r['method']} seq {r['seq']} {r['variant']['mixed_precision']}: "
                         f"{r['status']} (bf16 row: {base[0]['status'] if base else 'not in this run'})")
    lines += _peer_lines(records)
    lines += ["", "Kernels per run:", ""]
    for r in records:
        if r.get("kernels"):
            who = "" if r["system"] == "nvl" else f" seq {r['seq']} ({_peer_what(r)})"
            lines.append(f"- {r['system']} {r['workload']} {r['method']}{who}: "
                         + "; ".join(f"{k}: {v}" for k, v in r["kernels"].items()))
    lines += ["", "Commands (a peer try's runs it again alone):", ""] + [f"- `{r['command']}`" for r in records]
    return "\n".join(lines) + "\n"


def _peer_variant(r: dict[str, Any]) -> dict[str, Any]:
    """A peer row's variant; rows recorded before the peer had variants ran every Mamba op in PyTorch at micro-batch
    1 without gradient checkpointing."""
    return r.get("variant") or {"mamba": "torch", "gradient_checkpointing": "off", "micro_batch_size": 1}


def _peer_what(r: dict[str, Any]) -> str:
    """What a peer try ran, in words: its micro-batch, what its Mamba ops ran (counted in the try, where recorded)
    and its gradient checkpointing."""
    v = _peer_variant(r)
    ran = r.get("mamba_ops_ran") or ("Mamba ops in PyTorch" if v["mamba"] == "torch" else f"{v['mamba']} (not run)")
    return (f"micro-batch {v['micro_batch_size']}, {ran}"
            + (", gradient checkpointing" if v["gradient_checkpointing"] == "on" else ""))


def _nvl_micro_batch(r: dict[str, Any]) -> int:
    return int((r.get("variant") or {}).get("train.micro_batch_size", 1))


def _peer_lines(records: list[dict[str, Any]]) -> list[str]:
    """The markdown's peer section: every try, then nvl against the peer at each side's best and at equal
    micro-batch (text, LoRA on the LM, rows of seq tokens, same run)."""
    peers = [r for r in records if r["system"] != "nvl"]
    if not peers:
        return []
    nvl = [r for r in records if r["system"] == "nvl" and r["workload"] == "text" and r["method"] == "lora"
           and r.get("tokens_per_s")]
    lines = ["", "The peer, transformers + PEFT LoRA (r 16 on q/k/v/o/up/down) on text rows of seq tokens, every "
             "try (each in a fresh process):", ""]
    for p in peers:
        tps = (f"{p['tokens_per_s']:,.0f} tokens/s" + (f", peak {p['peak_gb']} GB" if p.get("peak_gb") else "")
               if p.get("tokens_per_s") else p["status"])
        lines.append(f"- seq {p['seq']}, {_peer_what(p)}: {tps}")

    def best(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
        ok = [r for r in rows if r.get("tokens_per_s")]
        return max(ok, key=lambda r: r["tokens_per_s"]) if ok else None

    def versus(n: dict[str, Any], p: dict[str, Any]) -> str:
        var = ", ".join(f"{k}={_override_value(v)}" for k, v in (n.get("variant") or {}).items()) or "default"
        return (f"nvl {n['tokens_per_s']:,.0f} ({var}) vs transformers+PEFT {p['tokens_per_s']:,.0f} "
                f"({_peer_what(p)}) tokens/s = {n['tokens_per_s'] / p['tokens_per_s']:.2f}x; peak "
                f"{n.get('peak_gb') or '-'} vs {p.get('peak_gb') or '-'} GB")

    seqs = sorted({p["seq"] for p in peers} & {n["seq"] for n in nvl})
    if seqs:
        lines += ["", "At each side's best (the fastest row of each at that length):", ""]
    for seq in seqs:
        n, p = best([r for r in nvl if r["seq"] == seq]), best([r for r in peers if r["seq"] == seq])
        lines.append(f"- seq {seq}: " + (versus(n, p) if n and p else "the peer: no try fit"))
    pairs = sorted({(p["seq"], _peer_variant(p)["micro_batch_size"]) for p in peers}
                   & {(n["seq"], _nvl_micro_batch(n)) for n in nvl})
    if pairs:
        lines += ["", "At equal micro-batch (nvl's train.micro_batch_size = the peer's; each side's fastest):", ""]
    for seq, mb in pairs:
        n = best([r for r in nvl if r["seq"] == seq and _nvl_micro_batch(r) == mb])
        p = best([r for r in peers if r["seq"] == seq and _peer_variant(r)["micro_batch_size"] == mb])
        lines.append(f"- seq {seq}, micro-batch {mb}: " + (versus(n, p) if n and p else
                                                            "the peer: no try fit at this micro-batch"))
    return lines


README_BEGIN = ("<!-- finetune_gpu table: generated from bench/results/finetune_gpu.json by "
                "`python bench/finetune_gpu.py --readme` -->")
README_END = "<!-- end of finetune_gpu table -->"


def readme_table(records: list[dict[str, Any]]) -> str:
    """The README's table of `nvl finetune` throughput, from the records of one bench visit; the peer's rows say
    what it ran, its fastest try per length and micro-batch (or that none fit)."""
    what = {"text": "text", "cord": "CORD-like receipts (7 tiles)",
            "medpix": "MedPix-like (one ~300-token sample per sequence)",
            "video": "LLaVA-Video-like (10 frames)"}
    lines = ["| run (`nvl finetune`, seq, GPUs, overrides) | tokens/s | per GPU | MFU | peak GB | date |",
             "|---|---|---|---|---|---|"]
    for r in records:
        if r["system"] != "nvl":
            continue
        var = ", ".join(f"`{k}={_override_value(v)}`" for k, v in (r.get("variant") or {}).items())
        tps = f"{r['tokens_per_s']:,.0f}" if r["status"] == "ok" else r["status"]
        per = f"{r['tokens_per_s'] / r['gpus']:,.0f}" if r["status"] == "ok" else "-"
        mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "-"
        lines.append(f"| {'LoRA' if r['method'] == 'lora' else 'full FT'}, {what.get(r['workload'], r['workload'])}, "
                     f"{r['seq']}, {r['gpus']} (TP {r['tp']}){', ' + var if var else ''} | {tps} | {per} | {mfu} | "
                     f"{r.get('peak_gb') or '-'} | {r['date']} |")
    peers = [r for r in records if r["system"] != "nvl"]
    for seq, mb in sorted({(r["seq"], _peer_variant(r)["micro_batch_size"]) for r in peers}):
        tries = [r for r in peers if r["seq"] == seq and _peer_variant(r)["micro_batch_size"] == mb]
        ok = [r for r in tries if r.get("tokens_per_s")]
        if ok:
            r = max(ok, key=lambda r: r["tokens_per_s"])
            lines.append(f"| transformers + PEFT LoRA, text, {seq}, 1, {_peer_what(r)} | {r['tokens_per_s']:,.0f} | "
                         f"{r['tokens_per_s']:,.0f} | {r['mfu']:.1%} | {r.get('peak_gb') or '-'} | {r['date']} |")
        else:
            lines.append(f"| transformers + PEFT LoRA, text, {seq}, 1, micro-batch {mb}: {len(tries)} tries "
                         f"({', '.join(sorted({r['status'] for r in tries}))}) | - | - | - | - | {tries[0]['date']} |")
    return "\n".join(lines)


def write_readme(readme: Path, results: Path) -> None:
    text = readme.read_text()
    if README_BEGIN not in text or README_END not in text:
        raise SystemExit(f"{readme}: no generated-table markers ({README_BEGIN!r} ... {README_END!r})")
    head, rest = text.split(README_BEGIN, 1)
    _, tail = rest.split(README_END, 1)
    table = readme_table(json.loads(results.read_text()))
    readme.write_text(head + README_BEGIN + "\n" + table + "\n" + README_END + tail)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="12b-shape", help="toy size: tiny, small, 12b-shape")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--workloads", default="text,cord,medpix")
    ap.add_argument("--methods", default="lora", help="lora, full, or both (comma-separated)")
    ap.add_argument("--variants", default="",
                    help="extra override sets to run per workload, ';'-separated, each 'k=v,k=v' "
                         "(e.g. 'model.kernels=reference;model.recompute_granularity=selective')")
    ap.add_argument("--skip-default", action="store_true", help="measure only the --variants, not the defaults")
    ap.add_argument("--seq", default="4096", help="nvl's sequence length(s), comma-separated (the first is profiled)")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2, help="iterations left out of the averages")
    ap.add_argument("--gbs", type=int, default=4, help="global batch size (micro-batch 1)")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--nproc", type=int, default=None)
    ap.add_argument("--samples", type=int, default=64, help="samples per generated dataset")
    ap.add_argument("--videos", default=None, help="the video workload's video_root_path: a folder of clips made "
                    "by --make-videos (e.g. carried to the GPU machine as .whl/videos)")
    ap.add_argument("--peer-seqs", default="2048,4096", help="transformers+PEFT sequence lengths ('' = none)")
    ap.add_argument("--peer-steps", type=int, default=3)
    ap.add_argument("--peer-variants", default=",".join(PEER_VARIANTS),
                    help="the peer's Mamba ops, comma-separated: 'torch' (every Mamba op in PyTorch), 'mamba-ssm "
                         "triton' (mamba-ssm importable: its Triton chunk scan; see the docstring)")
    ap.add_argument("--peer-batches", default="1,2", help="the peer's micro-batches (rows of seq tokens per step)")
    ap.add_argument("--peer-checkpointing", default="auto", help="the peer's gradient checkpointing: off, on, "
                    "'off,on' (both), or auto (off, then on where off ran out of memory)")
    ap.add_argument("--peer-only", action="store_true", help="run only the peer tries: no `nvl finetune` run "
                    "(--workloads, --methods, --variants, --seq unused)")
    ap.add_argument("--run-timeout", type=int, default=900)
    ap.add_argument("--work", default=None, help="scratch directory (default: a temporary one)")
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--tag", default="", help="suffix of the result file names")
    ap.add_argument("--profile", default="text", help="workloads whose run --profile-variant also writes a per-op "
                    "profile of its last step and the host synchronisations of the one before (profile_<run>.txt, "
                    "profile_<run>_syncs.txt in --out, <run> with '_' for any character but letters, digits, "
                    "'.', '_', '-', named by the record's profile_file and profile_syncs_file; both left out of the "
                    "averages; CUDA only; '' = none)")
    ap.add_argument("--profile-variant", type=int, default=0, help="which run of a profiled workload: 0 = its "
                    "first (the default run, or with --skip-default the first variant), 1 = the next...")
    return ap.parse_args(argv)


def make_videos_main(argv: list[str]) -> int:
    """``--make-videos DIR [--count N] [--resolution PX] [--overwrite]``: the video workload's clips."""
    ap = argparse.ArgumentParser(prog="finetune_gpu.py --make-videos", description=write_video_clips.__doc__)
    ap.add_argument("dir", type=Path)
    ap.add_argument("--count", type=int, default=6)
    ap.add_argument("--resolution", type=int, default=512, help="frame width and height (the 12b model's tile: 512)")
    ap.add_argument("--overwrite", action="store_true")
    a = ap.parse_args(argv)
    paths = write_video_clips(a.dir, a.count, a.resolution, overwrite=a.overwrite)
    log(f"wrote {len(paths)} clips, {sum(p.stat().st_size for p in paths) / 1e3:,.0f} KB, under {a.dir / VIDEO_SUBDIR}")
    return 0


def _variants(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The --variants override sets, in order. A value in brackets is a list (``model.cuda_graph_scope=[mamba,mlp]``:
    its commas do not separate overrides), recorded as one in the row's ``variant``."""
    out = []
    for spec in args.variants.split(";"):
        if not spec.strip():
            continue
        parts, depth, cur = [], 0, ""
        for ch in spec:
            depth += {"[": 1, "]": -1}.get(ch, 0)
            if ch == "," and depth == 0:
                parts.append(cur)
                cur = ""
            else:
                cur += ch
        parts.append(cur)
        variant: dict[str, Any] = {}
        for kv in parts:
            k, v = kv.split("=", 1)
            v = v.strip()
            variant[k.strip()] = [x.strip() for x in v[1:-1].split(",") if x.strip()] if v.startswith("[") else v
        out.append(variant)
    return out


_PACKING_KEYS = ("dataset.packing", "dataset.enable_in_batch_packing")


def _unpacked_rows(records: list[dict[str, Any]], r: dict[str, Any]) -> list[dict[str, Any]]:
    """The unpacked rows a packed row ``r`` is measured against: same workload, method and seq, the same variant
    but for the packing keys and ``train.micro_batch_size`` (every micro-batch tried, OOMs included)."""
    drop = (*_PACKING_KEYS, "train.micro_batch_size")
    rest = {k: v for k, v in (r.get("variant") or {}).items() if k not in drop}
    return [b for b in records if b["system"] == "nvl" and b["workload"] == r["workload"]
            and b["method"] == r["method"] and b["seq"] == r["seq"]
            and not any(k in (b.get("variant") or {}) for k in _PACKING_KEYS)
            and {k: v for k, v in (b.get("variant") or {}).items() if k != "train.micro_batch_size"} == rest]


def _packing_line(r: dict[str, Any], unpacked: list[dict[str, Any]]) -> str:
    """The packing summary line: the packed row against the fastest unpacked micro-batch (the strongest baseline
    without packing), naming every micro-batch tried and those that ran out of memory."""
    head = f"- {r['workload']} {r['method']} seq {r['seq']}"
    mbs = {id(b): int((b.get("variant") or {}).get("train.micro_batch_size", 1)) for b in unpacked}
    ok = [b for b in unpacked if b.get("tokens_per_s")]
    tried = ", ".join(f"{mbs[id(b)]}: {b['tokens_per_s']:,.0f}" if b.get("tokens_per_s") else f"{mbs[id(b)]}: "
                      f"{b['status']}" for b in sorted(unpacked, key=lambda b: mbs[id(b)]))
    if not ok or not r.get("tokens_per_s"):
        return f"{head}: {r['status']} (unpacked micro-batches tried: {tried or 'none in this run'})"
    best = max(ok, key=lambda b: b["tokens_per_s"])
    return (f"{head}: {r['tokens_per_s']:,.0f} vs {best['tokens_per_s']:,.0f} tokens/s unpacked at its best "
            f"micro-batch ({mbs[id(best)]}) = {r['tokens_per_s'] / best['tokens_per_s']:.2f}x; "
            f"{r.get('samples_per_step', '?')} vs {best.get('samples_per_step', '?')} samples per iteration; "
            f"unpacked micro-batches tried (tokens/s): {tried}")


def _override_value(v: Any) -> str:
    """A variant's value as an override's (a list in YAML's flow form)."""
    return "[" + ",".join(str(x) for x in v) + "]" if isinstance(v, list) else str(v)


def check_graph_warmup(args: argparse.Namespace) -> None:
    """A CUDA-graph row's averages must leave out its eager warm-up steps and the capture: refuse a bench
    ``--warmup`` that would average them in (model.cuda_graph_warmup_steps, default 3, plus the capture's step)."""
    for v in _variants(args):
        if v.get("model.cuda_graph_impl", "none") != "none":
            graph_warmup = int(v.get("model.cuda_graph_warmup_steps", 3))
            if args.warmup < graph_warmup + 1:
                raise SystemExit(f"--warmup {args.warmup} would average in the eager steps of a CUDA-graph row "
                                 f"(model.cuda_graph_warmup_steps={graph_warmup}); pass --warmup {graph_warmup + 1} "
                                 "or more")


def _seqs(args: argparse.Namespace) -> list[int]:
    return [int(s) for s in str(args.seq).split(",") if s.strip()]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child":
        return child_main(argv[1:])
    if argv and argv[0] == "--peer-child":
        return peer_child_main(argv[1:])
    if argv and argv[0] == "--merge":
        # --merge OUT_STEM PART.json ...: one record (json + md) from several invocations of the same bench
        # visit (e.g. nvl at two lengths beside the peer, and the vision workloads), in the given order.
        stem, parts = Path(argv[1]), [Path(a) for a in argv[2:]]
        records = [r for part in parts for r in json.loads(part.read_text())]
        dates = sorted({r["date"] for r in records})
        machines = sorted({str(r.get("machine", "?")) for r in records})
        meta = {"date": ", ".join(dates), "machine": "; ".join(machines), "warmup": "the parts'"}
        stem.with_suffix(".json").write_text(json.dumps(records, indent=1) + "\n")
        stem.with_suffix(".md").write_text(markdown(records,
                                                    meta) + "\nMerged from: " + ", ".join(p.name for p in parts) + "\n")
        return 0
    if argv and argv[0] == "--make-videos":
        return make_videos_main(argv[1:])
    if argv and argv[0] == "--readme":
        write_readme(ROOT / "README.md", ROOT / "bench" / "results" / "finetune_gpu.json")
        return 0
    args = parse_args(argv)
    exit_on_sigterm()
    peer_plan(args)  # every peer key checked before anything runs
    if args.peer_only:
        args.workloads = ""
    import tempfile

    work = Path(args.work or tempfile.mkdtemp(prefix="nvl-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    workloads = [w for w in args.workloads.split(",") if w]
    bad = [w for w in workloads if w not in WORKLOADS]
    if bad:
        raise SystemExit(f"--workloads: unknown {bad}; choose from {WORKLOADS}")
    model_dir = write_model_dir(work / f"model-{args.size}", args.size)
    data: dict[str, Path] = {}
    if "cord" in workloads:
        data["cord"] = write_cord(work / "cord-v2", args.samples)
    if "medpix" in workloads:
        data["medpix"] = write_medpix(work / "MedPix-VQA", args.samples)
    if "video" in workloads:
        if not args.videos:
            raise SystemExit("--workloads video: pass --videos DIR, a folder of clips made by "
                             "`python bench/finetune_gpu.py --make-videos DIR`")
        data["video"] = write_llava_video(work / "LLaVA-Video-178K", args.samples, Path(args.videos))
    check_graph_warmup(args)
    variants: list[dict[str, Any]] = ([] if args.skip_default else [{}]) + _variants(args)
    machine = platform.node()
    try:
        import torch

        if args.device == "cuda" and torch.cuda.is_available():
            machine = f"{torch.cuda.device_count()}x {torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    except Exception:
        pass
    meta = {"date": _dt.date.today().isoformat(), "machine": machine, "warmup": args.warmup}
    records: list[dict[str, Any]] = []
    stem = safe_name("finetune_gpu" + (f"_{args.tag}" if args.tag else ""))

    def flush() -> None:
        for r in records:  # every record has every key; a failed run has null figures
            r.pop("_log", None)
            for key in ("tokens_per_s", "mfu", "peak_gb", "kernels"):
                r.setdefault(key, None)
            r.setdefault("machine", machine)
        (out / f"{stem}.json").write_text(json.dumps(records, indent=1) + "\n")
        (out / f"{stem}.md").write_text(markdown(records, meta))

    for method in [m for m in args.methods.split(",") if m and not args.peer_only]:
        for workload in workloads:
            for seq in _seqs(args):
                for variant in variants:
                    records.append(run_nvl(args, model_dir, data, workload, method, variant, work, seq))
                    flush()
    def emit(rec: dict[str, Any]) -> None:
        records.append(rec)
        flush()

    run_peers(args, work, emit)
    log(f"wrote {out / (stem + '.json')} and .md")
    return 0 if all(r["status"] in ("ok", "oom") for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
