"""``nvl serve --backend vllm``: the ``vllm serve`` command line for an exported model, and running it.

The model-specific settings (context length, media limits, video sampling, EVS rate, remote code) come from
the model's bridge (:meth:`nvlcore.bridge.ModelBridge.vllm_serve_settings`); the arguments an adapter needs
come from the ``vllm_serve.json`` its exporter wrote beside it (``nvl export --format hf-peft --target vllm``),
so this module names neither a model nor an adapter method. vLLM itself is optional: :func:`vllm_available`
says whether it is importable, :func:`run_vllm` refuses in one line when it is not.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

#: The file an adapter exporter writes for vLLM: ``base_model``, ``adapter_args``, ``module_option``.
ADAPTER_MANIFEST = "vllm_serve.json"
INSTALL_HINT = "vLLM is not installed: `pip install vllm` (a CUDA machine), then run this again"


class VllmBackendError(ValueError):
    """The vLLM command cannot be built: the message names the file or option at fault and what to do."""


def vllm_available() -> bool:
    """Whether ``import vllm`` would find the package (nothing is imported)."""
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def read_adapter_manifest(adapter_dir: str | Path) -> dict[str, Any]:
    """The adapter's ``vllm_serve.json`` (see :data:`ADAPTER_MANIFEST`), checked."""
    path = Path(adapter_dir) / ADAPTER_MANIFEST
    if not path.is_file():
        raise VllmBackendError(f"{path} is missing: export the adapter for vLLM first "
                               "(`nvl export --format hf-peft --target vllm ...`)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise VllmBackendError(f"{path}: not JSON ({exc}); export the adapter again") from None
    bad = [k for k, t in (("base_model", str), ("adapter_args", list), ("module_option", str))
           if not isinstance(data.get(k), t)]
    if bad:
        raise VllmBackendError(f"{path}: {', '.join(bad)} missing or of the wrong type; export the adapter again")
    return data


def _option(name: str, value: Any) -> list[str]:
    """One ``vllm serve`` option: ``True`` a bare flag, ``False``/``None`` nothing, a dict or list JSON."""
    flag = "--" + name.replace("_", "-")
    if value is True:
        return [flag]
    if value is False or value is None:
        return []
    return [flag, json.dumps(value) if isinstance(value, (dict, list)) else str(value)]


def model_settings(model_dir: str | Path, manager: Any = None) -> dict[str, Any]:
    """The bridge's recommended settings for the model in ``model_dir`` (an HF directory)."""
    from nvlcore.bridge import resolve_bridge

    return dict(resolve_bridge(model_dir, manager=manager, option="the vLLM model directory").vllm_serve_settings())


def vllm_command(model_dir: str | Path | None, *, adapter_dir: str | Path | None = None, host: str = "127.0.0.1",
                 port: int = 8000, served_model_name: str | None = None, extra_args: Sequence[str] = (),
                 settings: Mapping[str, Any] | None = None, manager: Any = None) -> list[str]:
    """The ``vllm serve`` argv for ``model_dir`` with its model's recommended settings.

    :param model_dir: the model to serve; ``None`` with an adapter: the base its manifest names.
    :param adapter_dir: an adapter exported for vLLM, served as ``served_model_name`` (default: its directory
        name) next to the base; ``model_dir`` must be the base its manifest names.
    :param served_model_name: the name clients ask for (``--served-model-name``; with an adapter, the
        adapter's name and the base keeps vLLM's default name).
    :param extra_args: appended last, so they override the recommended values (vLLM keeps the last).
    :param settings: the model's settings (default: :func:`model_settings` of ``model_dir``).
    """
    manifest = None if adapter_dir is None else read_adapter_manifest(adapter_dir)
    if model_dir is None:
        if manifest is None:
            raise VllmBackendError("no model to serve: give a model directory or an adapter exported for vLLM")
        model_dir = manifest["base_model"]
    model_dir = Path(model_dir).expanduser().absolute()
    if adapter_dir is not None and manifest is not None:
        adapter_dir = Path(adapter_dir).expanduser().absolute()
        base = Path(manifest["base_model"]).expanduser().absolute()
        if base != model_dir:
            raise VllmBackendError(f"{adapter_dir / ADAPTER_MANIFEST} applies to base {base}, not {model_dir}: "
                                   "serve that base with this adapter")
    argv = ["vllm", "serve", str(model_dir), "--host", host, "--port", str(int(port))]
    for name, value in (model_settings(model_dir, manager) if settings is None else settings).items():
        argv += _option(name, value)
    if adapter_dir is None or manifest is None:
        if served_model_name:
            argv += ["--served-model-name", served_model_name]
        return argv + list(extra_args)
    name = served_model_name or Path(adapter_dir).name
    argv += [str(a) for a in manifest["adapter_args"]] + [manifest["module_option"], f"{name}={adapter_dir}"]
    return argv + list(extra_args)


def run_vllm(model_dir: str | Path | None, *, replace_process: bool = True, **options: Any) -> int:
    """Run :func:`vllm_command`'s command: in place of this process (``replace_process``, as a launcher
    does) or as a child whose exit status is returned. Without vLLM, prints :data:`INSTALL_HINT` and returns 1.
    ``options`` are :func:`vllm_command`'s."""
    if not vllm_available():
        print(f"nvl serve: {INSTALL_HINT}", file=sys.stderr)
        return 1
    argv = vllm_command(model_dir, **options)
    exe = shutil.which("vllm")
    # the console script may be off PATH (a venv not activated): run vLLM's CLI module with this Python
    cmd = [exe, *argv[1:]] if exe else [sys.executable, "-m", "vllm.entrypoints.cli.main", *argv[1:]]
    sys.stdout.flush()
    sys.stderr.flush()
    if replace_process:
        os.execv(cmd[0], cmd)
    return subprocess.call(cmd)
