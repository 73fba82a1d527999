"""Compose a run config: schema defaults <- base mapping (a bridge's recipe) <- YAML files <- overrides.

Then validate it: unknown keys and wrong types fail naming the full dotted key (and the file or
command line that set it) with a did-you-mean; plugin-owned parts (``dataset.maker_kwargs``, a PEFT
method's own fields, logger and bridge names) validate against the selected plugin's schema.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import yaml

from nvlcore.config.overrides import DELETE, NvlYamlLoader, Override, parse_overrides
from nvlcore.config.refused import check_refused
from nvlcore.config.schema import ALIASES, MISSING, SECTIONS, ModelConfig, NvlConfig, PeftConfig
from nvlcore.config.structure import (
    ConfigError,
    build,
    coerce,
    init_fields,
    is_missing,
    join,
    type_hints,
    unknown_key_error,
)

_TOP_LEVEL_SCALARS = ("mixed_precision",)


# -- reading --------------------------------------------------------------------------------------
def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read one YAML config file (``???`` markers, ``2e-5`` floats) into a plain dict.

    :raises ConfigError: naming the file when it is missing, unreadable or not a mapping.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"config file {str(path)!r} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"config file {str(path)!r} cannot be read: {exc}") from None
    try:
        data = yaml.load(text, Loader=NvlYamlLoader)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of sections, not {type(data).__name__}")
    return data


# -- merging --------------------------------------------------------------------------------------
class _Layers:
    """The merged raw mapping and, for every key set, which layer set it (for error messages)."""

    def __init__(self) -> None:
        self.raw: dict[str, Any] = {}
        self.source: dict[str, str] = {}

    def where(self, key: str | None) -> str:
        while key:
            if key in self.source:
                return self.source[key]
            key = key.rpartition(".")[0]
        return ""

    def set(self, key: str, value: Any, source: str) -> None:
        parts = key.split(".")
        node = self.raw
        for part in parts[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child
        last = parts[-1]
        if isinstance(value, Mapping) and isinstance(node.get(last), dict):
            self._merge(node[last], value, key, source)
        else:
            node[last] = copy.deepcopy(_plain(value))
            self._record(key, value, source)

    def delete(self, key: str) -> None:
        parts = key.split(".")
        node: Any = self.raw
        for part in parts[:-1]:
            node = node.get(part) if isinstance(node, dict) else None
            if node is None:
                return
        if isinstance(node, dict):
            node.pop(parts[-1], None)
        for k in [k for k in self.source if k == key or k.startswith(key + ".")]:
            del self.source[k]

    def _merge(self, dst: dict[str, Any], src: Mapping[str, Any], prefix: str, source: str) -> None:
        for k, v in src.items():
            key = join(prefix, str(k))
            if isinstance(v, Mapping) and isinstance(dst.get(k), dict):
                self._merge(dst[k], v, key, source)
            else:
                dst[k] = copy.deepcopy(_plain(v))
                self._record(key, v, source)

    def _record(self, key: str, value: Any, source: str) -> None:
        self.source[key] = source
        if isinstance(value, Mapping):
            for k, v in value.items():
                self._record(join(key, str(k)), v, source)

    def get(self, key: str, default: Any = None) -> Any:
        node: Any = self.raw
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                return default
            node = node[part]
        return node


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _flatten_layer(layer: Mapping[str, Any], source: str) -> list[tuple[str, Any]]:
    """A file/base layer as ``(dotted key, value)`` pairs at section-field depth, aliases resolved."""
    pairs: list[tuple[str, Any]] = []
    for section, body in layer.items():
        section = str(section)
        if section in _TOP_LEVEL_SCALARS:
            pairs.append((section, body))
            continue
        if section not in SECTIONS:
            raise _with_source(unknown_key_error("", section, [*SECTIONS, *_TOP_LEVEL_SCALARS]), source)
        if body is None:
            pairs.append((section, None))
            continue
        if attrs.has(type(body)):
            body = config_to_dict_section(body)
        if not isinstance(body, Mapping):
            raise ConfigError(f"{section}: expected a mapping of keys, got {body!r} (from {source})", key=section)
        seen: dict[str, str] = {}
        for name, value in body.items():
            key = canonical_key(join(section, str(name)))
            if key in seen and seen[key] != str(name):
                raise ConfigError(
                    f"{section}.{name} and {section}.{seen[key]} are the same setting ({key}); "
                    f"give only one (from {source})",
                    key=key,
                )
            seen[key] = str(name)
            pairs.append((key, value))
    return pairs


FREEZE_PREFIX = "model.freeze_"


def canonical_key(key: str) -> str:
    """Resolve a deprecated or alternative key name (``train.eval_iters`` -> ``validation.eval_iters``),
    and a bridge group's freeze flag ``model.freeze_<group>`` to its entry ``model.freeze.<group>``."""
    for old, new in ALIASES.items():
        if key == old or key.startswith(old + "."):
            key = new + key[len(old) :]
            break
    if key.startswith(FREEZE_PREFIX) and "." not in key[len(FREEZE_PREFIX):]:
        return "model.freeze." + key[len(FREEZE_PREFIX):]
    return key


