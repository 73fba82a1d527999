"""``nvl quickstart``: the whole workflow, end to end, on a toy model, with no downloads.

A command of this plugin (the model's), since it needs a toy of this model; its LoRA steps need the
nvl-lora plugin, which it asks the registries for and names when it is missing.

Each step is the command a user would type (run as a subprocess and shown), except the accuracy
measurement, which uses the Python generation API the way an evaluation script would:

1. ``nvl toy-model``          write a tiny HF-format Nemotron Nano V2 VL checkpoint;
2. ``nvl convert import``     turn it into a Megatron-style checkpoint;
3. accuracy before training   greedy answers to held-out questions (exact match, ``nvl eval``'s code);
4. ``nvl finetune --lora-on-language-model`` on the built-in ``synthetic_shapes`` dataset;
5. ``nvl peft merge``         fold the adapters into the weights;
6. ``nvl convert export``     write the merged model as an HF directory;
7. accuracy after training, and with the images blanked (the model must look to answer);
8. ``nvl generate``           answer one question about a new picture.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click

#: The fine-tuning settings of the quickstart (a tiny model learns fast with a large learning rate).
FINETUNE_OVERRIDES: tuple[str, ...] = (
    "dataset.maker_name=synthetic_shapes",
    # Colour questions only: a two-layer toy ViT over 4x4 patches learns colours in a minute, shapes
    # take far longer. The answers stay balanced, so chance is 0.25.
    'dataset.maker_kwargs={"questions": ["color"]}',
    "train.global_batch_size=16",
    "train.micro_batch_size=16",
    "model.seq_length=128",
    "dataset.seq_length=128",
    "dataset.num_workers=1",
    "model.tensor_model_parallel_size=1",
    "optimizer.lr=2e-3",
    "optimizer.min_lr=2e-4",
    "scheduler.lr_warmup_iters=10",
    "logger.log_interval=10",
    # The toy's language model is random and frozen under --lora-on-language-model: its output layer
    # caps how confident answers can get and its Mamba mixers must carry the image's information to
    # the answer, so the quickstart adapts those too (a pretrained model needs neither).
    'peft.target_modules=["*language_model*.linear_qkv","*language_model*.linear_proj",'
    '"*language_model*.linear_fc1","*language_model*.linear_fc2","*language_model*.in_proj",'
    '"*language_model*.out_proj","*language_model*.output_layer"]',
)
QUESTION_PROMPT = "What color is the shape? Answer with one word."


def _step(n: int, total: int, text: str) -> None:
    click.secho(f"\n[{n}/{total}] {text}", bold=True, err=True)


def _run_nvl(args: Sequence[str], *, log: Path) -> None:
    """Run ``nvl ARGS`` as a user would, echoing the command and streaming its output."""
    cmd = [sys.executable, "-m", "nvlcore", *args]
    click.echo("$ nvl " + " ".join(shlex.quote(a) for a in args), err=True)
    env = dict(os.environ)
    env.setdefault("PYTHONWARNINGS", "ignore")
    with log.open("a") as fh:
        fh.write("$ nvl " + " ".join(shlex.quote(a) for a in args) + "\n")
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        assert proc.stdout is not None
        for line in proc.stdout:
            fh.write(line)
            click.echo("    " + line.rstrip("\n"), err=True)
        code = proc.wait()
    if code != 0:
        raise click.ClickException(f"`nvl {' '.join(args[:2])}` failed with exit status {code}; see {log}")


def load_generator(hf_dir: Path) -> Any:
    """A generator for ``hf_dir`` on the CPU, loaded as ``nvl generate`` and ``nvl eval`` load it
    (:func:`nvlcore.inference.load_generator`)."""
    from nvlcore.bridge import BridgeError, resolve_bridge
    from nvlcore.cli import current_plugin_manager
    from nvlcore.inference import load_generator as load

    manager = current_plugin_manager()
    try:
        bridge = resolve_bridge(hf_dir, manager=manager)
    except BridgeError as exc:
        raise click.ClickException(str(exc)) from None
    return load(bridge, device="cpu", manager=manager)


def eval_overrides(num_examples: int, *, blank_images: bool = False, seed: int = 0) -> list[str]:
    """The ``nvl eval`` overrides that select the quickstart's held-out questions."""
    kwargs = {"questions": ["color"], "num_examples": num_examples, "seed": seed}
    if blank_images:
        kwargs["blank_images"] = True
    return ["dataset.maker_name=synthetic_shapes", "dataset.maker_kwargs=" + json.dumps(kwargs), "--split", "test"]


