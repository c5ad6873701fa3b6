"""Plugins: user modules imported before a recipe loads, so the losses (or detector families) they register exist.

``tools/train_distill.py --plugin my_losses.py`` (or a dotted module name, ``--plugin mypkg.losses``) imports the
module, which calls :func:`detkd.losses.register_feature_loss` / :func:`detkd.losses.register_head_loss` (or
:func:`detkd.models.families.register_family`) at import time. The recipe can then name what it registered. Only
the modules named on the command line are imported: a recipe never imports code.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

from detkd.errors import ConfigError

__all__ = ["load_plugins"]


def load_plugins(specs: Sequence[str]) -> list[ModuleType]:
    """Import every plugin in ``specs``: a path to a ``.py`` file, or a dotted module name on ``sys.path``.

    A file is imported under its stem as module name (once: a second call returns the same module), with its folder
    on ``sys.path`` so its own imports resolve.

    Raises:
        ConfigError: a file that does not exist or a module that cannot be found (naming it).
    """
    modules = []
    for spec in specs:
        if spec.endswith(".py") or "/" in spec or "\\" in spec:
            path = Path(spec).resolve()
            if not path.is_file():
                raise ConfigError(f"--plugin {spec}: no such file.")
            name = path.stem
            if name in sys.modules and getattr(sys.modules[name], "__file__", None) == str(path):
                modules.append(sys.modules[name])
                continue
            if str(path.parent) not in sys.path:
                sys.path.insert(0, str(path.parent))
            module_spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[name] = module
            module_spec.loader.exec_module(module)
            modules.append(module)
        else:
            try:
                modules.append(importlib.import_module(spec))
            except ModuleNotFoundError as err:
                hint = "give a dotted module name on sys.path or the path of a .py file"
                raise ConfigError(f"--plugin {spec}: module not found ({err}); {hint}.") from err
    return modules