def _check_key_exists(key: str, source: str) -> None:
    """Fail early, naming the layer, on a key that no section has (plugin-owned parts excepted)."""
    parts = key.split(".")
    if parts[0] in _TOP_LEVEL_SCALARS:
        if len(parts) > 1:
            raise _with_source(ConfigError(f"{key}: {parts[0]} is a value, not a section", key=key), source)
        return
    if parts[0] not in SECTIONS:
        raise _with_source(unknown_key_error("", parts[0], [*SECTIONS, *_TOP_LEVEL_SCALARS]), source)
    if len(parts) == 1:
        return
    cls = SECTIONS[parts[0]]
    names = [f.name for f in init_fields(cls)]
    if parts[1] not in names:
        if cls is PeftConfig:
            return  # may be a field of the selected method's Config: checked once the method is known
        raise _with_source(unknown_key_error(parts[0], parts[1], names, elsewhere=_elsewhere), source)
    if len(parts) > 2:
        tp = type_hints(cls).get(parts[1])
        if tp is not None and _is_mapping_type(tp):
            return
        raise _with_source(
            ConfigError(f"{key}: {parts[0]}.{parts[1]} is a value, not a mapping", key=key), source
        )


def _is_mapping_type(tp: Any) -> bool:
    import collections.abc
    import typing

    return tp is dict or typing.get_origin(tp) in (dict, collections.abc.Mapping, collections.abc.MutableMapping)


def _elsewhere(name: str) -> list[str]:
    """Keys of other sections with this exact field name (``train.lr`` -> ``optimizer.lr``)."""
    out = []
    for section, cls in SECTIONS.items():
        if any(f.name == name for f in init_fields(cls)):
            out.append(f"{section}.{name}")
    for old, new in ALIASES.items():
        if old.rpartition(".")[2] == name:
            out.append(new)
    return out


def _with_source(exc: ConfigError, source: str) -> ConfigError:
    if source and "(from " not in str(exc):
        exc.args = (f"{exc.args[0]} (from {source})",)
    return exc


