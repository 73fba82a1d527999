"""``nvl data``: look at what a dataset maker produces and what the model will see of it."""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import click

from nvlcore.cli.options import model_options


@click.group("data")
def data_group() -> None:
    """Inspect datasets (dataset makers and the model's processor)."""


def _parse_kwargs(text: str | None) -> dict[str, Any]:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"not valid JSON: {exc}", param_hint="--maker-kwargs") from exc
    if not isinstance(value, dict):
        raise click.BadParameter("must be a JSON object, e.g. '{\"path\": \"/data/raven\"}'",
                                 param_hint="--maker-kwargs")
    return value


def _make_dataset(name: str, split: str, kwargs: dict[str, Any]) -> tuple[str, Any]:
    from nvlcore.cli import current_plugin_manager
    from nvlcore.config import ConfigError, build, maker_kwargs_schema
    from nvlcore.registry import RegistryError

    registry = current_plugin_manager().registry("dataset_maker")
    try:
        entry = registry.entry(name)
        maker = entry.load()
    except RegistryError as exc:
        raise click.UsageError(str(exc)) from exc
    except Exception as exc:  # the plugin's module itself is broken
        raise click.ClickException(f"dataset maker {name!r} cannot be imported: {type(exc).__name__}: {exc}") from exc
    schema = maker_kwargs_schema(maker)
    if schema is not None:
        try:
            kwargs, _ = build(schema, kwargs, "--maker-kwargs", missing_required="error", instantiate=False)
        except ConfigError as exc:
            raise click.UsageError(f"{entry.name}: {exc}") from exc
    splits = getattr(maker, "splits", None)
    if splits and split not in splits:
        raise click.UsageError(f"{entry.name} has splits {', '.join(splits)}; got --split {split!r}")
    try:
        return entry.name, maker(split=split, **kwargs)
    except (TypeError, ValueError, OSError) as exc:
        raise click.ClickException(str(exc)) from exc


def _bridge_processor(hf_dir: Path, **options: Any) -> Any:
    """The processor of the bridge that handles ``hf_dir`` (:func:`nvlcore.bridge.resolve_bridge`)."""
    from nvlcore.bridge import BridgeError, resolve_bridge
    from nvlcore.cli import current_plugin_manager

    if not (Path(hf_dir) / "config.json").is_file():
        raise click.BadParameter(f"{hf_dir} has no config.json; is it an HF model directory?",
                                 param_hint="--hf-model-path")
    try:
        bridge = resolve_bridge(hf_dir, manager=current_plugin_manager())
    except BridgeError as exc:
        raise click.ClickException(str(exc)) from None
    try:
        return bridge.processor(**options)
    except (ValueError, OSError, TypeError, KeyError) as exc:
        raise click.ClickException(f"bridge {bridge.name!r} cannot read {hf_dir}: {exc}") from exc


def _conversation_summary(conversation: Mapping[str, Any]) -> dict[str, Any]:
    turns = conversation["conversation"]
    items = [i for t in turns if not isinstance(t["content"], str) for i in t["content"]]
    targets = []
    for t in turns:
        if t["role"] == "assistant":
            content = t["content"]
            targets.append(content.strip() if isinstance(content, str) else "".join(
                i["text"] for i in content if i["type"] == "text").strip())
    return {
        "num_images": sum(i["type"] == "image" for i in items),
        "num_videos": sum(i["type"] == "video" for i in items),
        "target": "\n".join(targets),
    }


def _describe_item(item: Mapping[str, Any]) -> str:
    if item["type"] == "text":
        return item["text"]
    if item["type"] == "image":
        image = item["image"]
        if hasattr(image, "size"):
            return f"[image {image.size[0]}x{image.size[1]}]"
        return f"[image {image}]"
    if "path" in item:
        return f"[video {item['path']}]"
    return f"[video {len(item['video'])} frames]"


