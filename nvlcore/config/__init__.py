"""Run configuration: typed sections with Megatron-Bridge's names, YAML files and dotted overrides.

>>> from nvlcore.config import load_config
>>> cfg = load_config(["finetune.yaml"], ["train.global_batch_size=8", "dataset.maker_name", "raven"])
>>> cfg.train.global_batch_size
8

See docs/config.md for every key, its default and the override forms.
"""

from __future__ import annotations

from nvlcore.config.loader import (
    config_to_dict,
    config_to_yaml,
    load_config,
    load_yaml,
    maker_kwargs_schema,
    missing_keys,
    peft_config_schema,
    resolve_config,
    schema_rows,
    validate_plugin_sections,
)
from nvlcore.config.overrides import DELETE, Override, parse_overrides, parse_value
from nvlcore.config.schema import (
    ALIASES,
    MISSING,
    SECTIONS,
    CheckpointConfig,
    DatasetConfig,
    DDPConfig,
    DistConfig,
    LoggerConfig,
    ModelConfig,
    NvlConfig,
    OptimizerConfig,
    PeftConfig,
    RngConfig,
    SchedulerConfig,
    TrainConfig,
    ValidationConfig,
)
from nvlcore.config.structure import ConfigError, build, is_missing

__all__ = [
    "ALIASES",
    "DELETE",
    "MISSING",
    "SECTIONS",
    "CheckpointConfig",
    "ConfigError",
    "DDPConfig",
    "DatasetConfig",
    "DistConfig",
    "LoggerConfig",
    "ModelConfig",
    "NvlConfig",
    "OptimizerConfig",
    "Override",
    "PeftConfig",
    "RngConfig",
    "SchedulerConfig",
    "TrainConfig",
    "ValidationConfig",
    "build",
    "config_to_dict",
    "config_to_yaml",
    "is_missing",
    "load_config",
    "load_yaml",
    "maker_kwargs_schema",
    "missing_keys",
    "parse_overrides",
    "parse_value",
    "peft_config_schema",
    "resolve_config",
    "schema_rows",
    "validate_plugin_sections",
]
