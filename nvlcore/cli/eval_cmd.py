"""``nvl eval``: answer a dataset split with a model and score the answers with the dataset maker's
metrics (or score an existing predictions file without a model). See docs/eval.md.

``--nproc-per-node N`` starts N workers through ``torch.distributed.run``; each answers its share of
the split (data parallel, or ``N / --tp`` shares with tensor parallelism) and rank 0 gathers, scores
and writes.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click

from nvlcore.cli.generate import resolve_bridge, sampling_params
from nvlcore.cli.options import CONFIG_CONTEXT_SETTINGS, config_options, model_options
from nvlcore.cli.plugin_options import PluginOptionsCommand

MODULE = "nvlcore.cli.eval_cmd"
DEFAULT_SPLITS = ("test", "validation")


def resolve_split(maker: Any, split: str | None, maker_name: str) -> str:
    """``--split``, or the maker's test split, else its validation split, else its only split."""
    splits = tuple(getattr(maker, "splits", ()) or ())
    if split is not None:
        return split  # the maker refuses unknown splits with its own message
    for s in DEFAULT_SPLITS:
        if s in splits:
            return s
    if splits:
        return splits[0]
    raise click.UsageError(f"dataset maker {maker_name!r} declares no splits; pass --split")


def split_maker_kwargs(cfg: Any, split: str) -> dict[str, Any]:
    """``dataset.maker_kwargs`` with ``val_maker_kwargs``/``test_maker_kwargs`` merged for that split."""
    kwargs = dict(cfg.dataset.maker_kwargs)
    if split == "validation":
        kwargs.update(cfg.dataset.val_maker_kwargs)
    elif split == "test":
        kwargs.update(cfg.dataset.test_maker_kwargs)
    return kwargs


def _child_argv(params: dict[str, Any], overrides: Sequence[str]) -> list[str]:
    argv: list[str] = []
    for name, value in params.items():
        # the model option is already a local directory: its --revision is spent
        if name in ("nproc_per_node", "config_files", "revision") or value is None or value is False:
            continue
        flag = "--" + name.replace("_", "-")
        if name == "as_json":
            flag = "--json"
        elif name == "bridge_name":
            flag = "--bridge"
        argv += [flag] if value is True else [flag, str(value)]
    for f in params.get("config_files") or ():
        argv += ["--config-file", str(f)]
    return argv + list(overrides)


@click.command("eval", cls=PluginOptionsCommand,
               context_settings={**CONFIG_CONTEXT_SETTINGS, "help_option_names": ["-h", "--help"]})
@model_options(help="HF model: config, tokenizer (and the weights when no Megatron path is given).")
@click.option("--megatron-model-path", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Megatron-style checkpoint (base dir or iter_N dir) whose weights to use.")
@click.option("--adapter-checkpoint", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="A PEFT run's checkpoint (`peft.method` set): its adapters are merged in memory into the base "
              "weights.")
@click.option("--endpoint", default=None, metavar="URL",
              help="Answer through this OpenAI-compatible server (nvl serve, vLLM: http://HOST:PORT/v1) instead of "
              "loading a model; --batch-size requests in flight.")
@click.option("--endpoint-model", default=None, metavar="NAME",
              help="The model to ask the endpoint for (default: the first one it lists).")
@click.option("--predictions", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Score this JSON-lines file (prediction, reference per line) instead of generating.")
@click.option("--split", default=None,
              help="Dataset split (default: test, else validation, else the maker's only split).")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Evaluate only the first N examples.")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True,
              help="Prompts decoded together (batched by length).")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=None,
              help="Generation budget per answer (default: the metrics' own, e.g. 768 for CORD-v2).")
@click.option("--system-prompt", default="/no_think", show_default=True,
              help="System turn added to conversations without one; '' for none.")
@click.option("--temperature", default=0.0, show_default=True, type=click.FloatRange(min=0.0), help="0 = greedy.")
@click.option("--top-p", default=1.0, show_default=True, type=click.FloatRange(0.0, 1.0, min_open=True))
@click.option("--top-k", default=0, show_default=True, type=click.IntRange(min=0), help="0 = off.")
@click.option("--seed", default=None, type=int, help="Seed of the sampling generator.")
@click.option("--tp", default=1, show_default=True, type=click.IntRange(min=1), help="Tensor-parallel size.")
@click.option("--nproc-per-node", type=click.IntRange(min=1), default=None,
              help="Start this many worker processes; the split is sharded over the data-parallel ranks.")
