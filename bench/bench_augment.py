"""Images per second: batched tensor augmentation (``BatchAugment``) vs the reference per-image
PIL pipeline (``reference_pil_transform``), on the same pixels, in the same run.

Both sides start from decoded images of the same size (no JPEG decode, no resize work beyond the
reference's own 224 -> 224 Resize), so this measures the augmentation ops alone. Prints one JSON
line per configuration.

    python bench/bench_augment.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

import numpy as np
import torch
from PIL import Image

from fedward.data.augment import BatchAugment, reference_pil_transform

BATCH_SIZE = 64


def _median_seconds(work, repeats: int) -> float:
    work()  # warm-up: first calls allocate and pick kernels
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        timings.append(time.perf_counter() - start)
    return statistics.median(timings)


def bench_one(image_size: int, n_images: int, repeats: int, seed: int = 0) -> dict:
    """Time both pipelines on the same ``n_images`` random images of ``image_size`` px."""
    pixels = torch.randint(0, 256, (n_images, 3, image_size, image_size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    pil_images = [Image.fromarray(np.ascontiguousarray(p.permute(1, 2, 0).numpy())) for p in pixels]
    augment = BatchAugment()

    def tensor_pass() -> None:
        generator = torch.Generator().manual_seed(seed)
        for start in range(0, n_images, BATCH_SIZE):
            augment(pixels[start : start + BATCH_SIZE], generator)

    def pil_pass() -> None:
        rng = random.Random(seed)
        # Per image, then stacked into batches, as a DataLoader's collate would.
        for start in range(0, n_images, BATCH_SIZE):
            torch.stack([reference_pil_transform(im, image_size, rng) for im in pil_images[start : start + BATCH_SIZE]])

    tensor_s = _median_seconds(tensor_pass, repeats)
    pil_s = _median_seconds(pil_pass, repeats)
    return {
        "bench": "augment",
        "image_size": image_size,
        "n_images": n_images,
        "tensor_img_per_s": round(n_images / tensor_s, 1),
        "pil_img_per_s": round(n_images / pil_s, 1),
        "speedup": round(pil_s / tensor_s, 2),
        "threads": torch.get_num_threads(),
    }


def run(quick: bool = False) -> list[dict]:
    """Both configurations (224 px and 64 px); ``quick`` uses fewer images and repeats."""
    n_images, repeats = (64, 3) if quick else (256, 5)
    results = []
    for image_size in (224, 64):
        result = bench_one(image_size, n_images, repeats)
        print(json.dumps(result), flush=True)
        results.append(result)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer images and repeats")
    run(parser.parse_args().quick)


if __name__ == "__main__":
    main()
