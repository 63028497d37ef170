"""Real-data pipeline: training from the decoded uint8 cache vs per-image Pillow decode + augment,
on a fake 2,000-image Fed-ISIC2019 tree (FLamby layout, JPEGs with short side 224) at 224 px.

Measured in one run: the one-time cost of building the cache (parallel decode) and of opening it
again; one data epoch (batches of 64 ready for the model: augmented, normalised) both ways,
median of ``repeats``; and one training epoch of ResNet-18 both ways. The Pillow path is the
reference's per-image pipeline (open the JPEG, flips, blur, rotation, resize, normalise) in the
training process, as a DataLoader with no workers; on this 2-core machine, worker processes
would compete with training for the same cores.
"""

from __future__ import annotations

import csv
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fedward.data import fed_isic2019
from fedward.data.augment import BatchAugment, reference_pil_transform
from fedward.engine.setup import configure_threads
from fedward.models import get_model

BATCH = 64
CLASSES = fed_isic2019.CLASS_NAMES


def make_tree(root: Path, n_images: int, seed: int = 0) -> None:
    """``root/ISIC_2019_Training_Input_preprocessed/*.jpg`` (224 x 224..300, smooth random
    content that compresses like a photo) and a ``train_test_split`` CSV (every 10th image test)."""
    rng = np.random.default_rng(seed)
    folder = root / "ISIC_2019_Training_Input_preprocessed"
    folder.mkdir(parents=True)
    rows = []
    for i in range(n_images):
        width = int(rng.integers(224, 301))
        coarse = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((width, 224), Image.Resampling.BICUBIC)
        noisy = np.clip(np.asarray(image, dtype=np.int16) + rng.integers(-12, 13, (224, width, 3)), 0, 255)
        name = f"ISIC_{i:07d}"
        Image.fromarray(noisy.astype(np.uint8)).save(folder / f"{name}.jpg", quality=90)
        label, centre = i % len(CLASSES), i % 6
        fold = "test" if (i // 6) % 10 == 0 else "train"  # a tenth of every centre
        rows.append([name, *["1.0" if c == label else "0.0" for c in range(8)], "0.0", label, centre, fold, f"{fold}_{centre}"])
    with open(root / "train_test_split", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", *CLASSES, "UNK", "target", "center", "fold", "fold2"])
        writer.writerows(rows)


def _timed(work) -> float:
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


def run(quick: bool = False) -> list[dict]:
    threads = configure_threads(1)
    n_images = 256 if quick else 2000
    repeats = 1 if quick else 2
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "isic"
        make_tree(root, n_images)
        cache = Path(tmp) / "cache"
        load = lambda: fed_isic2019.load(data_dir=root, image_size=224, val_fraction=0.0, cache_dir=cache,  # noqa: E731
                                         progress=False)
        build_s = _timed(load)
        data = None

        def reopen() -> None:
            nonlocal data
            data = load()

        reopen_s = _timed(reopen)
        images = torch.cat([split.images for c in data.clients for split in (c.train, c.test)])  # all, as PIL below
        paths = sorted((root / "ISIC_2019_Training_Input_preprocessed").glob("*.jpg"))
        augment = BatchAugment()

        def cache_batches():
            generator = torch.Generator().manual_seed(0)
            order = torch.randperm(len(images), generator=generator)
            for start in range(0, len(images) - BATCH + 1, BATCH):
                yield augment(images[order[start:start + BATCH]], generator)

        def pil_batches():
            rng = random.Random(0)
            order = list(range(len(paths)))
            rng.shuffle(order)
            for start in range(0, len(paths) - BATCH + 1, BATCH):
                batch = []
                for i in order[start:start + BATCH]:
                    with Image.open(paths[i]) as image:
                        batch.append(reference_pil_transform(image.convert("RGB"), 224, rng))
                yield torch.stack(batch)

        data_cache = statistics.median(_timed(lambda: [None for _ in cache_batches()]) for _ in range(repeats))
        data_pil = statistics.median(_timed(lambda: [None for _ in pil_batches()]) for _ in range(repeats))

        def train_epoch(batches, limit: int | None = None) -> float:
            """Seconds of one epoch (the model is built before the clock starts)."""
            torch.manual_seed(0)
            model = get_model("resnet18", num_classes=8, image_size=224)
            optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
            labels = torch.zeros(BATCH, dtype=torch.long)
            start = time.perf_counter()
            for step, batch in enumerate(batches):
                if limit is not None and step >= limit:
                    break
                loss = torch.nn.functional.cross_entropy(model(batch), labels)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            return time.perf_counter() - start

        train_epoch(cache_batches(), limit=2)  # warm-up: kernel selection and allocator, paid once
        train_cache = train_epoch(cache_batches())
        train_pil = train_epoch(pil_batches())
    row = {"bench": "real_data_cache", "n_images": n_images, "image_size": 224, "batch_size": BATCH,
           "cache_build_s": round(build_s, 2), "cache_reopen_s": round(reopen_s, 3),
           "data_epoch_cache_s_median": round(data_cache, 2), "data_epoch_pil_s_median": round(data_pil, 2),
           "data_epochs_per_s_cache": round(1 / data_cache, 3), "data_epochs_per_s_pil": round(1 / data_pil, 3),
           "data_speedup": round(data_pil / data_cache, 2),
           "train_epoch_cache_s": round(train_cache, 1), "train_epoch_pil_s": round(train_pil, 1),
           "train_speedup": round(train_pil / train_cache, 2), "repeats": repeats, "threads": threads}
    print(json.dumps(row), flush=True)
    return [row]


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    run(parser.parse_args().quick)
