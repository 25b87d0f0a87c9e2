"""Loading a script of the repository (a benchmark, an example) as a module, for its tests."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[1]


def load_script(path: Path, name: str) -> ModuleType:
    """The script at `path` run as module `name` (not registered in ``sys.modules``): its
    definitions, without what runs only under ``__main__``. Its directory is on ``sys.path``
    while it loads, as when it is run, for the modules beside it that it imports."""
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.parent))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(path.parent))
    return module
