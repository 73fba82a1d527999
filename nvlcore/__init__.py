"""nvl core: hook specifications, plugin manager, registries, config, trainer and checkpoints.

Plugins import only from this module's public API.
"""

from __future__ import annotations

from nvlcore.hookspecs import hookimpl, hookspec
from nvlcore.plugins import NvlPluginManager, PluginInfo, get_plugin_manager, get_registry, set_plugin_manager
from nvlcore.registry import DuplicateNameError, Entry, Provenance, Registry, RegistryError, UnknownNameError

__version__ = "0.1.0"

__all__ = [
    "DuplicateNameError",
    "Entry",
    "NvlPluginManager",
    "PluginInfo",
    "Provenance",
    "Registry",
    "RegistryError",
    "UnknownNameError",
    "__version__",
    "get_plugin_manager",
    "get_registry",
    "hookimpl",
    "hookspec",
    "set_plugin_manager",
]
