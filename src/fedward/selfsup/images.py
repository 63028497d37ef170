"""A folder of unlabelled images as one uint8 tensor, for self-supervised prior training."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from fedward.errors import DataError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"}
MAX_FILES_IN_ERROR = 20


def square_resize(image: Image.Image, size: int) -> np.ndarray:
    """Resize the short side to ``size`` (aspect kept, bicubic), then centre-crop to size x size."""
    image = image.convert("RGB")
    width, height = image.size
    scale = size / min(width, height)
    resized = image.resize((max(size, round(width * scale)), max(size, round(height * scale))), Image.BICUBIC)
    left, top = (resized.width - size) // 2, (resized.height - size) // 2
    return np.asarray(resized.crop((left, top, left + size, top + size)), dtype=np.uint8)


def read_image_folder(folder: str | Path, image_size: int, *, progress: bool = True) -> torch.Tensor:
    """Every image under ``folder`` (recursively, sorted by path) as (N, 3, S, S) uint8.

    Unreadable files stop the read with the list of offending files (first 20 and a count).
    """
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist or is not a folder")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise DataError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found under {root}")
    images, bad = np.empty((len(files), image_size, image_size, 3), dtype=np.uint8), []
    for i, path in enumerate(tqdm(files, desc="reading images", unit="img", disable=not progress)):
        try:
            with Image.open(path) as image:
                images[i] = square_resize(image, image_size)
        except Exception as error:  # PIL raises many types for truncated or non-image files
            bad.append(f"{path} ({type(error).__name__}: {error})")
    if bad:
        shown = "; ".join(bad[:MAX_FILES_IN_ERROR])
        more = f" (+{len(bad) - MAX_FILES_IN_ERROR} more)" if len(bad) > MAX_FILES_IN_ERROR else ""
        raise DataError(f"{len(bad)} unreadable image(s) under {root}: {shown}{more}")
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