@data_group.command("preview")
@click.argument("maker")
@click.option("--maker-kwargs", "maker_kwargs", metavar="JSON", help="dataset.maker_kwargs as a JSON object.")
@click.option("--split", default="train", show_default=True, help="Split to read.")
@click.option("-n", "--num-examples", "num", type=click.IntRange(min=1), default=3, show_default=True,
              help="How many examples to show.")
@model_options(help="Model: also show what its processor makes of each example.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per example and line.")
@click.option("--packing", type=click.Choice(["first_fit", "best_fit"]), is_flag=False, flag_value="best_fit",
              default=None,
              help="Show how the examples pack into rows (dataset.packing; alone: best_fit); -n counts rows.")
@click.option("--seq-length", type=click.IntRange(min=1), default=4096, show_default=True,
              help="With --packing: the row length (dataset.seq_length).")
@click.option("--packing-buffer-size", type=click.IntRange(min=1), default=128, show_default=True,
              help="With --packing: samples per packing window (dataset.packing_buffer_size).")
def preview_cmd(maker: str, maker_kwargs: str | None, split: str, num: int, hf_model_path: Path | None,
                revision: str | None, as_json: bool, packing: str | None, seq_length: int,
                packing_buffer_size: int) -> None:
    """Show the first examples of dataset maker MAKER (a name or alias).

    With --hf-model-path, each example also goes through the model's processor: the rendered
    sequence (each tile's context tokens shown as one marker), tiles per image, frames, token
    count and supervised-token count. --json prints the keys num_images, tiles_per_image,
    num_frames, num_tokens, num_supervised_tokens, prompt, target (null where a value needs
    the model directory).
    """
    kwargs = _parse_kwargs(maker_kwargs)
    if packing is not None and hf_model_path is None:
        raise click.UsageError("--packing needs --hf-model-path (the model's processor counts each example's tokens)")
    name, dataset = _make_dataset(maker, split, kwargs)
    if packing is not None:
        _preview_packing(name, split, dataset, _bridge_processor(hf_model_path, seq_length=seq_length), mode=packing,
                         seq_length=seq_length, window=packing_buffer_size, num_rows=num, as_json=as_json)
        return
    processor = _bridge_processor(hf_model_path) if hf_model_path is not None else None
    total = len(dataset)
    skipped = getattr(dataset, "num_skipped", None)
    if not as_json:
        header = f"{name}/{split}: {total} examples"
        if skipped:
            header += f" ({skipped} rows skipped: " + ", ".join(f"{n} {why}" for why,
                                                                n in dataset.skipped.most_common()) + ")"
        click.echo(header)
    failures = 0
    row_of = getattr(dataset, "row_index", None)
    for index in range(min(num, total)):
        row = row_of(index) if row_of else index
        where = f"row {row} of {name}/{split}"
        record: dict[str, Any] = {"index": index, "row": row}
        try:
            conversation = dataset[index]
            summary = _conversation_summary(conversation)
            record.update(num_images=summary["num_images"], tiles_per_image=None, num_frames=None, num_tokens=None,
                          num_supervised_tokens=None, prompt=None, target=summary["target"])
            if processor is not None:
                if hasattr(processor, "preview"):
                    record.update(processor.preview(conversation, where=where))
                else:
                    sample = processor(conversation, where=where)
                    record.update(num_tokens=int(sample["input_ids"].numel()),
                                  num_supervised_tokens=int(sample["loss_mask"].sum()))
        except Exception as exc:  # show the failing example and keep going; exit status says it failed
            failures += 1
            record["error"] = f"{type(exc).__name__}: {exc}"
            if not as_json:
                click.echo(f"\n--- example {index} ({where}) ---\nERROR: {record['error']}")
            else:
                click.echo(json.dumps(record, ensure_ascii=False))
            continue
        if as_json:
            click.echo(json.dumps(record, ensure_ascii=False))
            continue
        click.echo(f"\n--- example {index} ({where}) ---")
        for turn in conversation["conversation"]:
            content = turn["content"]
            text = content if isinstance(content, str) else " ".join(_describe_item(i) for i in content)
            click.echo(f"{turn['role']}: {text}")
        if processor is not None:
            tiles = ", ".join(str(t) for t in record.get("tiles_per_image") or []) or "-"
            click.echo(
                f"[{record['num_tokens']} tokens, {record['num_supervised_tokens']} supervised; "
                f"tiles per image: {tiles}; frames: {record['num_frames']}]"
            )
            click.echo(record["prompt"], nl=False)
            if not str(record["prompt"]).endswith("\n"):
                click.echo()
    if failures:
        click.echo(f"{failures} of {min(num, total)} examples failed", err=True)
        sys.exit(1)


