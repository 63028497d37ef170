"""Preprocess the raw ISIC 2019 JPEGs the way FLamby's ``resize_images.py`` does.

Each image is resized so its shorter side is 224 px with the aspect ratio kept (bilinear), then
colour-corrected with Shades-of-Gray (Minkowski norm ``p = 6``, no gamma), and written as a JPEG
with the same file name into ``ISIC_2019_Training_Input_preprocessed/``, the folder the Fed-ISIC2019
data set reads. The outputs stay rectangular: cropping happens at load time.

``prepare_isic2019`` is resumable: an output that already exists and is not empty is skipped, and
every output is written atomically (temporary file, then rename), so an interrupted run leaves no
half-written JPEG behind and a rerun only does the rest.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from fedward.errors import ConfigError, DataError

RAW_DIR = "ISIC_2019_Training_Input"  # the unzipped ISIC 2019 training JPEGs
PREPROCESSED_DIR = "ISIC_2019_Training_Input_preprocessed"  # what the Fed-ISIC2019 data set reads
JPEG_QUALITY = 95
MAX_LISTED = 20  # bad files named in an error message
MAX_WORKERS = 4  # default number of worker processes (fewer when the machine has fewer cores)


def shades_of_gray(image: np.ndarray, power: int = 6) -> np.ndarray:
    """Shades-of-Gray colour constancy (Finlayson & Trezzi 2004) of a uint8 (H, W, 3) RGB image.

    The illuminant estimate of channel c is the Minkowski ``power``-mean of its values,
    e_c = mean(I_c ** p) ** (1 / p). It is normalised to unit L2 norm, and each channel is divided
    by sqrt(3) * e_c / ||e||, so a neutral (gray) illuminant leaves the image unchanged. The
    reference notes do not spell out the normalisation; this is the common formulation of the
    ISIC colour-constancy code. Computed in float64, then rounded to the nearest integer and
    clipped to 0..255. A channel whose estimate is 0 is all zero and is left as it is.
    """
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise DataError(f"shades_of_gray expects a uint8 (H, W, 3) image, got {array.dtype} {array.shape}")
    if not isinstance(power, int) or isinstance(power, bool) or power < 1:
        raise ConfigError(f"the Shades-of-Gray power must be a positive integer, got {power!r}")
    pixels = array.astype(np.float64)
    if pixels.size == 0:
        return array.copy()
    illuminant = np.power(np.mean(np.power(pixels, power), axis=(0, 1)), 1.0 / power)
    norm = float(np.sqrt(np.sum(illuminant**2)))
    if norm == 0.0:  # an all-black image: nothing to correct
        return array.copy()
    scaled = illuminant / norm * math.sqrt(3.0)
    gain = np.divide(1.0, scaled, out=np.ones(3), where=scaled > 0)
    return np.clip(np.rint(pixels * gain), 0, 255).astype(np.uint8)


def resize_short_side(image: Image.Image, size: int) -> Image.Image:
    """RGB copy of ``image`` whose shorter side is ``size`` px, aspect kept, long side rounded to
    the nearest pixel (at least 1). Bilinear, as FLamby's ``resize_images.py``."""
    image = image.convert("RGB")
    width, height = image.size
    scale = size / min(width, height)
    new_size = (size, max(1, round(height * scale))) if width <= height else (max(1, round(width * scale)), size)
    if new_size == (width, height):
        return image
    return image.resize(new_size, Image.Resampling.BILINEAR)


def prepare_image(src: Path, dst: Path, size: int = 224, power: int = 6) -> None:
    """Read ``src``, resize its shorter side to ``size``, apply Shades-of-Gray with ``power`` and
    save a JPEG (quality 95) at ``dst`` atomically. Raises on an unreadable or truncated file."""
    src, dst = Path(src), Path(dst)
    with Image.open(src) as image:
        image.load()  # decode fully now: a truncated file fails here, not half-way through a resize
        resized = resize_short_side(image, size)
    corrected = shades_of_gray(np.asarray(resized, dtype=np.uint8), power)
    temporary = dst.with_suffix(".tmp.jpg")
    try:
        Image.fromarray(corrected).save(temporary, format="JPEG", quality=JPEG_QUALITY)
        os.replace(temporary, dst)  # atomic: a reader or a resumed run never sees a partial file
    finally:
        temporary.unlink(missing_ok=True)


