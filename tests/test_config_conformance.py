"""Conformance: no config key is accepted and ignored.

Every key of every schema (the core sections, each installed dataset maker's ``Kwargs``, each PEFT
method's ``Config``) must be either read by the code that implements it or refused at load with a
message (nvlcore.config.refused). "Read" is found in the source, not declared:

* core keys: an attribute load ``<x>.<section>.<field>`` (or through a local alias of the section,
  ``ds = cfg.dataset; ds.num_workers``) in the code that runs (nvlcore outside nvlcore/config, which
  only validates, and the plugins);
* a maker's ``Kwargs`` field: ``<x>.kwargs.<field>``, ``<name>kwargs["<field>"]`` or
  ``<name>kwargs.get("<field>")`` in the modules of the maker class and its bases;
* the ``peft`` section reaches the method whole (``apply_peft``): a core ``peft.*`` field counts as
  read when every installed method's ``Config`` declares it, and each ``Config`` field must appear in
  its plugin's code (:data:`PEFT_READERS`: file and expression, checked in the code with comments and
  strings stripped) or be refused by the ``Config``'s own validation (:data:`PEFT_REFUSED`).

The tests at the end feed the walkers a fake unread key, a fake maker and a stale reader, to show that
the conformance test fails when it should.
"""

from __future__ import annotations

import ast
import io
import tokenize
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import attrs
import pytest

ROOT = Path(__file__).resolve().parents[1]
#: The code that implements behaviour (nvlcore/config only composes and validates).
CODE_ROOTS = [ROOT / "nvlcore", *sorted((ROOT / "plugins").glob("*/nvl_*"))]
EXCLUDED = [ROOT / "nvlcore" / "config"]

#: (method, Config field) -> (file under plugins/, an expression that reads it).
PEFT_READERS: dict[tuple[str, str], tuple[str, str]] = {
    ("lora", "target_modules"): ("nvl-lora/nvl_lora/method.py", "cfg.target_modules"),
    ("lora", "exclude_modules"): ("nvl-lora/nvl_lora/method.py", "cfg.exclude_modules"),
    ("lora", "dim"): ("nvl-lora/nvl_lora/layers.py", "rank=cfg.dim"),
    ("lora", "alpha"): ("nvl-lora/nvl_lora/layers.py", "alpha=cfg.alpha"),
    ("lora", "dropout"): ("nvl-lora/nvl_lora/layers.py", "dropout=cfg.dropout"),
    ("lora", "lora_A_init_method"): ("nvl-lora/nvl_lora/layers.py", "cfg.lora_A_init_method"),
    ("lora", "lora_B_init_method"): ("nvl-lora/nvl_lora/layers.py", "cfg.lora_B_init_method"),
    ("lora", "lora_dtype"): ("nvl-lora/nvl_lora/layers.py", "dtype=cfg.torch_dtype"),
    ("lora", "seed"): ("nvl-lora/nvl_lora/layers.py", "cfg.seed"),
    # freeze_base reads every freeze_<group> flag and hands them to the bridge's freeze (its groups)
    ("lora", "freeze_language_model"): ("nvl-lora/nvl_lora/method.py", 'f.name.startswith("freeze_")'),
    ("lora", "freeze_vision_model"): ("nvl-lora/nvl_lora/method.py", 'f.name.startswith("freeze_")'),
    ("lora", "freeze_vision_projection"): ("nvl-lora/nvl_lora/method.py", 'f.name.startswith("freeze_")'),
    ("lora", "freeze_other"): ("nvl-lora/nvl_lora/method.py", "cfg.freeze_other"),
    ("lora", "base_dtype"): ("nvl-lora/nvl_lora/method.py", "self.config.base_dtype"),
}

#: (method, Config field) -> (an unsupported value, what the Config's validation says about it).
PEFT_REFUSED: dict[tuple[str, str], tuple[Any, str]] = {
    ("lora", "dropout_position"): ("post", "peft.dropout_position='post' is not supported; use 'pre'"),
}