def evaluate(generator: Any, *, num_examples: int, blank_images: bool = False, seed: int = 0,
             batch_size: int = 25) -> dict[str, Any]:
    """Exact-match accuracy of greedy answers on the held-out ``test`` split of ``synthetic_shapes``,
    computed by ``nvl eval``'s code (:func:`nvlcore.eval.evaluate_generator` with the maker's metrics):
    ``nvl eval --hf-model-path DIR`` with :func:`eval_overrides` gives the same number.

    :param generator: from :func:`load_generator`.
    :param num_examples: questions asked.
    :param blank_images: replace every image by a blank one (the control run).
    :param seed: the dataset's seed (the training run uses the same one; splits never overlap).
    :param batch_size: questions decoded together.
    """
    from nvlcore.builtin.synthetic_vqa import SyntheticShapes
    from nvlcore.eval import evaluate_generator, metrics_for

    data = SyntheticShapes(split="test", num_examples=num_examples, seed=seed, blank_images=blank_images,
                           questions=["color"])
    report = evaluate_generator(generator, data, metrics_for(SyntheticShapes), batch_size=batch_size,
                                system_prompt="/no_think")
    return {
        "accuracy": report.metrics["exact_match"],
        "samples": [{"question": r.question, "answer": r.reference, "predicted": r.prediction}
                    for r in report.records[:4]],
    }


def read_losses(metrics_file: Path) -> list[tuple[int, float]]:
    """``(iteration, loss)`` pairs from a run's ``metrics.jsonl``."""
    from nvlcore.plot import read_metrics

    return [(int(r["iteration"]), float(r["loss"])) for r in read_metrics(metrics_file) if "loss" in r]


def ascii_curve(points: Sequence[tuple[int, float]], *, width: int = 60, height: int = 12) -> str:
    """A loss curve drawn with characters, for the terminal."""
    if not points:
        return "(no losses logged)"
    xs = [p[0] for p in points]
    ys = [p[1] for p in points]
    lo, hi = min(ys), max(ys)
    span = (hi - lo) or 1.0
    grid = [[" "] * width for _ in range(height)]
    x0, x1 = min(xs), max(xs)
    for x, y in points:
        col = 0 if x1 == x0 else round((x - x0) / (x1 - x0) * (width - 1))
        row = round((hi - y) / span * (height - 1))
        grid[row][col] = "*"
    lines = []
    for r, cells in enumerate(grid):
        label = f"{hi - r * span / (height - 1):7.3f} |" if r in (0, height - 1) else "        |"
        lines.append(label + "".join(cells))
    lines.append("        +" + "-" * width)
    lines.append(f"         iteration {x0}" + " " * max(1, width - 22 - len(str(x1))) + f"{x1}")
    return "\n".join(lines)


