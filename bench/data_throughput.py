"""Processed samples per second of the Nemotron VL processor on this machine's CPUs.

Two samples, at the real tile geometry (512-pixel tiles, patch 16, ratio 0.5: 256 tokens per tile)
with the toy tokenizer (the real one has the same control tokens; tokenizing a short prompt is a
small part of the cost):

* image: a 1920x1080 JPEG file (decoded each time, as a dataset row's image would be) -> 9 tiles;
* video: a 10-second 640x360 30-fps mp4 (written with PyAV) -> 10 frames decoded with decord.

Each is measured in the main process and through a ``torch.utils.data.DataLoader`` with 1 and 2
workers (batch size 1, the processor's ``collate``), as training feeds the model. The result is
printed and written as markdown to ``--out`` with the date, the machine and its load.

    python bench/data_throughput.py --out bench/results/data_throughput_$(date +%F).md
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


def make_inputs(root: Path) -> tuple[Path, Path, Path]:
    """A model dir (config.json + toy tokenizer), a 1920x1080 JPEG and a 10 s mp4."""
    import sys

    import numpy as np
    from PIL import Image

    from nvl_nemotron_vl.toy_tokenizer import write_toy_tokenizer

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "support"))  # the tests' support
    from nvl_data_testing import write_test_video

    model = root / "model"
    ids = write_toy_tokenizer(model)
    (model / "config.json").write_text(json.dumps({
        "architectures": ["NemotronH_Nano_VL_V2"], "force_image_size": 512, "patch_size": 16,
        "downsample_ratio": 0.5, "img_context_token_id": ids["<image>"], "video_context_token_id": ids["<video>"],
    }))
    rng = np.random.default_rng(0)
    # Smooth gradients plus noise: a JPEG of realistic size (flat images decode unrealistically fast).
    y, x = np.mgrid[0:1080, 0:1920]
    base = np.stack([x * 255 // 1919, y * 255 // 1079, (x + y) * 255 // 2998], axis=-1)
    pixels = np.clip(base + rng.integers(-20, 20, base.shape), 0, 255).astype(np.uint8)
    image = root / "image.jpg"
    Image.fromarray(pixels).save(image, quality=90)
    video = write_test_video(root / "clip.mp4", num_frames=300, fps=30, width=640, height=360)
    return model, image, video


class Repeat:
    """A map-style dataset returning the same conversation ``n`` times."""

    def __init__(self, conversation: dict[str, Any], n: int) -> None:
        self.conversation, self.n = conversation, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.conversation


class Process:
    """DataLoader collate: process then collate (picklable, like the trainer's)."""

    def __init__(self, processor: Any) -> None:
        self.processor = processor

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        return self.processor.collate([self.processor(r) for r in rows])


def measure(processor: Any, conversation: dict[str, Any], workers: int, seconds: float) -> tuple[float, int]:
    """Samples per second over at least ``seconds`` (after warm-up), and how many were timed."""
    import torch

    if workers == 0:
        processor(conversation)  # warm-up (tokenizer load, decoder init)
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds or n < 3:
            processor(conversation)
            n += 1
        return n / (time.perf_counter() - start), n
    # Workers are started (and warmed) before timing.
    loader = torch.utils.data.DataLoader(
        Repeat(conversation, 100_000), batch_size=1, num_workers=workers, collate_fn=Process(processor),
        prefetch_factor=2, persistent_workers=False,
    )
    it = iter(loader)
    for _ in range(workers * 2):
        next(it)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or n < 3 * workers:
        next(it)
        n += 1
    rate = n / (time.perf_counter() - start)
    del it  # shuts the workers down
    return rate, n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="write a markdown record here")
    parser.add_argument("--seconds", type=float, default=10.0, help="timed seconds per measurement")
    parser.add_argument("--workers", default="0,1,2",
                        help="comma-separated DataLoader worker counts (0 = main process)")
    parser.add_argument("--note", default="", help="free text added to the record (e.g. what else ran)")
    args = parser.parse_args()

    import torch

    from nvl_nemotron_vl.processor import NemotronVLProcessor

    workers = [int(w) for w in args.workers.split(",")]
    load_before = load_average()
    with tempfile.TemporaryDirectory(prefix="nvl-data-bench-") as tmp:
        model, image, video = make_inputs(Path(tmp))
        processor = NemotronVLProcessor.from_hf_dir(model)
        cases = {
            "image 1920x1080 (9 tiles)": {"conversation": [
                {"role": "user",
                 "content": [{"type": "image", "image": str(image)}, {"type": "text", "text": "Describe this image."}]},
                {"role": "assistant", "content": "A colourful gradient with noise."}]},
            "video 10 frames (640x360, 10 s)": {"conversation": [
                {"role": "user",
                 "content": [{"type": "video", "path": str(video)}, {"type": "text", "text": "What happens?"}]},
                {"role": "assistant", "content": "The picture gets brighter."}]},
        }
        check = {name: processor(conv) for name, conv in cases.items()}
        assert check["image 1920x1080 (9 tiles)"]["num_tiles"] == [9]
        assert check["video 10 frames (640x360, 10 s)"]["num_frames"] == [10]
        rows = []
        for name, conv in cases.items():
            tokens = int(check[name]["input_ids"].numel())
            for w in workers:
                rate, n = measure(processor, conv, w, args.seconds)
                where = "main process" if w == 0 else f"DataLoader, {w} worker{'s' if w > 1 else ''}"
                rows.append((name, where, rate, n, tokens))
                print(f"{name:34s} {where:24s} {rate:7.2f} samples/s  ({n} samples, {tokens} tokens each)", flush=True)

    now = dt.datetime.now(dt.timezone.utc)
    lines = [
        f"# Data throughput: Nemotron VL processor ({now:%Y-%m-%d})",
        "",
        f"- date: {now:%Y-%m-%d %H:%M} UTC",
        f"- machine: {os.cpu_count()} CPUs (`nproc`), {cpu_model()}; Python {platform.python_version()}, "
        f"torch {torch.__version__} ({torch.get_num_threads()} intra-op threads in the main process)",
        f"- load average (1, 5, 15 min) before the run: {load_before}; after: {load_average()}",
        f"- command: `python bench/data_throughput.py --seconds {args.seconds:g} --workers {args.workers}`",
        "",
        "| sample | where | samples/s | timed samples | tokens per sample |",
        "|---|---|---:|---:|---:|",
    ]
    lines += [f"| {name} | {where} | {rate:.2f} | {n} | {tokens} |" for name, where, rate, n, tokens in rows]
    if args.note:
        lines += ["", args.note]
    lines += [""]
    text = "\n".join(lines)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