# DoRA is LoRA's method and Config with other adapters (nvl_lora/dora.py subclasses both), so the same
# code reads its fields and the same validation refuses.
PEFT_READERS.update({("dora", f): v for (m, f), v in list(PEFT_READERS.items()) if m == "lora"})
PEFT_REFUSED.update({("dora", f): v for (m, f), v in list(PEFT_REFUSED.items()) if m == "lora"})


# -- reading the source ------------------------------------------------------------------------------
def _code_files(roots: Iterable[Path] = CODE_ROOTS) -> list[Path]:
    out = []
    for root in roots:
        for p in sorted(root.rglob("*.py")):
            if not any(p.is_relative_to(x) for x in EXCLUDED):
                out.append(p)
    return out


def _snippet_in_code(path: Path, snippet: str) -> bool:
    """``snippet`` (whitespace ignored) appears in ``path``'s code; string literals count only inside it."""
    code = "".join(tok.string for tok in tokenize.generate_tokens(io.StringIO(path.read_text()).readline)
                   if tok.type not in (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT,
                                       tokenize.DEDENT) and not _is_docstring(tok))
    return "".join(snippet.split()) in code


def _is_docstring(tok: tokenize.TokenInfo) -> bool:
    return tok.type == tokenize.STRING and tok.line.strip().startswith(('"""', "'''", 'r"""'))


def section_reads(files: Iterable[Path], sections: Iterable[str]) -> set[str]:
    """``section.field`` keys loaded as attributes in ``files`` (directly or through a local alias)."""
    sections = set(sections)
    found: set[str] = set()
    for path in files:
        tree = ast.parse(path.read_text())
        scopes = [tree] + [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
        for scope in scopes:
            # an alias counts in the function that binds it (and the functions nested in it)
            alias: dict[str, str] = {}
            if scope is not tree:
                for node in ast.walk(scope):
                    if (isinstance(node, ast.Assign) and len(node.targets) == 1
                            and isinstance(node.targets[0], ast.Name)
                            and isinstance(node.value, ast.Attribute) and node.value.attr in sections):
                        alias[node.targets[0].id] = node.value.attr
            for node in ast.walk(scope):
                if not (isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load)):
                    continue
                v = node.value
                if isinstance(v, ast.Attribute) and v.attr in sections:
                    found.add(f"{v.attr}.{node.attr}")
                elif isinstance(v, ast.Name) and v.id in alias:
                    found.add(f"{alias[v.id]}.{node.attr}")
                elif isinstance(v, ast.Name) and v.id == "cfg":
                    found.add(node.attr)  # a top-level key (mixed_precision)
    return found


def kwargs_reads(files: Iterable[Path]) -> set[str]:
    """Field names read as ``<x>.kwargs.<f>``, ``<n>kwargs["<f>"]`` or ``<n>kwargs.get("<f>")``."""
    found: set[str] = set()
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
                if isinstance(node.value, ast.Attribute) and node.value.attr == "kwargs":
                    found.add(node.attr)
            elif isinstance(node, ast.Subscript) and isinstance(node.value,
                                                                ast.Name) and node.value.id.endswith("kwargs"):
                if isinstance(node.slice, ast.Constant) and isinstance(node.slice.value, str):
                    found.add(node.slice.value)
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get"
                  and isinstance(node.func.value, ast.Name) and node.func.value.id.endswith("kwargs")
                  and node.args and isinstance(node.args[0], ast.Constant)):
                found.add(node.args[0].value)
    return found


# -- the walkers -------------------------------------------------------------------------------------
def core_keys(sections: Mapping[str, type]) -> list[str]:
    from nvlcore.config.schema import NvlConfig, PeftConfig
    from nvlcore.config.structure import init_fields

    keys = []
    for name, cls in sections.items():
        keys += [f"{name}.{f.name}" for f in init_fields(cls) if not (cls is PeftConfig and f.name == "options")]
    keys += [f.name for f in attrs.fields(NvlConfig) if f.name not in sections]
    return keys