@click.option("--device", default=None, help="cuda, cuda:N or cpu (default: cuda when available).")
@click.option("--dtype", type=click.Choice(["bfloat16", "float16", "float32"]), default=None,
              help="Weights dtype (default: bfloat16 on GPU, float32 on CPU).")
@click.option("--bridge", "bridge_name", default=None, help="Model bridge name (default: from config.json).")
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write one JSON line per sample: id, prediction, reference, scores.")
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON object (metrics, num_samples, tokens_per_s, seconds) instead of the table.")
@config_options(print_config=False)
def eval_command(**params: Any) -> None:
    """Answer a dataset split with a model and score the answers.

    The metrics belong to the dataset maker (CORD-v2: tree-edit-distance accuracy and field F1;
    Raven: option accuracy; MedPix: exact match, token F1, ROUGE-L; ...), with exact match and token
    F1 for makers without their own. OVERRIDES select the data like `nvl finetune`'s:

    \b
      nvl eval --hf-model-path HF dataset.maker_name=cord_v2 --limit 100 --output preds.jsonl
      nvl eval --hf-model-path HF --adapter-checkpoint runs/peft dataset.maker_name=medpix --json
      nvl eval --predictions preds.jsonl dataset.maker_name=cord_v2      # no model: score a file
      nvl eval --endpoint http://127.0.0.1:8000/v1 dataset.maker_name=cord_v2   # a server answers
    """
    from nvlcore.cli import current_plugin_manager
    from nvlcore.cli.options import load_config_from_cli
    from nvlcore.eval.metrics import metrics_for
    from nvlcore.eval.runner import EvalError

    overrides = list(params.pop("overrides"))
    config_files = params["config_files"]
    manager = current_plugin_manager()
    cfg = load_config_from_cli(config_files, overrides, plugins=manager)
    maker_name = cfg.dataset.maker_name
    try:
        maker = manager.registry("dataset_maker").get(maker_name)
    except Exception as exc:
        raise click.UsageError(f"dataset.maker_name={maker_name!r}: {exc}") from None
    try:
        metrics = metrics_for(maker)
    except Exception as exc:
        raise click.ClickException(str(exc)) from None

    if params["predictions"] is not None:
        if params["hf_model_path"] or params["megatron_model_path"] or params["adapter_checkpoint"] \
                or params["endpoint"]:
            raise click.UsageError("--predictions scores a file without a model: drop the model paths and --endpoint")
        _score_file(params, metrics, maker_name)
        return
    if params["temperature"] == 0.0 and (params["top_p"] != 1.0 or params["top_k"] != 0):
        raise click.UsageError("--top-p/--top-k only apply when sampling: also give --temperature > 0")
    if params["endpoint"] is not None:
        _refuse_model_options(params)
        _run_endpoint(params, cfg, maker, metrics, maker_name, resolve_split(maker, params["split"], maker_name))
        return
    if params["endpoint_model"] is not None:
        raise click.UsageError("--endpoint-model names a server's model: also give --endpoint URL")
    if params["hf_model_path"] is None:
        raise click.UsageError("--hf-model-path DIR is required (a directory or a Hub id; or --predictions FILE to "
                               "score a file, or --endpoint URL to ask a server)")

    from nvlcore.parallel import build_launch_args, launch, launched_by_torchrun

    nproc = params["nproc_per_node"]
    if params["tp"] > 1 and (nproc or 1) < params["tp"] and not launched_by_torchrun():
        raise click.UsageError(f"--tp {params['tp']} needs one process per rank: add --nproc-per-node {params['tp']} "
                               "(or a multiple of it)")
    if nproc is not None and nproc > 1 and not launched_by_torchrun():
        if nproc % params["tp"]:
            raise click.UsageError(f"--nproc-per-node {nproc} is not a multiple of --tp {params['tp']}")
        args = build_launch_args(nproc_per_node=nproc, module=MODULE,
                                 module_args=_child_argv(params, overrides))
        click.echo(f"nvl eval: starting {nproc} worker(s) on this machine", err=True)
        code = launch(args)
        if code:
            raise SystemExit(code)
        return
    split = resolve_split(maker, params["split"], maker_name)
    try:
        _run(params, cfg, maker, metrics, maker_name, split, manager)
    except (click.ClickException, SystemExit, KeyboardInterrupt):
        raise
    except (EvalError, FileNotFoundError, ValueError, KeyError, TypeError, NotImplementedError) as exc:
        rank = os.environ.get("RANK")
        where = f"rank {rank}: " if rank not in (None, "0") else ""
        from nvlcore.cli.errors import one_line

        raise click.ClickException(f"{where}{one_line(exc)}") from None


