"""Per-(seed, round, client) random generators.

Every random draw in a client's work comes from a generator derived from (seed, round, client,
purpose), never from a shared global stream. A client's work therefore does not depend on the
order clients run in, and a resumed run draws exactly what an uninterrupted one would.
"""

from __future__ import annotations

import hashlib
import random

import numpy as np
import torch

SERVER = -1  # the "client id" used for server-side draws


def derive_seed(seed: int, *keys: int | str) -> int:
    """A 63-bit seed derived from ``seed`` and any number of keys, stable across runs and platforms."""
    text = "/".join(str(k) for k in (seed, *keys))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") & ((1 << 63) - 1)


def torch_generator(seed: int, *keys: int | str, device: str | torch.device = "cpu") -> torch.Generator:
    """A torch generator seeded from ``derive_seed(seed, *keys)``."""
    gen = torch.Generator(device=device)
    gen.manual_seed(derive_seed(seed, *keys))
    return gen


def numpy_generator(seed: int, *keys: int | str) -> np.random.Generator:
    """A numpy generator seeded from ``derive_seed(seed, *keys)``."""
    return np.random.default_rng(derive_seed(seed, *keys))


def seed_globals(seed: int, *keys: int | str) -> None:
    """Seed torch's, numpy's and Python's global streams (for library code that draws from them,
    e.g. parameter initialisation)."""
    value = derive_seed(seed, *keys)
    torch.manual_seed(value)
    np.random.seed(value % (2**32))
    random.seed(value)