# -- building -------------------------------------------------------------------------------------
def load_config(
    config_files: Sequence[str | Path] = (),
    overrides: Sequence[str] | Sequence[Override] = (),
    base: Mapping[str, Any] | None = None,
    *,
    plugins: Any = None,
    validate_plugins: bool = True,
) -> NvlConfig:
    """Compose and validate a run config.

    Order (later wins): the schema's defaults, ``base`` (a model bridge's ``recipe()``), each file of
    ``config_files``, then ``overrides``. Mappings merge key by key; other values replace.

    :param config_files: YAML files, applied in order (the original workflow's YAML files load as
        written: ``???`` markers, ``train.eval_iters``, ``dataset.sequence_length``).
    :param overrides: command-line overrides: raw argument strings (see
        :func:`nvlcore.config.parse_overrides`) or ``(dotted key, value)`` pairs (:class:`Override`).
    :param base: a nested mapping by section, e.g. a bridge's recipe.
    :param plugins: the :class:`~nvlcore.plugins.NvlPluginManager` whose registries validate the
        plugin-owned parts (default: the process-wide one).
    :param validate_plugins: check ``dataset.maker_name``/``maker_kwargs``, ``peft.method`` and its
        fields, ``logger.loggers`` and ``model.bridge`` against the registries.
    :returns: the config; fields may still hold ``"???"`` (see :func:`resolve_config`).
    :raises ConfigError: naming the key at fault, where it was set, and the closest valid key.
    """
    layers = _Layers()
    if base:
        _apply_mapping(layers, base, "the recipe (base config)")
    for path in config_files:
        _apply_mapping(layers, load_yaml(path), str(path))
    if all(isinstance(o, str) for o in overrides):
        parsed = parse_overrides(list(overrides))  # type: ignore[arg-type]
    elif all(isinstance(o, tuple) and len(o) == 2 for o in overrides):
        parsed = [Override(*o) for o in overrides]  # type: ignore[misc]
    else:
        raise TypeError("overrides: pass either argument strings or (key, value) pairs, not a mix")
    _apply_overrides(layers, parsed, "the command line")
    return _build_config(layers, plugins=plugins, validate_plugins=validate_plugins)


def _maker_changed(layers: _Layers, pairs: Iterable[tuple[str, Any]]) -> bool:
    current = layers.get("dataset.maker_name")
    sets_maker = [v for k, v in pairs if k == "dataset.maker_name" and v is not DELETE]
    return bool(sets_maker) and current is not None and sets_maker[-1] != current


def _reset_maker_kwargs(layers: _Layers, pairs: list[tuple[str, Any]]) -> None:
    # A layer that switches to another dataset maker starts from empty maker kwargs unless it gives
    # them: the previous maker's kwargs (a recipe's cord_v2 settings, say) would not fit the new one.
    if _maker_changed(layers, pairs):
        for key in ("dataset.maker_kwargs", "dataset.val_maker_kwargs", "dataset.test_maker_kwargs"):
            layers.delete(key)


def _apply_mapping(layers: _Layers, mapping: Mapping[str, Any], source: str) -> None:
    if isinstance(mapping, NvlConfig):
        mapping = config_to_dict(mapping)
    if not isinstance(mapping, Mapping):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(mapping).__name__}")
    pairs = _flatten_layer(mapping, source)
    for key, _ in pairs:
        _check_key_exists(key, source)
    _reset_maker_kwargs(layers, pairs)
    for key, value in pairs:
        if value is None and key in SECTIONS:
            layers.delete(key)  # `peft: null` = this section's defaults (for peft: no PEFT)
            continue
        layers.set(key, value, source)


def _apply_overrides(layers: _Layers, overrides: Sequence[Override], source: str) -> None:
    pairs = [(canonical_key(o.key), o.value) for o in overrides]
    for key, _ in pairs:
        _check_key_exists(key, source)
    _reset_maker_kwargs(layers, pairs)
    for key, value in pairs:
        if value is DELETE:
            layers.delete(key)
        elif value is None and key in SECTIONS:
            layers.delete(key)
        else:
            layers.set(key, value, source)


def _build_config(layers: _Layers, *, plugins: Any, validate_plugins: bool) -> NvlConfig:
    raw = layers.raw
    sections: dict[str, Any] = {}
    peft_extra: dict[str, Any] = {}
    try:
        for name, cls in SECTIONS.items():
            obj, unknown = build(
                cls, raw.get(name), name, collect_unknown=cls is PeftConfig, elsewhere=_elsewhere
            )
            sections[name] = obj
            if cls is PeftConfig:
                peft_extra = unknown
        hints = type_hints(NvlConfig)
        scalars = {
            n: coerce(raw[n], hints[n], n) for n in _TOP_LEVEL_SCALARS if n in raw
        }
        cfg = NvlConfig(**sections, **scalars)
        if cfg.dataset.seq_length is None and not is_missing(cfg.model.seq_length):
            cfg.dataset.seq_length = cfg.model.seq_length
        if validate_plugins:
            validate_plugin_sections(cfg, peft_extra=peft_extra, plugins=plugins)
        elif peft_extra:
            cfg.peft.options = {**cfg.peft.options, **peft_extra}
        check_refused(cfg)
    except ConfigError as exc:
        raise _with_source(exc, layers.where(exc.key)) from None
    return cfg