#: What loads a model in-process: meaningless with --endpoint (the server has its model).
_MODEL_OPTIONS = {"hf_model_path": "--hf-model-path", "megatron_model_path": "--megatron-model-path",
                  "adapter_checkpoint": "--adapter-checkpoint", "nproc_per_node": "--nproc-per-node",
                  "device": "--device", "dtype": "--dtype", "bridge_name": "--bridge"}


def _refuse_model_options(params: dict[str, Any]) -> None:
    given = [flag for name, flag in _MODEL_OPTIONS.items() if params[name] is not None]
    if params["tp"] != 1:
        given.append("--tp")
    if given:
        raise click.UsageError(f"--endpoint answers with the server's model: drop {', '.join(given)} (give them to "
                               "the server, e.g. `nvl serve`)")


def _run_endpoint(params: dict[str, Any], cfg: Any, maker: Any, metrics: Any, maker_name: str, split: str) -> None:
    """The split answered by an OpenAI-compatible server, scored and reported as in-process answers are."""
    from nvlcore.eval.runner import EvalError, echo_err, evaluate_split
    from nvlcore.serve.client import endpoint_predictions, open_endpoint

    made = make_split(maker, maker_name, split, split_maker_kwargs(cfg, split))
    total = len(made) if params["limit"] is None else min(params["limit"], len(made))
    sampling = sampling_params(params, 1)
    try:
        client, model = open_endpoint(params["endpoint"], params["endpoint_model"])
        echo_err(f"nvl eval: {maker_name}/{split}: {total} example(s) through {params['endpoint']} (model {model!r})")

        def predict(samples: Any, budget: int) -> Any:
            return endpoint_predictions(client, model, samples, max_new_tokens=budget, sampling=sampling,
                                        concurrency=params["batch_size"], progress=echo_err)

        report = evaluate_split(predict, made, metrics, limit=params["limit"], max_new_tokens=params["max_new_tokens"],
                                system_prompt=params["system_prompt"] or None, name=f"{maker_name}/{split}")
    except (EvalError, OSError) as exc:
        from nvlcore.cli.errors import one_line

        raise click.ClickException(one_line(exc)) from None
    _report(params, report, f"nvl eval: {maker_name}/{split} via {params['endpoint']}")


def _score_file(params: dict[str, Any], metrics: Any, maker_name: str) -> None:
    from nvlcore.eval.runner import EvalError, EvalReport, read_predictions, score_records

    try:
        records = read_predictions(params["predictions"])
    except EvalError as exc:
        raise click.ClickException(str(exc)) from None
    if params["limit"]:
        records = records[: params["limit"]]
    report = EvalReport(score_records(metrics, records), records)
    _report(params, report, f"nvl eval: {maker_name}, {params['predictions']}")


def _report(params: dict[str, Any], report: Any, title: str) -> None:
    from nvlcore.eval.runner import format_table, write_records

    if params["output"] is not None:
        write_records(params["output"], report.records)
        click.echo(f"nvl eval: wrote {report.num_samples} predictions to {params['output']}", err=True)
    if params["as_json"]:
        click.echo(json.dumps(report.summary()))
    else:
        click.echo(format_table(report.metrics, num_samples=report.num_samples, title=title))
        if report.seconds:
            click.echo(f"  {report.seconds:.1f} s, {report.samples_per_s:.2f} samples/s, "
                       f"{report.tokens_per_s:.1f} generated tokens/s")


