"""Fed-MAS's premise on the built-in data: hospitals differ in intra-class appearance, and a shared
prior measures that difference consistently.

For each data seed (a synthetic world: the class appearance modes and each hospital's mixture over
them change with it; the hospitals' skin populations and acquisition do not) and each prior, the
divergence of hospital k's class c from the same class elsewhere, in the prior's feature space:

    d_kc = 1 - cos(mean f(x) over k's class-c train images, mean f(x) over the other hospitals')

for every (k, c) with at least ``--min_images`` images on both sides. Reported per prior:
- spread: the coefficient of variation of d_kc over the hospitals of a class (0 = every hospital
  is as far from the rest: nothing for MAS to weigh), the median over classes and seeds;
- consistency: the Spearman correlation of a class's d_kc over hospitals between two data seeds,
  the median over classes and seed pairs (what part of the ranking the fixed acquisition explains),
  and between the two halves of one seed's images (sampling noise alone: the ceiling).

Usage: python bench/bench_premise.py --prior random --prior FILE [--seeds 0 1 2 3 4] [--data_scale 0.3]
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr

from fedward.config import build_config
from fedward.data.augment import IMAGENET_MEAN, IMAGENET_STD, normalize
from fedward.engine.setup import load_data
from fedward.priors import load_prior


@torch.no_grad()
def embed(prior, images: torch.Tensor) -> torch.Tensor:
    return torch.cat([F.normalize(prior(normalize(images[i:i + 256], IMAGENET_MEAN, IMAGENET_STD)), dim=1)
                      for i in range(0, len(images), 256)])


def divergences(features: list[torch.Tensor], labels: list[torch.Tensor], num_classes: int,
                min_images: int) -> np.ndarray:
    """(clients, classes) d_kc, NaN where a side has fewer than ``min_images`` images."""
    out = np.full((len(features), num_classes), np.nan)
    for c in range(num_classes):
        for k in range(len(features)):
            own = features[k][labels[k] == c]
            rest = torch.cat([f[l == c] for j, (f, l) in enumerate(zip(features, labels)) if j != k])
            if len(own) >= min_images and len(rest) >= min_images:
                out[k, c] = 1.0 - float(F.cosine_similarity(own.mean(0), rest.mean(0), dim=0))
    return out


def rank_agreement(a: np.ndarray, b: np.ndarray) -> list[float]:
    """Spearman correlation per class over the hospitals both have (at least 3)."""
    values = []
    for c in range(a.shape[1]):
        both = ~np.isnan(a[:, c]) & ~np.isnan(b[:, c])
        if both.sum() >= 3:
            values.append(float(spearmanr(a[both, c], b[both, c]).statistic))
    return values


def spread(d: np.ndarray) -> list[float]:
    values = []
    for c in range(d.shape[1]):
        column = d[~np.isnan(d[:, c]), c]
        if len(column) >= 2 and column.mean() > 0:
            values.append(float(column.std() / column.mean()))
    return values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prior", action="append", required=True, help="random, or a prior checkpoint (repeatable)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--data_scale", type=float, default=0.3)
    parser.add_argument("--image_size", type=int, default=32)
    parser.add_argument("--min_images", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("runs/bench-premise"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    worlds = []
    for seed in args.seeds:
        cfg = build_config({"image_size": args.image_size, "data_scale": args.data_scale, "data_seed": seed,
                            "progress": False})
        worlds.append(load_data(cfg))
    lines = [f"Built-in data, {args.image_size} px, data_scale {args.data_scale}, data seeds {args.seeds}; "
             f"d_kc over (hospital, class) cells with at least {args.min_images} images on both sides.", "",
             "| prior | spread of d_kc over hospitals (median CV) | rank agreement across data seeds (median rho) "
             "| rank agreement between halves of one seed (median rho) |", "| --- | --- | --- | --- |"]
    for name in args.prior:
        prior = load_prior(name, image_size=args.image_size)
        per_seed, halves = [], []
        for data in worlds:
            clients = data.clients
            features = [embed(prior, c.train.images) for c in clients]
            labels = [c.train.labels for c in clients]
            per_seed.append(divergences(features, labels, data.num_classes, args.min_images))
            first = divergences([f[0::2] for f in features], [l[0::2] for l in labels], data.num_classes,
                                args.min_images)
            second = divergences([f[1::2] for f in features], [l[1::2] for l in labels], data.num_classes,
                                 args.min_images)
            halves += rank_agreement(first, second)
        across = [r for a, b in itertools.combinations(per_seed, 2) for r in rank_agreement(a, b)]
        spreads = [s for d in per_seed for s in spread(d)]
        label = name if name == "random" else Path(name).name
        lines.append(f"| {label} | {np.median(spreads):.2f} | {np.median(across):.2f} | {np.median(halves):.2f} |")
        print(lines[-1], flush=True)
        np.save(args.out / f"divergence-{label}.npy", np.stack(per_seed))
    text = "\n".join(lines) + "\n"
    (args.out / "premise.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