# -- plugin-owned sections ------------------------------------------------------------------------
def _registry(plugins: Any, kind: str) -> Any:
    if plugins is None:
        from nvlcore.plugins import get_plugin_manager

        plugins = get_plugin_manager()
    return plugins.registry(kind)


def _lookup(plugins: Any, kind: str, name: str, key: str, *, load: bool) -> Any:
    from nvlcore.registry import UnknownNameError

    registry = _registry(plugins, kind)
    try:
        entry = registry.entry(name)
    except UnknownNameError as exc:
        raise ConfigError(f"{key}: {exc}", key=key) from None
    if not load:
        return entry
    try:
        return entry.load()
    except Exception as exc:  # the plugin's module is broken: say which plugin
        raise ConfigError(
            f"{key}: {kind} {name!r} of {entry.provenance.describe()} cannot be imported: "
            f"{type(exc).__name__}: {exc}",
            key=key,
        ) from exc


def maker_kwargs_schema(maker: Any) -> type | None:
    """The attrs class declaring a dataset maker's ``maker_kwargs`` (its ``Kwargs`` attribute), if any."""
    schema = getattr(maker, "Kwargs", None)
    return schema if isinstance(schema, type) and attrs.has(schema) else None


def peft_config_schema(method: Any) -> type | None:
    """The attrs class declaring a PEFT method's own ``peft.*`` fields (its ``Config`` attribute), if any."""
    schema = getattr(method, "Config", None)
    return schema if isinstance(schema, type) and attrs.has(schema) else None


def validate_plugin_sections(cfg: NvlConfig, *, peft_extra: Mapping[str, Any] | None = None,
                             plugins: Any = None) -> None:
    """Check the parts of ``cfg`` that plugins own, in place.

    * ``dataset.maker_name`` must be registered; ``dataset.maker_kwargs`` (and the validation/test
      ones) must fit the maker's ``Kwargs`` schema: defaults are filled in, a required field that is
      absent becomes ``"???"``.
    * ``peft.method`` must be registered; section keys beyond the core ``peft`` fields must be fields
      of the method's ``Config`` and land, with its defaults, in ``cfg.peft.options``. The Config may
      also declare core fields (``dim``, ``dropout_position``...): its types and validators then check
      those values too.
    * ``logger.loggers`` and ``model.bridge`` must be registered names.
    """
    peft_extra = dict(peft_extra or {})
    ds = cfg.dataset
    if not is_missing(ds.maker_name):
        maker = _lookup(plugins, "dataset_maker", ds.maker_name, "dataset.maker_name", load=True)
        schema = maker_kwargs_schema(maker)
        if schema is not None:
            ds.maker_kwargs = _validate_kwargs(schema, ds.maker_kwargs, "dataset.maker_kwargs", fill=True)
            ds.val_maker_kwargs = _validate_kwargs(schema, ds.val_maker_kwargs, "dataset.val_maker_kwargs", fill=False)
            ds.test_maker_kwargs = _validate_kwargs(schema, ds.test_maker_kwargs, "dataset.test_maker_kwargs",
                                                    fill=False)
    peft = cfg.peft
    core_names = [f.name for f in init_fields(PeftConfig)]
    given = {**peft.options, **peft_extra}
    if peft.method is not None and not is_missing(peft.method):
        method = _lookup(plugins, "peft_method", peft.method, "peft.method", load=True)
        schema = peft_config_schema(method)
        if schema is not None:
            # the method's Config sees the whole section: the core fields it also declares (its own
            # validators run on them) and its extra fields, which land in peft.options
            schema_names = [f.name for f in init_fields(schema)]
            shared = {n: getattr(peft, n) for n in schema_names if n in core_names}
            values, _ = build(schema, {**shared, **given}, "peft", elsewhere=_elsewhere, instantiate=False)
            if not any(is_missing(v) for v in values.values()):
                build(schema, values, "peft")  # run the schema's own validators and converters
            peft.options = {k: v for k, v in values.items() if k not in core_names}
            given = {}
    if given:
        name = next(iter(given))
        raise unknown_key_error("peft", name, core_names, elsewhere=_elsewhere)
    for i, name in enumerate(cfg.logger.loggers):
        if not is_missing(name):
            _lookup(plugins, "logger", name, f"logger.loggers[{i}]", load=False)
    if cfg.model.bridge is not None and not is_missing(cfg.model.bridge):
        _lookup(plugins, "model_bridge", cfg.model.bridge, "model.bridge", load=False)


