"""The core names no model and no PEFT method (issue 15).

Models (their bridges, towers and layers) and PEFT methods come from plugins: the core's source, code,
docstrings and comments alike, must not mention any of :data:`WORDS` (case-insensitive, anywhere in a
word, so ``lora_dtype`` and ``freeze_language_model`` count). A plugin contributes what the core would
otherwise have to name: command-line options (``nvl_register_command_options``), config fields (a PEFT
method's ``Config``), freeze groups (the bridge's ``freeze_groups``, read from ``model.freeze_<group>``),
commands (``nvl quickstart`` is the model plugin's).
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORE = ROOT / "nvlcore"
WORDS = ("lora", "radio", "mamba", "nemotron", "language_model", "vision_model")
PATTERN = re.compile("|".join(WORDS), re.IGNORECASE)

def hits(text: str, rel: str) -> list[str]:
    """``file:line: text`` of every line of ``text`` that mentions a word."""
    return [f"{rel}:{n}: {line.strip()}" for n, line in enumerate(text.splitlines(), 1) if PATTERN.search(line)]


def core_hits() -> list[str]:
    out: list[str] = []
    for path in sorted(CORE.rglob("*.py")):
        out += hits(path.read_text(encoding="utf-8"), path.relative_to(ROOT).as_posix())
    return out


def test_the_core_names_no_model_and_no_peft_method() -> None:
    assert sorted(CORE.rglob("*.py")), "no core source found"
    found = core_hits()
    assert not found, "the core names a model or a PEFT method (move it to its plugin):\n" + "\n".join(found)


def test_the_check_finds_what_it_should() -> None:
    # every word, in any case and inside identifiers, docstrings and comments
    for word in WORDS:
        assert hits(f"x = 1  # see {word.upper()}\n",
                    "nvlcore/x.py") == [f"nvlcore/x.py:1: x = 1  # see {word.upper()}"]
    assert hits("def apply(cfg):\n    return cfg.peft.lora_dtype\n", "nvlcore/x.py") == [
        "nvlcore/x.py:2: return cfg.peft.lora_dtype"]
    assert hits("freeze_language_model: bool = True\n", "nvlcore/a.py") != []
    assert hits("def generic(model):\n    return model.decoder\n", "nvlcore/x.py") == []
