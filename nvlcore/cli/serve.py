"""``nvl serve``: an OpenAI-compatible HTTP server over nvl's generator (docs/serving.md).

The model loads through the core's one inference path (:mod:`nvlcore.inference`, as ``nvl generate``:
an HF directory or Hub id, ``--megatron-model-path``, a PEFT run's ``--adapter-checkpoint`` unmerged),
the bridge wraps it in its generator (chat template, default system prompt and the model plugin's
video options identical to ``nvl generate``'s), and :mod:`nvlcore.serve` answers
``/v1/chat/completions`` with requests in flight batched together. fastapi and uvicorn (the ``serve``
extra) are imported when the command runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from nvlcore.cli.generate import resolve_bridge
from nvlcore.cli.options import model_options
from nvlcore.cli.plugin_options import PluginOptionsCommand


@click.command("serve", cls=PluginOptionsCommand)
@model_options(required=True, help="HF model: config, tokenizer (and the weights when no Megatron path is given).")
@click.option("--megatron-model-path", "--megatron-path", "megatron_model_path",
              type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Megatron-style checkpoint (base dir or iter_N dir) whose weights to use.")
@click.option("--adapter-checkpoint", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="A PEFT run's checkpoint: its adapters run unmerged on top of the base weights (as nvl generate).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: every one).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535),
              help="Port to listen on (0: a free one, printed when ready).")
@click.option("--served-model-name", default=None,
              help="The model id clients name (default: the --hf-model-path value, a Hub id as owner/name).")
@click.option("--max-batch-size", default=8, show_default=True, type=click.IntRange(min=1),
              help="Requests in flight decoded together at most (1: each alone).")
@click.option("--max-new-tokens", default=1024, show_default=True, type=click.IntRange(min=1),
              help="Budget of a request without max_tokens / max_completion_tokens (capped by the context).")
@click.option("--system-prompt", default="/no_think", show_default=True,
              help="System turn added to conversations without one (as nvl generate); '' for none.")
@click.option("--allowed-local-media-path", type=click.Path(exists=True, file_okay=False, path_type=Path),
              default=None, help="Let requests name local files (paths, file:// URLs) under this directory; "
                                 "without it only data URLs are read.")
@click.option("--tp", "--tensor-parallel-size", "tp", default=1, show_default=True, type=click.IntRange(min=1),
              help="Tensor-parallel size (nvl serve runs one process: 1 only).")
@click.option("--device", default=None, help="cuda, cuda:N or cpu (default: cuda when available).")
@click.option("--dtype", type=click.Choice(["bfloat16", "float16", "float32"]), default=None,
              help="Weights dtype (default: bfloat16 on GPU, float32 on CPU).")
@click.option("--bridge", "bridge_name", default=None, help="Model bridge name (default: from config.json).")
@click.option("--quiet", "-q", is_flag=True, help="No loading or per-request lines (the ready line still prints).")
@click.option("--backend", type=click.Choice(["nvl", "vllm"]), default="nvl", show_default=True,
              help="nvl: this process serves with nvl's generator; vllm: run `vllm serve` on the HF directory with "
                   "the model's recommended settings (vLLM installed separately).")
@click.option("--vllm-export-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="--backend vllm with --adapter-checkpoint: where the run is exported for vLLM (nvl export "
                   "--format hf-peft --target vllm; default: ADAPTER_CHECKPOINT/vllm-export, reused when present).")
@click.pass_context
def serve_command(ctx: click.Context, **params: Any) -> None:
    """Serve the model over an OpenAI-compatible API (/v1/chat/completions, /v1/models, /health).

    \b
      nvl serve --hf-model-path HF --port 8000
      nvl serve --hf-model-path HF --adapter-checkpoint runs/peft --served-model-name my-finetune
    Requests carry text, images (data URLs; local files under --allowed-local-media-path) and videos
    ({"type": "video_url", ...}); requests in flight share a batch. See docs/serving.md.
    """
    from nvlcore.flags import global_flag

    command = ctx.command
    assert isinstance(command, PluginOptionsCommand)
    plugin_values = command.split_values(params, ctx)
    params["quiet"] = params["quiet"] or global_flag("quiet")
    if params["backend"] == "vllm":
        raise SystemExit(_serve_with_vllm(params))
    if params["vllm_export_dir"] is not None:
        raise click.UsageError("--vllm-export-dir is read with --backend vllm only")
    if params["tp"] > 1:
        raise click.UsageError(f"--tp {params['tp']}: nvl serve runs the model in one process (tensor parallelism "
                               "is not supported yet); serve with --tp 1 on one GPU")
    generator_options: dict[str, Any] = {}
    for obj, values in plugin_values:
        generator_options.update(obj.generator_options("serve", values, params))
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise click.ClickException(f"nvl serve needs the serve extra ({exc.name} is missing): "
                                   "pip install 'nvlcore[serve]'") from None
    import warnings

    warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
    from nvlcore.parallel import owned_process_groups

    _check_address(params["host"], params["port"])
    bridge = resolve_bridge(params["hf_model_path"], params["bridge_name"])
    with owned_process_groups():
        generator = _load(bridge, params, generator_options)
        _run_server(generator, params)


#: nvl-backend options and the value that means "not given" (refused with --backend vllm when given)
_NVL_ONLY = {"megatron_model_path": None, "max_batch_size": 8, "max_new_tokens": 1024, "system_prompt": "/no_think",
             "allowed_local_media_path": None, "device": None, "dtype": None, "bridge_name": None}


def _serve_with_vllm(params: dict[str, Any]) -> int:
    """``--backend vllm``: export an adapter run for vLLM when one is given, then run ``vllm serve``."""
    from nvlcore.serve.vllm_backend import VllmBackendError, run_vllm, vllm_available

    given = [f"--{k.replace('_name', '').replace('_', '-')}" for k, v in _NVL_ONLY.items() if params[k] != v]
    if given:
        raise click.UsageError(f"{', '.join(given)}: nvl's own backend only; vllm serve takes its settings from the "
                               "model (drop them, or serve with --backend nvl)")
    if not vllm_available():  # before an export that can take minutes
        return run_vllm(None)
    model_dir = Path(params["hf_model_path"])
    if not model_dir.is_dir():
        raise click.UsageError(f"--hf-model-path {model_dir}: --backend vllm serves a local HF directory (nvl convert "
                               "export writes one)")
    adapter_dir = None
    if params["adapter_checkpoint"] is not None:
        adapter_dir = _export_for_vllm(params["adapter_checkpoint"], model_dir, params["vllm_export_dir"])
        model_dir = None  # the export's manifest names the base to serve (the run's trained towers merged in)
    extra = ["--tensor-parallel-size", str(params["tp"])] if params["tp"] > 1 else []
    try:
        return run_vllm(model_dir, adapter_dir=adapter_dir, host=params["host"], port=params["port"],
                        served_model_name=params["served_model_name"], extra_args=extra)
    except VllmBackendError as exc:
        raise click.ClickException(str(exc)) from None


def _export_for_vllm(run: Path, hf_dir: Path, out: Path | None) -> Path:
    """The run's adapters as vLLM loads them (the ``hf-peft`` exporter, ``target=vllm``), exported once."""
    from nvlcore.cli import current_plugin_manager
    from nvlcore.serve.vllm_backend import ADAPTER_MANIFEST

    out = out or run / "vllm-export"
    if (out / ADAPTER_MANIFEST).is_file():
        click.echo(f"nvl serve: using the vLLM export {out}", err=True)
        return out
    manager = current_plugin_manager()
    try:
        exporter = manager.registry("exporter").get("hf-peft")
        exporter = exporter() if isinstance(exporter, type) else exporter
        exporter.export(checkpoint=run, hf_model_path=hf_dir, output=out, overwrite=False, plugin_manager=manager,
                        target="vllm")
    except (FileNotFoundError, FileExistsError, ValueError, KeyError) as exc:
        from nvlcore.cli.errors import one_line

        raise click.ClickException(one_line(exc)) from None
    click.echo(f"nvl serve: exported {run} for vLLM to {out}", err=True)
    return out