def _prepare_one(src: Path, dst: Path, size: int, power: int) -> str | None:
    """Worker: prepare one file; None on success, else the reason it failed (never raises)."""
    try:
        prepare_image(src, dst, size, power)
    except Exception as error:  # any unreadable, truncated or odd file is reported at the end
        return f"{type(error).__name__}: {error}".strip()
    return None


def _bad_files_message(bad: list[tuple[Path, str]], src: Path, done: int, skipped: int) -> str:
    listed = "; ".join(f"{path.name} ({reason})" for path, reason in bad[:MAX_LISTED])
    more = f" (+{len(bad) - MAX_LISTED} more)" if len(bad) > MAX_LISTED else ""
    noun = "image" if len(bad) == 1 else "images"
    return (f"{len(bad)} {noun} in {src} could not be preprocessed: {listed}{more}; "
            f"the other {done + skipped} are written ({done} now, {skipped} already there)")  # fmt: skip


def prepare_isic2019(
    src: Path,
    dst: Path,
    *,
    size: int = 224,
    power: int = 6,
    workers: int | None = None,
    progress: bool = True,
) -> dict[str, int]:
    """Preprocess every ``*.jpg`` directly in ``src`` (sorted) into ``dst/<same name>.jpg``.

    Outputs that already exist and are not empty are skipped, so a rerun after an interruption
    only does the rest. Files that cannot be read do not stop the others: once every good file is
    written, ``DataError`` names the first 20 of them and gives their count. Returns the counts
    ``{"done": written now, "skipped": already there, "bad": 0}``.
    """
    src, dst = Path(src), Path(dst)
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ConfigError(f"size must be a positive integer, got {size!r}")
    if not isinstance(power, int) or isinstance(power, bool) or power < 1:
        raise ConfigError(f"power must be a positive integer, got {power!r}")
    if workers is None:
        workers = min(MAX_WORKERS, os.cpu_count() or 1)
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise ConfigError(f"workers must be a positive integer, got {workers!r}")
    if not src.is_dir():
        raise DataError(f"image folder {src} does not exist; expected the unzipped ISIC 2019 JPEGs ({RAW_DIR}/)")
    inputs = sorted(path for path in src.glob("*.jpg") if path.is_file())
    if not inputs:
        raise DataError(f"no *.jpg files in {src}; expected the unzipped ISIC 2019 JPEGs ({RAW_DIR}/)")
    if dst.resolve() == src.resolve():
        raise ConfigError(f"the output folder {dst} is the input folder; choose another (e.g. {PREPROCESSED_DIR}/)")
    dst.mkdir(parents=True, exist_ok=True)

    todo: list[Path] = []
    skipped = 0
    for path in inputs:
        target = dst / path.name
        try:
            already = target.is_file() and target.stat().st_size > 0
        except OSError:
            already = False
        if already:
            skipped += 1
        else:
            todo.append(path)

    bad: list[tuple[Path, str]] = []
    bar = tqdm(total=len(todo), desc="preprocessing images", unit="img", disable=not progress)
    if skipped:
        bar.set_postfix(skipped=skipped)
    try:
        if workers == 1 or len(todo) <= 1:
            for path in todo:
                reason = _prepare_one(path, dst / path.name, size, power)
                if reason is not None:
                    bad.append((path, reason))
                bar.update(1)
        else:
            pool = ProcessPoolExecutor(max_workers=min(workers, len(todo)))
            try:
                futures = {pool.submit(_prepare_one, path, dst / path.name, size, power): path for path in todo}
                for future in as_completed(futures):
                    reason = future.result()
                    if reason is not None:
                        bad.append((futures[future], reason))
                    bar.update(1)
            finally:
                pool.shutdown(wait=True, cancel_futures=True)  # on Ctrl-C, drop the files not started yet
    finally:
        bar.close()

    done = len(todo) - len(bad)
    if bad:
        bad.sort()
        raise DataError(_bad_files_message(bad, src, done, skipped))
    return {"done": done, "skipped": skipped, "bad": 0}
