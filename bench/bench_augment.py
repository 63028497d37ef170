"""Images per second: fedward's augmentation with each backend (``BatchAugment(backend="torch")``,
batched tensor ops; ``backend="opencv"``, OpenCV per image with the same drawn parameters) vs the
reference per-image PIL pipeline (``reference_pil_transform``) and, where kornia is installed (it
is not a fedward dependency), kornia's batched ops given the parameters fedward's generator drew
(``forward`` with explicit parameters: flips, ``gaussian_blur2d`` with per-image sigma, ``rotate``,
``normalize``; checked against the torch backend's output). Same pixels, same run, interleaved.
``--augment_backend auto`` picks opencv on a CPU from these numbers.

Both sides start from decoded images of the same size (no JPEG decode, no resize work beyond the
reference's own 224 -> 224 Resize), so this measures the augmentation ops alone. Prints one JSON
line per configuration.

    python bench/bench_augment.py [--quick]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import statistics
import time

import numpy as np
import torch
from PIL import Image

from fedward.data.augment import BatchAugment, reference_pil_transform

BATCH_SIZE = 64


def kornia_augment(augment: BatchAugment, images_uint8: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The reference transforms with kornia's batched ops, on the parameters ``augment`` draws."""
    import kornia

    params = augment.draw(len(images_uint8), generator)
    images = images_uint8.float() / 255.0
    images = torch.where(params["hflip"][:, None, None, None], images.flip(-1), images)
    images = torch.where(params["vflip"][:, None, None, None], images.flip(-2), images)
    sigma = params["sigma"][:, None].expand(-1, 2).contiguous()
    kernel = (augment.kernel_size[1], augment.kernel_size[0])  # kornia: (height, width)
    images = kornia.filters.gaussian_blur2d(images, kernel, sigma, border_type="reflect")
    images = kornia.geometry.transform.rotate(images, params["angle"])
    return kornia.enhance.normalize(images, torch.tensor(augment.mean), torch.tensor(augment.std))


def bench_one(image_size: int, n_images: int, repeats: int, seed: int = 0) -> dict:
    """Time both pipelines on the same ``n_images`` random images of ``image_size`` px."""
    pixels = torch.randint(0, 256, (n_images, 3, image_size, image_size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    pil_images = [Image.fromarray(np.ascontiguousarray(p.permute(1, 2, 0).numpy())) for p in pixels]
    backends = {name: BatchAugment(backend=name) for name in ("torch", "opencv")}

    def tensor_pass(name: str) -> None:
        generator = torch.Generator().manual_seed(seed)
        for start in range(0, n_images, BATCH_SIZE):
            backends[name](pixels[start : start + BATCH_SIZE], generator)

    def pil_pass() -> None:
        rng = random.Random(seed)
        # Per image, then stacked into batches, as a DataLoader's collate would.
        for start in range(0, n_images, BATCH_SIZE):
            torch.stack([reference_pil_transform(im, image_size, rng) for im in pil_images[start : start + BATCH_SIZE]])

    passes = {"torch": lambda: tensor_pass("torch"), "opencv": lambda: tensor_pass("opencv"), "pil": pil_pass}
    agreement = {}
    if importlib.util.find_spec("kornia") is not None:
        augment = backends["torch"]

        def kornia_pass() -> None:
            generator = torch.Generator().manual_seed(seed)
            for start in range(0, n_images, BATCH_SIZE):
                kornia_augment(augment, pixels[start : start + BATCH_SIZE], generator)

        passes["kornia"] = kornia_pass
        batch = pixels[:BATCH_SIZE]
        agreement["kornia_max_abs_diff_vs_torch"] = float(
            (kornia_augment(augment, batch, torch.Generator().manual_seed(seed))
             - augment(batch, torch.Generator().manual_seed(seed))).abs().max())
    timings: dict[str, list[float]] = {name: [] for name in passes}
    for work in passes.values():
        work()  # warm-up: first calls allocate and pick kernels
    for _ in range(repeats):  # interleaved, so that a change in the machine's load hits all three alike
        for name, work in passes.items():
            start = time.perf_counter()
            work()
            timings[name].append(time.perf_counter() - start)
    seconds = {name: statistics.median(values) for name, values in timings.items()}
    return {
        "bench": "augment",
        "image_size": image_size,
        "n_images": n_images,
        "torch_img_per_s": round(n_images / seconds["torch"], 1),
        "opencv_img_per_s": round(n_images / seconds["opencv"], 1),
        "pil_img_per_s": round(n_images / seconds["pil"], 1),
        **({"kornia_img_per_s": round(n_images / seconds["kornia"], 1)} if "kornia" in seconds else {}),
        **{k: round(v, 6) for k, v in agreement.items()},
        "opencv_over_torch": round(seconds["torch"] / seconds["opencv"], 2),
        "threads": torch.get_num_threads(),
    }


def run(quick: bool = False) -> list[dict]:
    """Three sizes (224, 64 and 32 px); ``quick`` uses fewer images and repeats."""
    n_images, repeats = (64, 3) if quick else (256, 5)
    results = []
    for image_size in (224, 64, 32):
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