def save_curve_png(points: Sequence[tuple[int, float]], path: Path, *, size: tuple[int, int] = (640, 400),
                   metrics: Path | None = None) -> None:
    """Save the training curves as a PNG: with ``metrics`` (a metrics.jsonl) and matplotlib installed,
    :func:`nvlcore.plot.plot_metrics` draws loss, LR, grad norm and tokens/s with axis titles; otherwise
    the loss curve of ``points`` is drawn with PIL (no plotting library needed)."""
    if metrics is not None:
        from nvlcore.plot import PlotUnavailable, plot_metrics

        try:
            plot_metrics(metrics, path, title="nvl quickstart: LoRA fine-tuning of the toy model")
            return
        except PlotUnavailable:
            pass
    from PIL import Image, ImageDraw

    w, h = size
    margin = 50
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    draw.rectangle((margin, margin // 2, w - margin // 2, h - margin), outline="black")
    draw.text((margin, 5), "nvl quickstart: training loss", fill="black")
    if points:
        xs = [p[0] for p in points]
        ys = [p[1] for p in points]
        x0, x1 = min(xs), max(xs)
        lo, hi = min(ys), max(ys)
        span = (hi - lo) or 1.0

        def pos(x: float, y: float) -> tuple[float, float]:
            px = margin + (0 if x1 == x0 else (x - x0) / (x1 - x0)) * (w - 1.5 * margin)
            py = margin // 2 + (hi - y) / span * (h - 1.5 * margin)
            return px, py

        draw.line([pos(x, y) for x, y in points], fill=(30, 70, 225), width=2)
        draw.text((5, margin // 2), f"{hi:.2f}", fill="black")
        draw.text((5, h - margin - 10), f"{lo:.2f}", fill="black")
        draw.text((margin, h - margin + 5), f"iteration {x0}", fill="black")
        draw.text((w - margin - 40, h - margin + 5), f"{x1}", fill="black")
    tmp = path.with_suffix(".tmp.png")
    img.save(tmp)
    tmp.replace(path)


@click.command("quickstart")
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), default=Path("nvl-quickstart"),
              show_default=True, help="Where the toy model, checkpoints and plots go.")
@click.option("--overwrite", is_flag=True, help="Delete an existing work directory first.")
@click.option("--train-iters", type=click.IntRange(min=1), default=300, show_default=True,
              help="Fine-tuning iterations (global batch 16).")
@click.option("--eval-examples", type=click.IntRange(min=1), default=100, show_default=True,
              help="Held-out questions asked before and after training.")
@click.option("--json", "as_json", is_flag=True,
              help="End with one JSON line: accuracy_before, accuracy_after, accuracy_after_blind, seconds.")
def quickstart(workdir: Path, overwrite: bool, train_iters: int, eval_examples: int, as_json: bool) -> None:
    """Run the whole workflow on a toy model in a few minutes on a CPU, with no downloads.

    Writes a toy checkpoint, imports it, fine-tunes it with LoRA on a built-in visual question
    answering task (coloured shapes it draws itself), merges the adapter, exports to HF and answers a
    question with `nvl generate`; prints the loss curve and the held-out accuracy before and after.
    """
    import shutil

    started = time.perf_counter()
    from nvlcore.cli import current_plugin_manager

    manager = current_plugin_manager()
    if "lora" not in manager.registry("peft_method"):
        raise click.ClickException("the quickstart fine-tunes with LoRA: it needs the nvl-lora plugin "
                                   "(pip install -e plugins/nvl-lora; `nvl plugins list` shows what is installed)")
    if workdir.exists() and any(workdir.iterdir()):
        if not overwrite:
            raise click.ClickException(f"{workdir} exists and is not empty; pass --overwrite or choose --workdir")
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    w = workdir.resolve()
    log = w / "quickstart.log"
    total = 8

    _step(1, total, "Write a toy Nemotron Nano V2 VL checkpoint (HF format, random weights)")
    _run_nvl(["toy-model", str(w / "toy"), "--size", "tiny", "--seed", "0"], log=log)

    _step(2, total, "Import it into a Megatron-style checkpoint")
    _run_nvl(["convert", "import", "--hf-model", str(w / "toy"), "--megatron-path", str(w / "base")], log=log)

    _step(3, total, f"Accuracy before fine-tuning ({eval_examples} held-out questions, exact match)")
    before = evaluate(load_generator(w / "toy"), num_examples=eval_examples)
    click.echo(f"    accuracy before: {before['accuracy']:.2f}  (chance: 0.25)", err=True)
    click.echo("    (the same as: nvl eval --hf-model-path " + shlex.quote(str(w / "toy")) + " "
               + " ".join(shlex.quote(a) for a in eval_overrides(eval_examples)) + ")", err=True)

    _step(4, total, "Fine-tune with LoRA on the language model (vision tower and projector trained fully)")
    _run_nvl(["finetune", "--hf-model-path", str(w / "toy"), "--pretrained-checkpoint", str(w / "base"),
              "--lora-on-language-model", f"checkpoint.save={w / 'lora'}", f"train.train_iters={train_iters}",
              f"checkpoint.save_interval={train_iters}", *FINETUNE_OVERRIDES], log=log)
    points = read_losses(w / "lora" / "metrics.jsonl")
    click.echo(ascii_curve(points), err=True)
    save_curve_png(points, w / "loss_curve.png", metrics=w / "lora" / "metrics.jsonl")
    click.echo(f"    loss curve saved to {w / 'loss_curve.png'}", err=True)

    _step(5, total, "Merge the LoRA adapter into the weights")
    _run_nvl(["peft", "merge", "--hf-model-path", str(w / "toy"), "--lora-checkpoint", str(w / "lora"),
              "--output", str(w / "merged")], log=log)

    _step(6, total, "Export the merged model to HF format")
    _run_nvl(["convert", "export", "--hf-model", str(w / "toy"), "--megatron-path", str(w / "merged"),
              "--hf-path", str(w / "hf")], log=log)

    _step(7, total, "Accuracy after fine-tuning (the exported HF model), and with the images blanked")
    trained = load_generator(w / "hf")  # loaded once for both evaluations
    after = evaluate(trained, num_examples=eval_examples)
    blind = evaluate(trained, num_examples=eval_examples, blank_images=True)
    for s in after["samples"]:
        click.echo(f"    Q: {s['question']}  expected {s['answer']!r}, answered {s['predicted']!r}", err=True)

    _step(8, total, "Answer one question about a new picture with `nvl generate`")
    import random

    from nvlcore.builtin.synthetic_vqa import draw_shape

    draw_shape("circle", "blue", size=64, rng=random.Random(7)).save(w / "question.png")
    _run_nvl(["generate", "--hf-model-path", str(w / "hf"), "--image-path", str(w / "question.png"),
              "--prompt", QUESTION_PROMPT, "--max-new-tokens", "8"], log=log)

    seconds = time.perf_counter() - started
    click.secho("\nSummary", bold=True, err=True)
    click.echo(f"  held-out accuracy before fine-tuning: {before['accuracy']:.2f}", err=True)
    click.echo(f"  held-out accuracy after fine-tuning:  {after['accuracy']:.2f}", err=True)
    click.echo(f"  after, with blank images:             {blind['accuracy']:.2f} (chance 0.25)", err=True)
    click.echo(f"  {seconds:.0f} s; everything is in {w}", err=True)
    if as_json:
        click.echo(json.dumps({"accuracy_before": before["accuracy"], "accuracy_after": after["accuracy"],
                               "accuracy_after_blind": blind["accuracy"], "seconds": round(seconds, 1),
                               "workdir": str(w)}))
