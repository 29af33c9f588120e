"""Old import paths of modules that moved: the old module object IS the new one, with a DeprecationWarning."""
from __future__ import annotations

import importlib
import sys
import warnings


def alias_module(old: str, new: str) -> None:
    """Call from the module body at the old path `old`: binds `old` to the module `new` in sys.modules (so both
    paths give the same objects, private names and monkeypatching included) and warns the importing code."""
    module = importlib.import_module(new)
    # stacklevel 1: this function, 2: the old module's body, 3: its importer (warnings skips importlib's frozen
    # bootstrap frames itself); one more past importlib.import_module(old)
    level, frame = 3, sys._getframe(2)
    while frame is not None and frame.f_code.co_filename.startswith("<frozen importlib"):
        frame = frame.f_back
    while frame is not None and frame.f_code.co_filename == importlib.__file__:
        frame, level = frame.f_back, level + 1
    warnings.warn(f"{old} moved to {new} (the digits demo is apart from the NitroFusion API); import {new} "
                  f"instead, the old path will be removed", DeprecationWarning, stacklevel=level)
    sys.modules[old] = module