def _check_address(host: str, port: int) -> None:
    """Refuse a host/port the server could not listen on before the model loads (minutes on a 12B model)."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        with socket.socket(infos[0][0], socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
            sock.bind(infos[0][4])
    except OSError as exc:
        raise click.ClickException(f"--host {host} --port {port}: cannot listen there ({exc.strerror or exc}); "
                                   "pick another --port (0: any free one)") from None


def served_name(hf_dir: Path) -> str:
    """A Hub snapshot (``.../models--owner--name/snapshots/REV``) as ``owner/name``; a directory as given."""
    parts = hf_dir.parts
    if len(parts) >= 3 and parts[-2] == "snapshots" and parts[-3].startswith("models--"):
        return parts[-3][len("models--"):].replace("--", "/")
    return str(hf_dir)


def _say(params: dict[str, Any], line: str) -> None:
    if not params["quiet"]:
        click.echo(f"nvl serve: {line}", err=True)


def _load(bridge: Any, params: dict[str, Any], generator_options: dict[str, Any]) -> Any:
    """The generator (:func:`nvlcore.inference.load_generator`); errors in one line."""
    import torch

    from nvlcore.cli import current_plugin_manager
    from nvlcore.inference import default_device_and_dtype, load_generator

    device, dtype = default_device_and_dtype(params["device"],
                                             getattr(torch, params["dtype"]) if params["dtype"] else None)
    megatron, adapter = params["megatron_model_path"], params["adapter_checkpoint"]
    _say(params, f"loading {params['hf_model_path']}" + (f" with weights from {megatron}" if megatron else "")
         + (f" and the adapters of {adapter}" if adapter else "") + f" ({dtype}, {device})")
    try:
        return load_generator(bridge, megatron_model_path=megatron, adapter_checkpoint=adapter, device=device,
                              dtype=dtype, manager=current_plugin_manager(), say=lambda s: _say(params, s),
                              generator_options=generator_options)
    except (OSError, ValueError, NotImplementedError, KeyError) as exc:
        from nvlcore.cli.errors import one_line
        from nvlcore.flags import global_flag

        if global_flag("debug"):
            raise
        raise click.ClickException(one_line(exc)) from None


def _run_server(generator: Any, params: dict[str, Any]) -> None:
    """Build the app and serve until Ctrl-C / SIGTERM; print the URL once the socket listens."""
    import uvicorn

    from nvlcore.serve import BatchEngine, MediaResolver, create_app

    name = params["served_model_name"] or served_name(params["hf_model_path"])
    engine = BatchEngine(generator, max_batch_size=params["max_batch_size"],
                         default_max_tokens=params["max_new_tokens"])
    app = create_app(engine, served_model_name=name, system_prompt=params["system_prompt"] or None,
                     resolver=MediaResolver(params["allowed_local_media_path"]),
                     log=lambda line: None if params["quiet"] else click.echo(line, err=True))

    class Server(uvicorn.Server):
        async def startup(self, sockets: Any = None) -> None:
            await super().startup(sockets=sockets)
            if self.started:
                port = self.servers[0].sockets[0].getsockname()[1] if self.servers else params["port"]
                click.echo(f"nvl serve: ready at http://{params['host']}:{port}/v1 (model {name!r}, "
                           f"max batch {params['max_batch_size']})", err=True)

    config = uvicorn.Config(app, host=params["host"], port=params["port"], log_level="warning", access_log=False)
    Server(config).run()
