"""The test shown in docs/plugin-authors.md, run against the example plugin's module."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

EXAMPLE = Path(__file__).resolve().parent.parent / "docs" / "examples" / "nvl-dataset-example"


@pytest.fixture
def nvl_dataset_example(monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.syspath_prepend(str(EXAMPLE))
    monkeypatch.delitem(sys.modules, "nvl_dataset_example", raising=False)
    import nvl_dataset_example

    return nvl_dataset_example


def test_listed_and_usable(nvl_dataset_example: Any, register_plugin: Any, nvl_cli: Any, tmp_path: Path) -> None:
    from nvlcore import get_registry
    from nvlcore.config import load_config

    register_plugin(nvl_dataset_example)  # this test only; always unregistered
    listed = json.loads(nvl_cli("plugins", "list", "--json").stdout)
    assert listed[0]["registered"] == {"dataset_maker": ["jsonl_qa"]}

    data = tmp_path / "qa.jsonl"
    data.write_text('{"question": "2+2?", "answer": "4"}\n')
    cfg = load_config([], ["dataset.maker_name=jsonl_qa", f"dataset.maker_kwargs.path={data}"])
    made = get_registry("dataset_maker").get(cfg.dataset.maker_name)(split="train", **cfg.dataset.maker_kwargs)
    assert made[0]["conversation"][1]["content"][0]["text"] == "4"


def test_guide_shows_the_example_module_verbatim() -> None:
    guide = (EXAMPLE.parent.parent / "plugin-authors.md").read_text()
    module = (EXAMPLE / "nvl_dataset_example.py").read_text()
    body = module.split('"""', 2)[2].lstrip("\n")  # the module without its docstring
    assert body.strip() in guide
    assert (EXAMPLE / "pyproject.toml").exists()
