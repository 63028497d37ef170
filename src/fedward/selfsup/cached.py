"""The self-trained prior behind ``--pre_trained_models auto``: a MoCo-v2 ResNet-18 trained by
fedward on the built-in data set's public split when no MoCo-v2 checkpoint is present, once per
image size, cached in ``$FEDWARD_CACHE/priors``.

ResNet-18 rather than MoCo's ResNet-50 keeps its training to a few minutes on a laptop CPU (and
its 512-d features make every Fed-MAS step cheaper); ``fedward prior train --arch resnet50``
trains the faithful architecture.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, replace
from pathlib import Path

from fedward.selfsup.moco import MocoSettings, train_moco

PUBLIC_IMAGES = 3072
# The synthetic world of the default --data_seed 0; the public split draws from its own random
# streams, which no client split uses. The same prior serves runs of every --seed.
PUBLIC_SEED = 0


def moco_v2_settings(image_size: int) -> MocoSettings:
    """MoCo-v2's recipe (aug+) at the cached prior's size and budget: what it started from."""
    return MocoSettings(arch="resnet18", image_size=image_size, epochs=10, seed=0)


# What the cached prior changes in MoCo-v2's recipe, measured by bench/bench_prior.py (docs/results.md):
# no colour jitter or greyscale (they erase the colour that separates the synthetic classes), crops of
# at least half the image, and a queue of 256 keys (a queue of half the 3,072 images holds a stale key
# of about every second image of the batch as a negative, and MoCo's loss rose after epoch 4). kNN
# 0.547 and linear probe 0.526 against 0.503 and 0.492 untrained; MoCo-v2's recipe: 0.430 and 0.472.
PRIOR_CHANGES = {"jitter_p": 0.0, "grayscale_p": 0.0, "crop_min": 0.5, "queue_size": 256}


def cached_prior_settings(image_size: int) -> MocoSettings:
    return replace(moco_v2_settings(image_size), **PRIOR_CHANGES)


def cached_prior_path(image_size: int) -> Path:
    from fedward.priors import default_prior_dir

    key = {"settings": asdict(cached_prior_settings(image_size)), "public_images": PUBLIC_IMAGES,
           "public_seed": PUBLIC_SEED, "generator": _generator_version()}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]
    return default_prior_dir() / f"selfsup-moco-v2-resnet18-{image_size}px-{digest}.pth.tar"


def _generator_version() -> int:
    from fedward.data.synthetic import GENERATOR_VERSION

    return GENERATOR_VERSION


def ensure_cached_prior(image_size: int, *, progress: bool = True) -> Path:
    """Train the cached prior unless it is there. Training writes ``<file>.training`` after every
    epoch (an interrupted training resumes from it) and renames it when complete."""
    from fedward.data.synthetic import public_split
    from fedward.engine.setup import notice

    path = cached_prior_path(image_size)
    if path.is_file():
        return path
    settings = cached_prior_settings(image_size)
    partial = path.with_name(path.name + ".training")
    notice(f"no MoCo-v2 checkpoint found (`fedward prior download moco` fetches it); training a self-supervised "
           f"MoCo-v2 {settings.arch} prior on {PUBLIC_IMAGES} public images of the built-in data set, "
           f"{settings.epochs} epochs (no colour jitter, crops of at least half the image, a queue of "
           f"{settings.queue_size}), once; cached at {path}")
    images = public_split(seed=PUBLIC_SEED, image_size=image_size, count=PUBLIC_IMAGES)
    path.parent.mkdir(parents=True, exist_ok=True)
    summary = train_moco(images.images, settings, partial, labels=images.labels, source="synthetic public split",
                         resume=partial.exists(), progress=progress, log=notice)
    os.replace(partial, path)
    notice(f"self-supervised prior ready: kNN accuracy of its features {summary['knn_before']:.3f} (random init) "
           f"-> {summary['knn_after']:.3f}")
    return path
