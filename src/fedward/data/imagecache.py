"""Decode image files once into a fixed-size uint8 cache.

``decode_images`` turns a list of image files into a uint8 (N, 3, S, S) tensor. With a
``cache_dir`` the pixels go to a memory-mapped file ``<cache_dir>/<key>.u8`` (plus a small JSON
sidecar ``<key>.json``) whose key covers every path's size and modification time and the settings,
so a later call with the same files and settings decodes nothing at all, and a changed file or
setting gives a new cache. Files that cannot be read are an error unless ``skip_bad`` is set, in
which case they are left out and reported, never dropped silently.

Images are decoded with Pillow, except DICOM files (``.dcm``/``.dicom``, any case), which are read
with the optional ``pydicom`` (``pip install "fedward[dicom]"``); see ``read_dicom``.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from fedward.paths import cache_root
from fedward.errors import ConfigError, DataError

# Bump whenever a change alters the decoded pixels or the file format: it is part of the cache key.
CACHE_FORMAT_VERSION = 1
PREPROCESSES = ("resize", "square")  # "square": whole image to size x size, aspect ignored
MAX_LISTED = 20  # bad files named in an error message
MAX_WORKERS = 8  # decoding threads (Pillow releases the GIL while decoding and resizing)
DICOM_SUFFIXES = (".dcm", ".dicom")  # read with pydicom, not Pillow (any case)
DICOM_INSTALL = 'pip install "fedward[dicom]" (or pip install pydicom)'


@dataclass
class DecodedImages:
    """``images`` uint8 (len(kept), 3, S, S); ``kept`` the indices of the input paths they come
    from (ascending); ``bad`` (path, reason) for every input that could not be read."""

    images: torch.Tensor
    kept: list[int]
    bad: list[tuple[Path, str]] = field(default_factory=list)
    cache_file: Path | None = None


def resize_center_crop(image: Image.Image, size: int) -> np.ndarray:
    """The "resize" preprocessing: shorter side to ``size`` (bicubic, aspect kept), centre crop
    ``size`` x ``size``, RGB. Returns uint8 (3, size, size)."""
    image = image.convert("RGB")
    width, height = image.size
    scale = size / min(width, height)
    new_width, new_height = max(size, round(width * scale)), max(size, round(height * scale))
    image = image.resize((new_width, new_height), Image.Resampling.BICUBIC)
    left, top = (new_width - size) // 2, (new_height - size) // 2
    image = image.crop((left, top, left + size, top + size))
    return np.asarray(image, dtype=np.uint8).transpose(2, 0, 1)


def resize_square(image: Image.Image, size: int) -> np.ndarray:
    """The "square" preprocessing: the whole image resized to ``size`` x ``size`` (bicubic, aspect
    ratio ignored, nothing cropped), RGB. Returns uint8 (3, size, size)."""
    image = image.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(image, dtype=np.uint8).transpose(2, 0, 1)


def is_dicom(path: Path) -> bool:
    """Whether ``path`` is read as DICOM: its suffix is ``.dcm`` or ``.dicom`` (any case)."""
    return Path(path).suffix.lower() in DICOM_SUFFIXES


def _import_pydicom(path: Path | None = None):
    """The ``pydicom`` module, or ``DataError`` naming ``path`` and the install command."""
    try:
        import pydicom
        import pydicom.errors  # noqa: F401
        import pydicom.pixels  # noqa: F401 (pydicom >= 3)
    except ImportError as error:
        what = f"DICOM file {path}" if path is not None else "DICOM files"
        raise DataError(f"reading {what} needs pydicom >= 3, which is not installed ({error}); {DICOM_INSTALL}") from error
    return pydicom


def _dicom_signature() -> list:
    """What a decoded DICOM image depends on besides the file: the pydicom version and the
    compressed transfer syntaxes it can decode here (installing a decoder gives a new cache)."""
    pydicom = _import_pydicom()
    from pydicom.pixels import get_decoder
    from pydicom.uid import AllTransferSyntaxes

    decodable = []
    for uid in AllTransferSyntaxes:
        try:
            if uid.is_compressed and get_decoder(uid).is_available:
                decodable.append(str(uid))
        except Exception:  # no decoder for this syntax at all
            continue
    return ["dicom", pydicom.__version__, sorted(decodable)]


def _to_uint8(values: np.ndarray) -> np.ndarray:
    """Linear min/max scaling to uint8: ``rint((v - min) / (max - min) * 255)``; a constant image
    gives zeros."""
    values = values.astype(np.float64, copy=False)
    if not np.isfinite(values).all():
        raise ValueError("pixel values are not all finite")
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return np.zeros(values.shape, dtype=np.uint8)
    return np.rint((values - low) / (high - low) * 255.0).astype(np.uint8)


def _bits_to_uint8(values: np.ndarray, bits: int) -> np.ndarray:
    """Colour values of ``bits`` bits to uint8 (8 bits: unchanged), the range 0..2**bits - 1 to 0..255."""
    if values.dtype == np.uint8 and bits >= 8:
        return np.ascontiguousarray(values)
    top = float(2 ** max(1, bits) - 1)
    return np.rint(np.clip(values.astype(np.float64), 0, top) / top * 255.0).astype(np.uint8)


def read_dicom(path: Path) -> Image.Image:
    """Read one DICOM file into a Pillow image ("L" for grayscale, "RGB" for colour).

    The pixel data is decoded by pydicom (uncompressed transfer syntaxes, and the compressed ones
    for which a pydicom decoder is installed; any other is an error naming the transfer syntax). A
    bare data set without the DICOM file header is read too, its transfer syntax taken from its
    encoding. Only the FIRST frame of a multi-frame file is read.

    Grayscale: the modality LUT (RescaleSlope/Intercept or a Modality LUT) and then the VOI LUT or
    window (WindowCenter/Width, the first one when several) are applied when present,
    ``MONOCHROME1`` is inverted so that bright is always high, and the result is scaled linearly to
    0..255 by its own min and max (a constant image gives zeros). Colour (kept, not stretched):
    pydicom converts YBR to RGB; 8-bit RGB is used as is, deeper RGB is scaled from its BitsStored
    range to 0..255; ``PALETTE COLOR`` goes through its palette, scaled from the palette's range.
    Raises on any unreadable file.
    """
    pydicom = _import_pydicom(path)
    from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, get_decoder, pixel_array
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    try:
        ds = pydicom.dcmread(path)
    except pydicom.errors.InvalidDicomError:
        # No preamble / file meta (a bare data set, as some older exports write): read it anyway,
        # take the transfer syntax from the encoding found, and accept it only with pixel data.
        try:
            ds = pydicom.dcmread(path, force=True)
        except Exception:
            ds = None
        if ds is None or "PixelData" not in ds:
            raise ValueError("not a DICOM file (no DICOM file meta information / 'DICM' prefix)") from None
        if "TransferSyntaxUID" not in ds.file_meta:
            syntaxes = {(True, True): ImplicitVRLittleEndian, (False, True): ExplicitVRLittleEndian,
                        (False, False): ExplicitVRBigEndian}  # fmt: skip
            syntax = syntaxes.get(tuple(ds.original_encoding))
            if syntax is not None:
                ds.file_meta.TransferSyntaxUID = syntax
    if "PixelData" not in ds:
        raise ValueError("DICOM file has no pixel data (PixelData)")
    syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if syntax is None:
        raise ValueError("DICOM file has no transfer syntax (0002,0010) in its file meta information")
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        raise ValueError(f"transfer syntax {syntax.name} ({syntax}) is not supported by pydicom") from None
    if not decoder.is_available:
        missing = "; ".join(decoder.missing_dependencies) or "no decoder plugin"
        raise ValueError(f"compressed transfer syntax {syntax.name} ({syntax}) needs a pixel data decoder that is "
                         f"not installed ({missing})")  # fmt: skip
    try:
        pixels = pixel_array(ds, index=0)  # the first frame only
    except Exception as error:
        raise ValueError(f"cannot decode the pixel data ({syntax.name}): {type(error).__name__}: {error}") from error
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if photometric == "PALETTE COLOR":
        colours = apply_color_lut(pixels, ds)
        return Image.fromarray(_bits_to_uint8(colours, 8 * colours.dtype.itemsize), "RGB")
    if samples == 3:
        return Image.fromarray(_bits_to_uint8(pixels, int(ds.get("BitsStored", 8 * pixels.dtype.itemsize))), "RGB")
    if samples != 1 or pixels.ndim != 2:
        raise ValueError(f"unsupported DICOM pixel layout: SamplesPerPixel {samples}, array shape {pixels.shape}")
    values = apply_modality_lut(pixels, ds)
    values = apply_voi_lut(values, ds, index=0)  # unchanged when there is no VOI LUT or window
    values = values.astype(np.float64)
    if photometric == "MONOCHROME1":
        values = -values  # minimum is white: invert, so scaling maps it to 255
    return Image.fromarray(_to_uint8(values), "L")


def _preprocess(image: Image.Image, size: int, preprocess: str) -> np.ndarray:
    return resize_square(image, size) if preprocess == "square" else resize_center_crop(image, size)


def decode_one(path: Path, size: int, preprocess: str) -> np.ndarray:
    """Open, fully decode and preprocess one image file (raises on any unreadable file). DICOM
    files are read by ``read_dicom``, every other file by Pillow; the preprocessing is the same."""
    if is_dicom(path):
        return _preprocess(read_dicom(path), size, preprocess)
    with Image.open(path) as image:
        if image.format == "JPEG":
            # libjpeg downscales by 1/2, 1/4 or 1/8 while decoding, keeping both sides >= size:
            # several times faster on full-size photographs; the bicubic resize does the rest.
            image.draft("RGB", (size, size))
        image.load()
        return _preprocess(image, size, preprocess)


def _file_stamp(path: Path) -> list:
    resolved = Path(path).resolve()
    try:
        stat = resolved.stat()
    except OSError:
        return [str(resolved), None, None]
    return [str(resolved), stat.st_size, stat.st_mtime_ns]


def cache_key(paths: list[Path], image_size: int, preprocess: str) -> str:
    """sha256 over the format version, settings, and every file's resolved path, size and mtime;
    when a path is a DICOM file, also over the pydicom version and its installed decoders."""
    digest = hashlib.sha256()
    digest.update(json.dumps([CACHE_FORMAT_VERSION, image_size, preprocess]).encode())
    if any(is_dicom(path) for path in paths):
        digest.update(json.dumps(_dicom_signature()).encode())
    for path in paths:
        digest.update(b"\n" + json.dumps(_file_stamp(path)).encode())
    return digest.hexdigest()[:32]


def bad_images_message(bad: list[tuple[Path, str]]) -> str:
    """One line naming the first ``MAX_LISTED`` unreadable files, their reasons, and the way out."""
    parents = {Path(p).parent for p, _ in bad}
    common = parents.pop() if len(parents) == 1 else None
    listed = "; ".join(f"{Path(p).name if common else p} ({reason})" for p, reason in bad[:MAX_LISTED])
    more = f" (+{len(bad) - MAX_LISTED} more)" if len(bad) > MAX_LISTED else ""
    where = f" in {common}" if common else ""
    noun = "image" if len(bad) == 1 else "images"
    return f"{len(bad)} {noun} could not be read{where}: {listed}{more}; pass --skip_bad_images to skip them"


def _decode_into(target: np.ndarray, paths: list[Path], size: int, preprocess: str, progress: bool) -> dict[int, str]:
    """Decode every path into ``target[i]``; returns {index: reason} for the files that failed."""
    failures: dict[int, str] = {}

    def work(index: int) -> None:
        path = paths[index]
        if not Path(path).is_file():
            failures[index] = "missing file"
            return
        try:
            target[index] = decode_one(path, size, preprocess)
        except Exception as error:  # any unreadable, truncated or odd file is reported, not fatal here
            failures[index] = f"{type(error).__name__}: {error}".strip()

    workers = max(1, min(MAX_WORKERS, os.cpu_count() or 1, len(paths)))
    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        with tqdm(total=len(paths), desc="decoding images", unit="img", disable=not progress, leave=False) as bar:
            for future in as_completed([pool.submit(work, i) for i in range(len(paths))]):
                future.result()
                bar.update(1)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # on Ctrl-C, drop the files not started yet
    return failures


def _read_cache(cache_dir: Path, key: str, count: int, size: int) -> DecodedImages | None:
    """The cached result for ``key``, or None when there is no complete cache."""
    sidecar, data = cache_dir / f"{key}.json", cache_dir / f"{key}.u8"
    if not (sidecar.is_file() and data.is_file()):
        return None
    try:
        meta = json.loads(sidecar.read_text())
        kept = [int(i) for i in meta["kept"]]
        shape = (len(kept), 3, size, size)
        if meta["count"] != count or tuple(meta["shape"]) != shape or data.stat().st_size != int(np.prod(shape)):
            raise ValueError("size mismatch")
        bad = [(Path(p), str(reason)) for p, reason in meta["bad"]]
    except Exception as error:  # an unreadable or mismatched cache is rebuilt, never fatal
        warnings.warn(f"image cache {sidecar} is unreadable ({type(error).__name__}); rebuilding it", RuntimeWarning, stacklevel=3)
        return None
    if shape[0] == 0:
        images = np.zeros(shape, dtype=np.uint8)
    else:
        # Copy-on-write mapping: the file is opened read-only; an in-place write stays in memory.
        images = np.memmap(data, dtype=np.uint8, mode="c", shape=shape)
    return DecodedImages(torch.from_numpy(images), kept, bad, data)


def _build_cache(cache_dir: Path, key: str, paths: list[Path], size: int, preprocess: str, *, keep_bad: bool,
                 progress: bool) -> list[tuple[Path, str]]:  # fmt: skip
    """Decode every path into ``<key>.u8`` (bad files left out) and write the ``<key>.json`` sidecar.

    Returns the bad files. With bad files and not ``keep_bad`` nothing is written: a failure is only
    remembered once the caller has chosen to skip it, so a fixed file is always tried again.
    """
    cache_dir.mkdir(parents=True, exist_ok=True)
    full = cache_dir / f"{key}.all.{os.getpid()}.tmp"
    temporary = cache_dir / f"{key}.u8.{os.getpid()}.tmp"
    try:
        slots = np.memmap(full, dtype=np.uint8, mode="w+", shape=(len(paths), 3, size, size)) if paths else None
        failures = _decode_into(slots, paths, size, preprocess, progress) if paths else {}
        bad = [(paths[i], failures[i]) for i in sorted(failures)]
        if bad and not keep_bad:
            return bad
        kept = [i for i in range(len(paths)) if i not in failures]
        if kept and not failures:
            slots.flush()
            del slots
            os.replace(full, temporary)
        elif kept:  # compact: the cache holds only the images that decoded, in input order
            compact = np.memmap(temporary, dtype=np.uint8, mode="w+", shape=(len(kept), 3, size, size))
            for start in range(0, len(kept), 256):
                compact[start : start + 256] = slots[kept[start : start + 256]]
            compact.flush()
            del compact, slots
        else:
            temporary.write_bytes(b"")
        os.replace(temporary, cache_dir / f"{key}.u8")  # atomic: a reader never sees a partial file
        meta = {"version": CACHE_FORMAT_VERSION, "count": len(paths), "shape": [len(kept), 3, size, size],
                "preprocess": preprocess, "kept": kept, "bad": [[str(p), reason] for p, reason in bad]}  # fmt: skip
        sidecar = cache_dir / f"{key}.json.{os.getpid()}.tmp"
        sidecar.write_text(json.dumps(meta))
        os.replace(sidecar, cache_dir / f"{key}.json")  # written last: its presence marks a complete cache
        return bad
    finally:
        slots = None
        for leftover in (full, temporary):
            leftover.unlink(missing_ok=True)


def _decode_in_memory(paths: list[Path], size: int, preprocess: str, progress: bool) -> DecodedImages:
    slots = np.zeros((len(paths), 3, size, size), dtype=np.uint8)
    failures = _decode_into(slots, paths, size, preprocess, progress) if paths else {}
    kept = [i for i in range(len(paths)) if i not in failures]
    images = slots if not failures else slots[kept]
    return DecodedImages(torch.from_numpy(images), kept, [(Path(paths[i]), failures[i]) for i in sorted(failures)], None)


def decode_images(
    paths: list[Path],
    image_size: int,
    *,
    cache_dir: Path | None,
    skip_bad: bool = False,
    progress: bool = True,
    preprocess: str = "resize",
) -> DecodedImages:
    """Decode ``paths`` to uint8 (N, 3, image_size, image_size), through the cache in ``cache_dir``.

    Unreadable files (missing, truncated, not an image) raise ``DataError`` naming them, unless
    ``skip_bad``: then they are left out, ``kept`` says which inputs the images are, and ``bad``
    lists the others with reasons. The cache remembers skipped files; a call without ``skip_bad``
    never trusts that memory and tries them again. DICOM files without pydicom installed are a
    ``DataError`` naming them and the install command, even with ``skip_bad`` (a missing package
    is not a bad image).
    """
    if preprocess not in PREPROCESSES:
        raise ConfigError(f"unknown image preprocessing {preprocess!r}; expected one of {', '.join(PREPROCESSES)}")
    if not isinstance(image_size, int) or image_size < 1:
        raise ConfigError(f"image_size must be a positive integer, got {image_size!r}")
    paths = [Path(p) for p in paths]
    dicom = [p for p in paths if is_dicom(p)]
    if dicom:
        try:
            _import_pydicom()
        except DataError as error:
            more = f" (+{len(dicom) - 1} more)" if len(dicom) > 1 else ""
            noun = "file" if len(dicom) == 1 else "files"
            raise DataError(f"{len(dicom)} DICOM {noun} ({dicom[0]}{more}) cannot be read: pydicom >= 3 is not installed; "
                            f"{DICOM_INSTALL}") from error  # fmt: skip
    if cache_dir is None:
        result = _decode_in_memory(paths, image_size, preprocess, progress)
    else:
        cache_dir = Path(cache_dir)
        key = cache_key(paths, image_size, preprocess)
        result = _read_cache(cache_dir, key, len(paths), image_size)
        if result is not None and result.bad and not skip_bad:
            result = None  # remembered failures are trusted only when skipping them: try them again
        if result is None:
            try:
                bad = _build_cache(cache_dir, key, paths, image_size, preprocess, keep_bad=skip_bad, progress=progress)
            except OSError as error:
                warnings.warn(f"could not write the image cache in {cache_dir} ({error}); decoding in memory", RuntimeWarning, stacklevel=2)
                result = _decode_in_memory(paths, image_size, preprocess, progress)
            else:
                if bad and not skip_bad:
                    raise DataError(bad_images_message(bad))
                result = _read_cache(cache_dir, key, len(paths), image_size)
                if result is None:
                    raise DataError(f"could not read back the image cache {cache_dir / key}.u8 just written")
    if result.bad and not skip_bad:
        raise DataError(bad_images_message(result.bad))
    return result


def decoded_cache_dir() -> Path:
    """``$FEDWARD_CACHE/decoded`` (``~/.cache/fedward/decoded`` when unset)."""
    return cache_root() / "decoded"


def decode_splits(listing: dict, order: list, image_size: int, *, cache_dir: str | Path | None, skip_bad: bool,
                  progress: bool, preprocess: str = "resize") -> tuple[dict, DecodedImages]:
    """Decode every (path, label) of ``listing[key]`` for ``key`` in ``order`` through one cache, so
    each key's images are a contiguous slice (a view) of it; returns ({key: Split}, the decode).
    With ``skip_bad`` a key's split holds only its readable images."""
    from fedward.data.types import Split

    paths = [path for key in order for path, _ in listing[key]]
    labels = torch.tensor([label for key in order for _, label in listing[key]], dtype=torch.int64)
    cache = Path(cache_dir).expanduser() if cache_dir is not None else decoded_cache_dir()
    decoded = decode_images(paths, image_size, cache_dir=cache, skip_bad=skip_bad, progress=progress, preprocess=preprocess)
    kept = np.asarray(decoded.kept, dtype=np.int64)
    kept_labels = labels[torch.from_numpy(kept)]
    parts, start = {}, 0
    for key in order:
        stop = start + len(listing[key])
        low, high = np.searchsorted(kept, [start, stop])
        parts[key] = Split(decoded.images[low:high], kept_labels[low:high])
        start = stop
    return parts, decoded