def _validate_kwargs(schema: type, given: Mapping[str, Any], key: str, *, fill: bool) -> dict[str, Any]:
    given = dict(given or {})
    if fill:
        values, _ = build(schema, given, key, instantiate=False)
        if not any(is_missing(v) for v in values.values()):
            build(schema, values, key)
        # keep the declared order: the printed config reads like the schema
        return {f.name: values[f.name] for f in init_fields(schema) if f.name in values}
    # per-split extras: only the keys given, each checked against the schema
    hints = type_hints(schema)
    names = [f.name for f in init_fields(schema)]
    out = {}
    for name, value in given.items():
        if name not in names:
            raise unknown_key_error(key, name, names)
        out[name] = coerce(value, hints.get(name, Any), join(key, name))
    return out


# -- resolving ------------------------------------------------------------------------------------
def missing_keys(cfg: NvlConfig) -> list[str]:
    """Full dotted keys that still hold the mandatory marker ``"???"``."""
    out: list[str] = []

    def walk(value: Any, key: str) -> None:
        if is_missing(value):
            out.append(key)
        elif isinstance(value, Mapping):
            for k, v in value.items():
                walk(v, join(key, str(k)))
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                walk(v, f"{key}[{i}]")

    data = config_to_dict(cfg)
    walk(data, "")
    return out


def resolve_config(cfg: NvlConfig) -> NvlConfig:
    """Check that ``cfg`` can drive a run: no ``"???"`` left, only supported settings.

    :raises ConfigError: listing every mandatory key left unset (``checkpoint.save``, say) with the
        override that sets it, or naming an unsupported or inconsistent setting.
    """
    missing = missing_keys(cfg)
    if missing:
        first = missing[0].split("[")[0]
        raise ConfigError(
            f"mandatory config value{'s' if len(missing) > 1 else ''} not set: {', '.join(missing)} "
            f"(marked '???'); set {'them' if len(missing) > 1 else 'it'} on the command line, "
            f"e.g. {first}=VALUE",
            key=missing[0],
        )
    check_refused(cfg)  # a config built by hand (not by load_config) is checked here
    positive = {
        "model.seq_length": cfg.model.seq_length,
        "model.tensor_model_parallel_size": cfg.model.tensor_model_parallel_size,
        "train.train_iters": cfg.train.train_iters,
        "train.global_batch_size": cfg.train.global_batch_size,
        "train.micro_batch_size": cfg.train.micro_batch_size,
        "logger.log_interval": cfg.logger.log_interval,
        "dataset.packing_buffer_size": cfg.dataset.packing_buffer_size,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key} must be positive, got {value}", key=key)
    if cfg.train.global_batch_size % cfg.train.micro_batch_size:
        raise ConfigError(
            f"train.global_batch_size ({cfg.train.global_batch_size}) must be a multiple of "
            f"train.micro_batch_size ({cfg.train.micro_batch_size})",
            key="train.global_batch_size",
        )
    if cfg.optimizer.bf16 and cfg.optimizer.fp16:
        raise ConfigError("optimizer.bf16 and optimizer.fp16 are both true; choose one", key="optimizer.fp16")
    if cfg.peft.method is not None and cfg.peft.target_modules and cfg.peft.exclude_modules:
        raise ConfigError(
            "peft.target_modules and peft.exclude_modules are exclusive; set peft.target_modules=[] "
            "to use exclude_modules",
            key="peft.exclude_modules",
        )
    return cfg