def unaccounted_core_keys(sections: Mapping[str, type], peft_configs: Mapping[str, type],
                          files: Iterable[Path], refused: Mapping[str, Any]) -> list[str]:
    """Core keys neither read (see the module docstring) nor refused."""
    read = section_reads(files, sections)
    bad = []
    for key in core_keys(sections):
        if key in read or key in refused:
            continue
        section, _, field = key.partition(".")
        if section == "peft" and field != "method" and peft_configs and all(
                field in attrs.fields_dict(c) for c in peft_configs.values()):
            continue  # the method receives the whole section and its Config reads the field (checked below)
        bad.append(key)
    return bad


def unaccounted_maker_kwargs(makers: Mapping[str, Any]) -> list[str]:
    """``maker.field`` for each ``Kwargs`` field that the maker's modules never read."""
    import inspect

    bad = []
    for name, maker in makers.items():
        schema = getattr(maker, "Kwargs", None)
        if schema is None or not attrs.has(schema):
            continue
        files = {Path(inspect.getfile(c)) for c in inspect.getmro(maker) if c.__module__ != "builtins"}
        read = kwargs_reads(files)
        bad += [f"{name}.{f.name}" for f in attrs.fields(schema) if f.name not in read]
    return bad


def unaccounted_peft_fields(peft_configs: Mapping[str, type], readers: Mapping[tuple[str, str], tuple[str, str]],
                            refused: Mapping[tuple[str, str], tuple[Any, str]]) -> list[str]:
    """``method.field`` of each method ``Config`` neither read (a reader found in the code) nor refused."""
    bad = []
    for method, cfg_cls in peft_configs.items():
        for f in attrs.fields(cfg_cls):
            k = (method, f.name)
            if k in readers:
                rel, snippet = readers[k]
                if not _snippet_in_code(ROOT / "plugins" / rel, snippet):
                    bad.append(f"{method}.{f.name} (reader {snippet!r} not found in plugins/{rel})")
            elif k not in refused:
                bad.append(f"{method}.{f.name}")
    return bad


# -- the installed schemas -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def manager():
    from nvlcore.testing import make_plugin_manager

    return make_plugin_manager(entry_points=True)


@pytest.fixture(scope="module")
def makers(manager) -> dict[str, Any]:
    reg = manager.registry("dataset_maker")
    return {n: reg.get(n) for n in reg.names()}


@pytest.fixture(scope="module")
def peft_configs(manager) -> dict[str, type]:
    from nvlcore.config.loader import peft_config_schema

    reg = manager.registry("peft_method")
    out = {}
    for n in reg.names():
        schema = peft_config_schema(reg.get(n))
        if schema is not None:
            out[reg.canonical(n) if hasattr(reg, "canonical") else n] = schema
    return out


def test_every_core_key_is_read_or_refused(peft_configs) -> None:
    from nvlcore.config.refused import REFUSED_KEYS
    from nvlcore.config.schema import SECTIONS

    assert "lora" in peft_configs, "nvl-lora must be installed for this test"
    bad = unaccounted_core_keys(SECTIONS, peft_configs, _code_files(), REFUSED_KEYS)
    assert bad == [], f"config keys accepted but neither read nor refused: {bad}"
    # the refusals name real keys
    keys = set(core_keys(SECTIONS))
    assert set(REFUSED_KEYS) <= keys, set(REFUSED_KEYS) - keys


def test_every_maker_kwarg_is_read(makers) -> None:
    assert {"make_raven_dataset", "make_cord_v2_dataset", "make_medpix_dataset", "make_llava_video_178k_dataset",
            "synthetic_shapes"} <= set(makers)
    assert unaccounted_maker_kwargs(makers) == []


def test_every_peft_config_field_is_read_or_refused(peft_configs) -> None:
    assert unaccounted_peft_fields(peft_configs, PEFT_READERS, PEFT_REFUSED) == []
    for (method, field), (value, message) in PEFT_REFUSED.items():
        with pytest.raises(ValueError) as info:
            peft_configs[method](**{field: value})
        assert message in str(info.value)


