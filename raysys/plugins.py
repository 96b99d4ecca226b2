"""Extensions from outside the package: a module that registers an objective, a downstream task or
a retrieval index backend, loaded by name before a command runs.

`raysys --plugin my_pkg.my_objective …` (repeatable) or `RAYSYS_PLUGINS=my_pkg.a,path/to/b.py`
imports each module once; its `@register(...)` decorators do the rest. A plugin is named on the
command line or in the environment, never in a YAML config: configs never execute code.
`load_plugins` also exports the list to `RAYSYS_PLUGINS`, so the Ray workers a command starts
(which inherit the driver's environment through `raysys.raycluster`) import the same plugins.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path

from raysys.config import ConfigError

ENV_VAR = "RAYSYS_PLUGINS"


def _import(spec: str) -> None:
    if spec.endswith(".py"):
        path = Path(spec).resolve()
        if not path.is_file():
            raise ConfigError(f"--plugin {spec}: no such file")
        name = f"raysys_plugin_{path.stem}"
        if name in sys.modules:
            return
        mod_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(mod_spec)
        sys.modules[name] = module
        mod_spec.loader.exec_module(module)
        return
    try:
        importlib.import_module(spec)
    except ModuleNotFoundError as e:
        raise ConfigError(f"--plugin {spec}: cannot import it ({e})") from None


def load_plugins(specs: list[str] | None = None) -> list[str]:
    """Import the plugins named in `specs` and in `RAYSYS_PLUGINS`; return the full list."""
    from_env = [s for s in os.environ.get(ENV_VAR, "").split(",") if s.strip()]
    names = list(dict.fromkeys([*from_env, *(str(Path(s).resolve()) if s.endswith(".py") else s for s in specs or [])]))
    for spec in names:
        _import(spec.strip())
    if names:
        os.environ[ENV_VAR] = ",".join(names)
    return names
