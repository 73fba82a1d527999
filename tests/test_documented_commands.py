"""The `nvl ...` command lines of the README, docs/which-gpus.md, docs/coming-from-megatron-bridge.md and
docs/multi-node.md
parse as written (issue 27 item 8: docs that say what is not true): every option exists on its command
and every ``key=value`` override of ``nvl finetune`` names a config key that loads. Shell variables
become placeholder paths; nothing runs."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "docs" / "which-gpus.md", ROOT / "docs" / "coming-from-megatron-bridge.md",
         ROOT / "docs" / "multi-node.md"]


def documented_commands(page: Path) -> list[list[str]]:
    """``nvl`` command lines of a page's bash blocks, continuation lines joined, comments dropped."""
    text = page.read_text()
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.split("  #")[0].strip()
            if not line.startswith("nvl "):
                continue
            line = re.sub(r'\$\(python -c "[^"]*"\)', "/tmp/video.yaml", line)
            line = re.sub(r"\$\{?([A-Z_]+)\}?", lambda m: f"/tmp/{m.group(1).lower()}", line)
            out.append(shlex.split(line)[1:])
    return out


MODEL_OPTIONS = ("--hf-model-path", "--hf-model", "--hf-model-id")


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A real HF directory for the model options (their callback resolves it while parsing)."""
    toy_mod = pytest.importorskip("nvl_nemotron_vl.toy")
    return str(toy_mod.write_toy_checkpoint(tmp_path_factory.mktemp("toy") / "tiny", "tiny", seed=1))


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_documented_commands_parse(page: Path, toy: str) -> None:
    import click

    from nvlcore.cli import build_cli

    cli = build_cli()
    commands = documented_commands(page)
    assert commands, f"no nvl command found in {page.name}"
    checked = 0
    for argv in commands:
        argv = [toy if i and argv[i - 1] in MODEL_OPTIONS else a for i, a in enumerate(argv)]
        group, args = cli, list(argv)
        while hasattr(group, "commands") and args and args[0] in group.commands:
            group = group.commands[args.pop(0)]
        assert not hasattr(group, "commands"), f"{page.name}: `nvl {' '.join(argv)}` names no command"
        try:
            ctx = group.make_context("nvl", args, resilient_parsing=False)  # an unknown option raises here
        except click.BadParameter as exc:
            if "does not exist" in str(exc):  # an output of an earlier line of the page (runs/..., export/...)
                continue
            raise AssertionError(f"{page.name}: `nvl {' '.join(argv)}`: {exc}") from exc
        if group.name == "finetune":
            overrides = [a for a in ctx.params.get("overrides", ()) if "=" in a and not a.startswith("--")]
            _check_overrides(overrides, page, argv)
            checked += len(overrides)
    assert checked, f"{page.name}: no finetune override was checked"


def _check_overrides(overrides: list[str], page: Path, argv: list[str]) -> None:
    from nvlcore.config import load_config

    known = [o for o in overrides if not o.startswith("dataset.maker_kwargs")]  # the maker's own keys
    try:
        load_config([], known)
    except Exception as exc:  # a key the schema lacks, or a value it refuses
        raise AssertionError(f"{page.name}: `nvl {' '.join(argv)}`: {exc}") from exc


def test_a_misspelled_documented_option_fails(tmp_path: Path) -> None:
    """Negative control: a page with a misspelled flag or an unknown key is caught."""
    import click

    from nvlcore.cli import build_cli

    page = tmp_path / "page.md"
    page.write_text("```bash\nnvl finetune --hf-model-path $HF --lora-on-langauge-model\n```\n")
    (argv,) = documented_commands(page)
    with pytest.raises(click.UsageError):
        build_cli().commands["finetune"].make_context("nvl", argv[1:])
    with pytest.raises(Exception, match="train.memory_plann|memory_plann"):
        _check_overrides(["train.memory_plann=auto"], page, argv)
