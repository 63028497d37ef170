"""Plugins: Python files or modules imported before a run's settings are read, so that the methods,
data sets and models they register (``@register_method``, ``@register_dataset``,
``@register_model``) are known to the CLI, the simulation and every Flower node."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

from fedward.errors import ConfigError

_LOADED: dict[str, object] = {}


def load_plugins(specs: list[str] | tuple[str, ...]) -> None:
    """Import each ``path/to/file.py`` or ``dotted.module`` once per process."""
    for spec in specs:
        path = Path(spec)
        key = str(path.resolve()) if spec.endswith(".py") else spec
        if key in _LOADED:
            continue
        if spec.endswith(".py"):
            if not path.is_file():
                raise ConfigError(f"--plugins {spec}: no such file")
            name = f"fedward_plugin_{path.stem}"
            module_spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[name] = module
            try:
                module_spec.loader.exec_module(module)
            except Exception as err:
                del sys.modules[name]
                raise ConfigError(f"--plugins {spec} failed to import: {type(err).__name__}: {err}") from err
        else:
            try:
                module = importlib.import_module(spec)
            except ImportError as err:
                raise ConfigError(f"--plugins {spec}: cannot import it ({err})") from None
        _LOADED[key] = module