def _bad_value(refusal: Any, hint: Any) -> Any:
    import typing

    supported = refusal.supported
    args = typing.get_args(hint)
    literals = [a for a in (args if typing.get_origin(hint) is typing.Literal else
                            sum((list(typing.get_args(a)) for a in args if typing.get_origin(a) is typing.Literal),
                                []))]
    if literals:
        return next(v for v in literals if v not in supported)
    if hint is bool or bool in args:
        return not supported[0]
    if hint is int or int in args:
        return (supported[0] or 0) + 7
    return float(supported[0] or 1.0) * 3 + 1


def test_every_refused_value_fails_at_load_naming_the_key() -> None:
    from nvlcore.config import ConfigError, load_config
    from nvlcore.config.refused import REFUSED
    from nvlcore.config.schema import SECTIONS, NvlConfig
    from nvlcore.config.structure import type_hints

    for r in REFUSED:
        section, _, field = r.key.rpartition(".")
        hint = type_hints(SECTIONS[section] if section else NvlConfig)[field]
        bad = _bad_value(r, hint)
        with pytest.raises(ConfigError) as info:
            load_config([], [f"{r.key}={bad}"], validate_plugins=False)
        msg = str(info.value)
        assert msg.startswith(f"{r.key}=") and "is not supported by nvl" in msg and "\n" not in msg, msg
        assert r.instead in msg
        # the default (what nvl does) loads
        load_config([], [f"{r.key}={'null' if r.supported[0] is None else r.supported[0]}"], validate_plugins=False)


# -- the conformance test can fail -------------------------------------------------------------------------
def test_a_fake_unread_core_key_is_reported(peft_configs) -> None:
    from nvlcore.config.refused import REFUSED_KEYS
    from nvlcore.config.schema import SECTIONS, TrainConfig

    @attrs.define
    class TrainWithFake(TrainConfig):
        fake_unread_key: int = 3

    sections = {**SECTIONS, "train": TrainWithFake}
    assert unaccounted_core_keys(sections, peft_configs, _code_files(), REFUSED_KEYS) == ["train.fake_unread_key"]
    # a refused key whose refusal is dropped is reported too
    without = {k: v for k, v in REFUSED_KEYS.items() if k != "checkpoint.fully_parallel_load"}
    assert unaccounted_core_keys(SECTIONS, peft_configs, _code_files(), without) == ["checkpoint.fully_parallel_load"]
    # and a key whose only reader is gone (the code roots without nvlcore/training)
    roots = [r for r in CODE_ROOTS if r.name != "nvlcore"] + [ROOT / "nvlcore" / "cli"]
    missing = unaccounted_core_keys(SECTIONS, peft_configs, _code_files(roots), REFUSED_KEYS)
    assert "dataset.persistent_workers" in missing and "ddp.use_distributed_optimizer" in missing


def test_a_fake_unread_maker_kwarg_and_a_stale_peft_reader_are_reported(makers, peft_configs) -> None:
    from nvlcore.builtin.synthetic_vqa import SyntheticShapes, SyntheticShapesKwargs

    @attrs.define
    class FakeKwargs(SyntheticShapesKwargs):
        fake_unread_kwarg: int = 1

    class FakeMaker(SyntheticShapes):
        Kwargs = FakeKwargs

    assert unaccounted_maker_kwargs({"fake": FakeMaker}) == ["fake.fake_unread_kwarg"]
    stale = {**PEFT_READERS, ("lora", "dim"): ("nvl-lora/nvl_lora/layers.py", "rank=cfg.dimension")}
    assert unaccounted_peft_fields(peft_configs, stale, PEFT_REFUSED) == [
        "lora.dim (reader 'rank=cfg.dimension' not found in plugins/nvl-lora/nvl_lora/layers.py)"]
    assert unaccounted_peft_fields(peft_configs, PEFT_READERS, {}) == ["dora.dropout_position", "lora.dropout_position"]