# -- writing --------------------------------------------------------------------------------------
def config_to_dict_section(section: Any) -> dict[str, Any]:
    return {f.name: _plain(getattr(section, f.name)) for f in attrs.fields(type(section))}


def config_to_dict(cfg: NvlConfig) -> dict[str, Any]:
    """The config as plain nested dicts/lists/scalars, by section; loadable again by :func:`load_config`.

    A PEFT method's own fields (``cfg.peft.options``) appear flattened in the ``peft`` section, and the
    frozen groups (``cfg.model.freeze``) as ``model.freeze_<group>`` flags, as a user writes them.
    """
    out: dict[str, Any] = {}
    for f in attrs.fields(NvlConfig):
        value = getattr(cfg, f.name)
        if attrs.has(type(value)):
            section = config_to_dict_section(value)
            if isinstance(value, PeftConfig):
                options = section.pop("options")
                section.update(options)
            if isinstance(value, ModelConfig):
                # Megatron-Bridge's spelling: one model.freeze_<group> flag per group, where `freeze` stood.
                frozen = section.pop("freeze")
                at = list(section).index("bridge") if "bridge" in section else len(section)
                items = list(section.items())
                section = dict(items[:at] + [(f"freeze_{g}", bool(v)) for g, v in frozen.items()] + items[at:])
            out[f.name] = section
        else:
            out[f.name] = _plain(value)
    return out


class _Dumper(yaml.SafeDumper):
    pass


def _str_representer(dumper: yaml.SafeDumper, data: str) -> yaml.Node:
    if "\n" in data:
        return dumper.represent_scalar("tag:yaml.org,2002:str", data, style="|")
    return dumper.represent_scalar("tag:yaml.org,2002:str", data)


_Dumper.add_representer(str, _str_representer)


def config_to_yaml(cfg: NvlConfig) -> str:
    """The config as YAML (sections in schema order); :func:`load_config` reads it back unchanged."""
    return yaml.dump(config_to_dict(cfg), Dumper=_Dumper, sort_keys=False, default_flow_style=False, allow_unicode=True)


def schema_rows() -> list[tuple[str, str, Any, str]]:
    """``(key, type, default, help)`` for every core config key, in schema order (docs, ``nvl config keys``)."""
    from nvlcore.config.structure import type_name

    rows: list[tuple[str, str, Any, str]] = []
    defaults = config_to_dict(NvlConfig())
    for f in attrs.fields(NvlConfig):
        if f.name in SECTIONS:
            cls = SECTIONS[f.name]
            hints = type_hints(cls)
            for sf in init_fields(cls):
                if cls is PeftConfig and sf.name == "options":
                    continue
                if cls is ModelConfig and sf.name == "freeze":
                    rows.append(("model.freeze_<group>", "bool", False, sf.metadata.get("help", "")))
                    continue
                rows.append(
                    (f"{f.name}.{sf.name}", type_name(hints[sf.name]), defaults[f.name][sf.name],
                     sf.metadata.get("help", ""))
                )
        else:
            rows.append((f.name, type_name(type_hints(NvlConfig)[f.name]), defaults[f.name],
                         f.metadata.get("help", "")))
    return rows


__all__ = [
    "MISSING",
    "config_to_dict",
    "config_to_yaml",
    "load_config",
    "load_yaml",
    "missing_keys",
    "resolve_config",
    "validate_plugin_sections",
]