def _preview_packing(name: str, split: str, dataset: Any, processor: Any, *, mode: str, seq_length: int, window: int,
                     num_rows: int, as_json: bool) -> None:
    """Pack the split's examples in order, a window of ``window`` at a time, as training does
    (:mod:`nvlcore.training.packing`), and show the first ``num_rows`` rows and the fill ratio."""
    from nvlcore.training.packing import pack_lengths

    total = len(dataset)
    if not as_json:
        click.echo(f"{name}/{split}: {total} examples; packing {mode} into rows of {seq_length} tokens, "
                   f"windows of {window} examples (in split order)")
    row_of = getattr(dataset, "row_index", None)
    failures = 0
    shown = 0
    rows_total = samples_total = tokens_total = 0
    for w, start in enumerate(range(0, total, window)):
        if shown >= num_rows:
            break
        indices, lengths = [], []
        for index in range(start, min(start + window, total)):
            row = row_of(index) if row_of else index
            where = f"row {row} of {name}/{split}"
            try:
                sample = processor(dataset[index], where=where)
            except Exception as exc:  # shown, left out of the packing; the exit status says so
                failures += 1
                from nvlcore.cli.errors import one_line

                msg = one_line(exc)
                click.echo(json.dumps({"index": index, "row": row, "error": msg}) if as_json
                           else f"example {index} ({where}): ERROR: {msg}")
                continue
            indices.append(index)
            lengths.append(int(sample["input_ids"].numel()))
        try:
            bins = pack_lengths(lengths, seq_length, mode)
        except ValueError as exc:
            raise click.ClickException(f"{name}/{split}: {exc}") from exc
        for b in bins:
            n_tok = sum(lengths[i] for i in b)
            rows_total += 1
            samples_total += len(b)
            tokens_total += n_tok
            if shown >= num_rows:
                continue
            record = {"row": shown, "window": w, "examples": [indices[i] for i in b],
                      "lengths": [lengths[i] for i in b],
                      "num_samples": len(b), "num_tokens": n_tok, "fill": n_tok / seq_length}
            shown += 1
            if as_json:
                click.echo(json.dumps(record))
            else:
                click.echo(f"row {record['row']}: {len(b)} samples (examples "
                           f"{', '.join(map(str, record['examples']))}; "
                           f"tokens {' + '.join(map(str, record['lengths']))} = {n_tok}), fill {record['fill']:.1%}")
    if rows_total:
        summary = {"examples": samples_total, "rows": rows_total, "samples_per_row": samples_total / rows_total,
                   "fill": tokens_total / (rows_total * seq_length),
                   "fill_unpacked": tokens_total / (samples_total * seq_length)}
        if as_json:
            click.echo(json.dumps({"summary": summary}))
        else:
            click.echo(f"{samples_total} examples in {rows_total} rows (the windows shown): "
                       f"{summary['samples_per_row']:.2f} samples per row, fill {summary['fill']:.1%} "
                       f"(one example per row: {summary['fill_unpacked']:.1%})")
    if failures:
        click.echo(f"{failures} examples failed", err=True)
        sys.exit(1)