def _run(params: dict[str, Any], cfg: Any, maker: Any, metrics: Any, maker_name: str, split: str, manager: Any) -> None:
    import warnings

    warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
    from nvlcore.parallel import default_device_type, init_parallel, launched_by_torchrun, owned_process_groups

    # The groups this command sets up are torn down at its end; in-process callers (tests, notebooks)
    # keep theirs and may load other models.
    with owned_process_groups():
        ctx = None
        if launched_by_torchrun():
            device_type = params["device"].split(":")[0] if params["device"] else default_device_type()
            ctx = init_parallel(params["tp"], device_type=device_type)
        _evaluate(params, cfg, maker, metrics, maker_name, split, manager, ctx)


def _evaluate(params: dict[str, Any], cfg: Any, maker: Any, metrics: Any, maker_name: str, split: str,
              manager: Any, ctx: Any) -> None:
    from nvlcore.eval.runner import echo_err, evaluate_generator

    rank, world = (ctx.rank, ctx.world_size) if ctx else (0, 1)
    dp_rank, dp_size = (ctx.dp_rank, ctx.dp_size) if ctx else (0, 1)
    say = echo_err if rank == 0 else (lambda _m: None)
    made = make_split(maker, maker_name, split, split_maker_kwargs(cfg, split))
    total = len(made) if params["limit"] is None else min(params["limit"], len(made))
    say(f"nvl eval: {maker_name}/{split}: {total} example(s)"
        + (f" over {dp_size} data-parallel rank(s)" if dp_size > 1 else ""))
    generator = _load_generator(params, ctx, manager, say)
    sampling = sampling_params(params, world)
    report = evaluate_generator(
        generator, made, metrics, limit=params["limit"], batch_size=params["batch_size"],
        max_new_tokens=params["max_new_tokens"], sampling=sampling,
        system_prompt=params["system_prompt"] or None, rank=dp_rank, world=dp_size,
        contribute=(ctx.tp_rank if ctx else 0) == 0, name=f"{maker_name}/{split}", progress=say,
    )
    if rank == 0:
        _report(params, report, f"nvl eval: {maker_name}/{split}")


def make_split(maker: Any, maker_name: str, split: str, kwargs: dict[str, Any]) -> Any:
    """The maker's split; a source that cannot be read (no network for a Hub dataset, a missing file) is
    one line naming the dataset and what to do, as ``nvl finetune`` and ``nvl data preview`` say it."""
    try:
        return maker(split=split, **kwargs)
    except OSError as exc:  # ConnectionError and the Hub's HTTP errors are OSErrors
        text = str(exc).strip()
        first = text.splitlines()[0][:200] if text else type(exc).__name__
        raise click.ClickException(
            f"dataset.maker_name={maker_name}, split {split!r}: cannot read the data ({first}); for a Hub dataset "
            "check the network, or give a local copy (dataset.maker_kwargs.path)"
        ) from None


def _load_generator(params: dict[str, Any], ctx: Any, manager: Any, say: Any) -> Any:
    """The model through the core's inference path, a PEFT run's adapters merged in memory."""
    import torch

    from nvlcore.inference import default_device_and_dtype, load_generator

    device = params["device"] or (ctx.device if ctx else None)
    device, dtype = default_device_and_dtype(device, getattr(torch, params["dtype"]) if params["dtype"] else None)
    megatron, adapter = params["megatron_model_path"], params["adapter_checkpoint"]
    say(f"nvl eval: loading {params['hf_model_path']}" + (f" with weights from {megatron}" if megatron else "")
        + (f", adapters from {adapter} (merged in memory)" if adapter else "")
        + f" ({dtype}, {device}, tp={params['tp']})")
    bridge = resolve_bridge(params["hf_model_path"], params["bridge_name"], manager)
    return load_generator(bridge, megatron_model_path=megatron, adapter_checkpoint=adapter, merge_adapters=True,
                          tensor_parallel_size=params["tp"], device=device, dtype=dtype, manager=manager,
                          say=lambda line: say(f"nvl eval: {line}"))


def main(argv: list[str] | None = None) -> Any:
    """Entry point of each worker process (``python -m nvlcore.cli.eval_cmd ...``)."""
    return eval_command.main(args=argv, prog_name="nvl eval")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
