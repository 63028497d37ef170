"""Minibatches straight from a cached uint8 split, without DataLoader workers.

Matches the reference loaders: training shuffles and drops the last incomplete batch, evaluation
keeps the order and every sample. (With ``drop_last`` a split smaller than one batch gives no
batch at all, exactly as a torch DataLoader would.)
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from fedward.data.types import Split
from fedward.errors import ConfigError


def batch_indices(
    n: int,
    batch_size: int,
    generator: torch.Generator | None,
    *,
    shuffle: bool = True,
    drop_last: bool = True,
) -> list[torch.Tensor]:
    """Index tensors (int64) of the minibatches over ``n`` samples.

    ``shuffle`` draws one permutation from ``generator`` (required then: no global RNG).
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    if n < 0:
        raise ValueError(f"number of samples must be >= 0, got {n}")
    if shuffle:
        if generator is None:
            raise ValueError("batch_indices(shuffle=True) needs a torch.Generator")
        order = torch.randperm(n, generator=generator, device=generator.device).cpu()
    else:
        order = torch.arange(n)
    stop = (n // batch_size) * batch_size if drop_last else n
    return [order[start : min(start + batch_size, stop)] for start in range(0, stop, batch_size)]


def iterate_split(
    split: Split,
    batch_size: int,
    generator: torch.Generator | None = None,
    *,
    shuffle: bool = False,
    drop_last: bool = False,
    device: str | torch.device | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (images_uint8, labels) minibatches of ``split``, moved to ``device`` if given.

    The defaults are the evaluation loader's; pass ``shuffle=True, drop_last=True`` and a generator
    for training.
    """
    for index in batch_indices(len(split), batch_size, generator, shuffle=shuffle, drop_last=drop_last):
        images, labels = split.images[index], split.labels[index]
        if device is not None:
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
        yield images, labels
