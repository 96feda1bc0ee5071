"""The method script a wiring test file imports: by default the repository's; with <NAME>_UNDER_TEST=/path/to/copy.py
(e.g. CSD_UNDER_TEST) a copy of it with a planted bug, so that a test's docstring claim "catches X" can be checked."""
import importlib
import importlib.util
import os
import sys


def load(name):
    path = os.environ.get(f"{name.upper()}_UNDER_TEST")
    if not path:
        return importlib.import_module(name)
    spec = importlib.util.spec_from_file_location(f"{name}_under_test", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[f"{name}_under_test"] = mod
    spec.loader.exec_module(mod)
    return mod
