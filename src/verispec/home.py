"""Where verispec keeps what it builds once per machine: converted models, compiled kernels, datastores.

`$VERISPEC_HOME`, default `~/.cache/verispec`. The lowest layer of the package: it imports nothing from verispec, so
kernels, drafters and the model store can all use it without importing each other.
"""

from __future__ import annotations

import os
from pathlib import Path

HOME_ENV = "VERISPEC_HOME"


def cache_root() -> Path:
    return Path(os.environ.get(HOME_ENV, Path.home() / ".cache" / "verispec"))
