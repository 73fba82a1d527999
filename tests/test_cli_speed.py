"""``nvl --help`` stays fast with every installed plugin, and no plugin imports heavy modules at import."""

from __future__ import annotations

import importlib.metadata as md
import json
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

HEAVY = ("torch", "transformers", "datasets", "decord", "wandb", "megatron")
BENCH = Path(__file__).resolve().parent.parent / "bench" / "cli_startup.py"


def installed_plugin_modules() -> list[str]:
    names = set()
    for dist in md.distributions():
        for ep in dist.entry_points:
            if ep.group == "nvl":
                names.add(ep.value.split(":")[0])
    return sorted(names)


def test_nvl_help_median_of_five_is_fast() -> None:
    """The target is < 1.0 s on the dev machine; the assertion is looser for loaded CI machines."""
    bench = runpy.run_path(str(BENCH))
    record = bench["measure"](5)
    print(json.dumps(record))
    assert record["help_median_s"] < 2.5, record
    assert record["plugins_list_median_s"] < 2.5, record


def _heavy_after(code: str) -> list[str]:
    check = f"{code}\nimport sys, json\nprint(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


@pytest.mark.parametrize("module", installed_plugin_modules())
def test_plugin_import_is_light(module: str) -> None:
    assert _heavy_after(f"import {module}") == [], f"importing {module} imports heavy modules"


def test_cli_build_help_and_listing_are_light() -> None:
    code = (
        "from click.testing import CliRunner\n"
        "from nvlcore.cli import build_cli\n"
        "cli = build_cli()\n"
        "r = CliRunner()\n"
        "assert r.invoke(cli, ['--help']).exit_code == 0\n"
        "assert r.invoke(cli, ['plugins', 'list', '--json', '--all']).exit_code == 0\n"
        "assert r.invoke(cli, ['plugins', 'hooks']).exit_code == 0\n"
    )
    assert _heavy_after(code) == []


def test_there_are_plugins_to_check() -> None:
    assert "nvl_nemotron_vl" in installed_plugin_modules()
