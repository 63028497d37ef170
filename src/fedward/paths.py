"""Where fedward keeps what it caches (decoded images, generated data sets, priors, Flower node state)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """``$FEDWARD_CACHE``, or ``~/.cache/fedward`` when it is unset."""
    return Path(os.environ.get("FEDWARD_CACHE") or Path.home() / ".cache" / "fedward")
