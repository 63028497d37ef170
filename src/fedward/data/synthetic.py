"""The built-in synthetic federated skin-lesion data set (fedward's out-of-the-box default).

Six "hospitals" with Fed-ISIC2019's per-centre class counts (scaled by ``scale``) and its eight
classes. Each image is a lesion (a blob) on skin: every class has a characteristic colour, centre
colour, size, elongation, border irregularity and texture; the pairs MEL/NV, BKL/AK and BCC/SCC
are pulled towards each other (``class_overlap``) so the task is not trivial. Every class has
``num_modes`` appearance modes and every hospital draws from its own mixture over them, so
intra-class appearance differs by hospital. Each hospital then applies its own acquisition: skin
tone population, colour cast, brightness/contrast, optical blur, resolution loss (downsample then
upsample), dermoscope vignette and sensor noise.

Generation is vectorised torch, seeded by (seed, centre, split), and cached on disk.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fedward.data.augment import gaussian_blur
from fedward.data.partition import carve_validation, round_half_up
from fedward.data.types import ClientData, FederatedData, Split
from fedward.errors import ConfigError
from fedward.paths import cache_root
from fedward.seeding import numpy_generator, torch_generator
from fedward.data.registry import ValidationSplit, register_dataset
from fedward.options import option

NAME = "synthetic"
NUM_CLIENTS = 6
NUM_CLASSES = 8
CLASS_NAMES = ["MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC"]
CLIENT_NAMES = ["BCN", "HAM_vidir_molemax", "HAM_vidir_modern", "HAM_rosendahl", "MSK", "HAM_vienna_dias"]

# Fed-ISIC2019 (FLamby split, fold 1) per-centre class counts, classes in CLASS_NAMES order.
TRAIN_COUNTS = (
    (2279, 3363, 2245, 606, 923, 97, 87, 330),
    (20, 2977, 2, 0, 96, 23, 45, 0),
    (533, 1470, 174, 20, 379, 40, 64, 11),
    (276, 649, 223, 86, 406, 20, 3, 144),
    (166, 349, 0, 0, 140, 0, 0, 0),
    (58, 276, 5, 0, 6, 4, 2, 0),
)
TEST_COUNTS = (
    (578, 843, 564, 131, 215, 27, 24, 101),
    (4, 743, 0, 0, 28, 7, 9, 0),
    (147, 362, 37, 1, 96, 11, 18, 0),
    (66, 154, 73, 23, 84, 10, 0, 42),
    (49, 66, 0, 0, 49, 0, 0, 0),
    (9, 74, 0, 0, 4, 0, 1, 0),
)

# Bump whenever a change alters the generated pixels: it is part of the cache key.
GENERATOR_VERSION = 2
RENDER_CHUNK = 256  # images rendered at once; fixed, because the noise streams are drawn per chunk

DEFAULT_DIFFICULTY: dict[str, float] = {
    # 0: the confusable pairs (MEL/NV, BKL/AK, BCC/SCC) keep their own prototypes; 1: identical.
    "class_overlap": 0.5,
    # Per-image jitter of every lesion feature, as a multiple of FEATURE_SCALE.
    "appearance_noise": 1.0,
    # Appearance modes per class, and how far modes lie from the class prototype (x FEATURE_SCALE).
    "num_modes": 4,
    "mode_spread": 1.5,
    # Dirichlet concentration of each hospital's mixture over a class's modes: small = each
    # hospital sees mostly one mode, large = all hospitals see the same mixture.
    "mode_concentration": 0.2,
    # 0: every hospital has the same skin population and acquisition; 1: the profiles below.
    "hospital_shift": 1.0,
    # Multiplier on every hospital's sensor noise level.
    "sensor_noise": 1.0,
}

# Lesion features: rim RGB, centre RGB, centre weight, radius (fraction of the half-width),
# aspect ratio, border irregularity, texture contrast, texture fineness (0 coarse .. 1 fine),
# border softness.
FEATURES = ["rim_r", "rim_g", "rim_b", "ctr_r", "ctr_g", "ctr_b", "center_weight", "radius", "aspect",
            "irregularity", "texture", "texture_fine", "softness"]  # fmt: skip
CLASS_PROTOTYPES = torch.tensor(
    [
        [0.32, 0.20, 0.15, 0.35, 0.38, 0.52, 0.55, 0.50, 1.35, 0.22, 0.30, 0.70, 0.04],  # MEL: dark, blue-grey centre, irregular
        [0.48, 0.31, 0.21, 0.36, 0.22, 0.15, 0.35, 0.38, 1.10, 0.06, 0.12, 0.30, 0.06],  # NV: brown, regular
        [0.80, 0.58, 0.58, 0.90, 0.82, 0.82, 0.45, 0.34, 1.25, 0.12, 0.18, 0.90, 0.05],  # BCC: pink, pearly centre
        [0.74, 0.46, 0.42, 0.82, 0.72, 0.62, 0.30, 0.46, 1.30, 0.16, 0.26, 0.80, 0.12],  # AK: red, scaly, diffuse
        [0.62, 0.44, 0.32, 0.56, 0.40, 0.30, 0.25, 0.46, 1.25, 0.14, 0.26, 0.60, 0.09],  # BKL: light brown, waxy
        [0.56, 0.38, 0.28, 0.90, 0.84, 0.80, 0.65, 0.24, 1.05, 0.05, 0.08, 0.20, 0.07],  # DF: small, white centre
        [0.62, 0.16, 0.26, 0.45, 0.10, 0.32, 0.45, 0.28, 1.10, 0.06, 0.16, 0.40, 0.03],  # VASC: red-purple
        [0.78, 0.50, 0.44, 0.90, 0.84, 0.66, 0.55, 0.40, 1.20, 0.20, 0.32, 0.70, 0.07],  # SCC: pink, keratin centre
    ]
)
CONFUSABLE_PAIRS = ((0, 1), (4, 3), (2, 7))
FEATURE_SCALE = torch.tensor([0.07, 0.07, 0.07, 0.07, 0.07, 0.07, 0.12, 0.07, 0.12, 0.06, 0.08, 0.25, 0.03])
# Colour jitter moves along luminance, redness and blue-grey axes rather than R, G and B
# independently (which would give green and purple lesions); columns are the axes.
COLOUR_AXES = torch.tensor([[0.80, 0.60, -0.20], [0.80, -0.20, -0.10], [0.80, -0.40, 0.50]])
FEATURE_MIN = torch.tensor([0.0] * 6 + [0.0, 0.12, 1.0, 0.0, 0.0, 0.0, 0.01])
FEATURE_MAX = torch.tensor([1.0] * 6 + [1.0, 0.80, 2.0, 0.5, 0.6, 1.0, 0.20])

# Per-hospital skin tone (RGB mean) and acquisition at hospital_shift = 1, loosely after the real
# centres (MSK's images are the downsampled ones; vidir_molemax and vienna_dias are older devices).
SKIN_COMMON = (0.80, 0.62, 0.52)
SKIN = ((0.82, 0.62, 0.52), (0.86, 0.67, 0.58), (0.80, 0.63, 0.54), (0.84, 0.60, 0.50), (0.72, 0.55, 0.45), (0.88, 0.70, 0.60))
COLOR_CAST = ((1.00, 0.97, 1.03), (1.06, 0.98, 0.90), (0.97, 1.00, 1.05), (1.08, 0.95, 0.95), (0.95, 1.00, 1.08), (1.10, 1.00, 0.85))
BRIGHTNESS = (0.00, 0.05, 0.00, -0.05, 0.03, -0.08)
CONTRAST = (1.00, 0.85, 1.10, 1.15, 0.95, 0.80)
BLUR_SIGMA = (0.010, 0.025, 0.008, 0.015, 0.010, 0.030)  # fraction of the image size
RESOLUTION = (1.00, 0.60, 1.00, 0.80, 0.45, 0.50)  # fraction kept before upsampling back
VIGNETTE = (0.60, 0.00, 0.30, 0.00, 0.00, 0.50)  # dermoscope's dark circular border strength
NOISE = (0.020, 0.030, 0.015, 0.030, 0.020, 0.050)  # sensor noise std on [0, 1] pixels
NUM_HARMONICS = 4  # border harmonics k = 2 .. 5


def scaled_counts(counts: tuple[tuple[int, ...], ...], scale: float) -> torch.Tensor:
    """round(count * scale) per centre and class, but at least 1 where the real count is > 0."""
    table = [[max(1, round_half_up(c * scale)) if c > 0 else 0 for c in row] for row in counts]
    return torch.tensor(table, dtype=torch.int64)


def resolve_difficulty(difficulty: dict) -> dict[str, float]:
    """The difficulty knobs with defaults filled in, checked."""
    unknown = sorted(set(difficulty) - set(DEFAULT_DIFFICULTY))
    if unknown:
        raise ConfigError(f"unknown synthetic data option(s) {', '.join(unknown)}; expected any of {', '.join(DEFAULT_DIFFICULTY)}")
    knobs = {**DEFAULT_DIFFICULTY, **difficulty}
    if not 0.0 <= knobs["class_overlap"] <= 1.0:
        raise ConfigError(f"class_overlap must be in [0, 1], got {knobs['class_overlap']}")
    if int(knobs["num_modes"]) != knobs["num_modes"] or knobs["num_modes"] < 1:
        raise ConfigError(f"num_modes must be an integer >= 1, got {knobs['num_modes']}")
    if not knobs["mode_concentration"] > 0:
        raise ConfigError(f"mode_concentration must be > 0, got {knobs['mode_concentration']}")
    for key in ("appearance_noise", "mode_spread", "hospital_shift", "sensor_noise"):
        if not knobs[key] >= 0:
            raise ConfigError(f"{key} must be >= 0, got {knobs[key]}")
    knobs["num_modes"] = int(knobs["num_modes"])
    return {k: (int(v) if k == "num_modes" else float(v)) for k, v in knobs.items()}


def class_prototypes(class_overlap: float) -> torch.Tensor:
    """(NUM_CLASSES, F) prototypes with each confusable pair pulled together by ``class_overlap``."""
    prototypes = CLASS_PROTOTYPES.clone()
    for a, b in CONFUSABLE_PAIRS:
        gap = CLASS_PROTOTYPES[b] - CLASS_PROTOTYPES[a]
        prototypes[a] += 0.5 * class_overlap * gap
        prototypes[b] -= 0.5 * class_overlap * gap
    return prototypes


def appearance_modes(seed: int, knobs: dict) -> torch.Tensor:
    """(NUM_CLASSES, num_modes, F) mode centres around the class prototypes."""
    generator = torch_generator(seed, NAME, "modes")
    offsets = feature_noise(NUM_CLASSES * knobs["num_modes"], generator).reshape(NUM_CLASSES, knobs["num_modes"], -1)
    modes = class_prototypes(knobs["class_overlap"])[:, None, :] + knobs["mode_spread"] * FEATURE_SCALE * offsets
    return modes.clamp(FEATURE_MIN, FEATURE_MAX)


def hospital_mode_mixtures(seed: int, knobs: dict) -> torch.Tensor:
    """(NUM_CLIENTS, NUM_CLASSES, num_modes) each hospital's own mixture over every class's modes."""
    mixtures = np.empty((NUM_CLIENTS, NUM_CLASSES, knobs["num_modes"]))
    for centre in range(NUM_CLIENTS):
        rng = numpy_generator(seed, NAME, "mixture", centre)
        mixtures[centre] = rng.dirichlet(np.full(knobs["num_modes"], knobs["mode_concentration"]), size=NUM_CLASSES)
    return torch.from_numpy(mixtures).float()


def feature_noise(count: int, generator: torch.Generator) -> torch.Tensor:
    """(count, F) standard noise for the lesion features, colours mixed along COLOUR_AXES."""
    noise = torch.randn(count, len(FEATURES), generator=generator)
    colours = noise[:, :6].reshape(count, 2, 3) @ COLOUR_AXES.T
    return torch.cat([colours.reshape(count, 6), noise[:, 6:]], dim=1)


def _shifted(value: float, neutral: float, shift: float) -> float:
    return neutral + shift * (value - neutral)


def acquisition_profile(centre: int, shift: float) -> dict[str, torch.Tensor | float]:
    """Centre ``centre``'s skin tone and acquisition, interpolated from neutral by ``shift``."""
    return {
        "skin": torch.tensor([_shifted(s, c, shift) for s, c in zip(SKIN[centre], SKIN_COMMON)]),
        "cast": torch.tensor([_shifted(c, 1.0, shift) for c in COLOR_CAST[centre]]),
        "brightness": shift * BRIGHTNESS[centre],
        "contrast": _shifted(CONTRAST[centre], 1.0, shift),
        "blur": shift * BLUR_SIGMA[centre],
        "resolution": min(1.0, _shifted(RESOLUTION[centre], 1.0, shift)),
        "vignette": min(1.0, shift * VIGNETTE[centre]),
        "noise": NOISE[centre],
    }


def _smooth_noise(count: int, grid: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """(count, 1, size, size) unit-variance-ish noise with ``grid`` x ``grid`` degrees of freedom."""
    coarse = torch.randn(count, 1, grid, grid, generator=generator)
    return F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)


def render_lesions(features: torch.Tensor, size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One lesion per feature row: returns (soft mask (N,1,S,S), lesion colour (N,3,S,S))."""
    count = len(features)
    coords = (torch.arange(size, dtype=torch.float32) + 0.5) / size * 2 - 1
    yy, xx = coords[:, None], coords[None, :]
    centre_xy = 0.12 * torch.randn(count, 2, generator=generator)
    orientation = math.pi * torch.rand(count, generator=generator)
    harmonic_amp = torch.randn(count, NUM_HARMONICS, generator=generator) / math.sqrt(NUM_HARMONICS)
    harmonic_phase = 2 * math.pi * torch.rand(count, NUM_HARMONICS, generator=generator)

    def per_image(column: str) -> torch.Tensor:
        return features[:, FEATURES.index(column)].reshape(count, 1, 1)

    dx = xx - centre_xy[:, 0].reshape(count, 1, 1)
    dy = yy - centre_xy[:, 1].reshape(count, 1, 1)
    cos, sin = torch.cos(orientation).reshape(count, 1, 1), torch.sin(orientation).reshape(count, 1, 1)
    stretch = per_image("aspect").sqrt()
    u = (dx * cos + dy * sin) / stretch
    v = (-dx * sin + dy * cos) * stretch
    distance = torch.sqrt(u**2 + v**2)
    angle = torch.atan2(v, u)
    orders = torch.arange(2, 2 + NUM_HARMONICS, dtype=torch.float32).reshape(1, NUM_HARMONICS, 1, 1)
    wobble = (harmonic_amp[:, :, None, None] * torch.cos(orders * angle[:, None] + harmonic_phase[:, :, None, None])).sum(1)
    radius = per_image("radius")
    border = radius * (1 + per_image("irregularity") * wobble).clamp(min=0.3)
    mask = torch.sigmoid((border - distance) / per_image("softness"))

    centre_weight = per_image("center_weight") * torch.exp(-((distance / (0.55 * radius)) ** 2))
    rim = features[:, 0:3, None, None]
    centre_colour = features[:, 3:6, None, None]
    colour = rim * (1 - centre_weight[:, None]) + centre_colour * centre_weight[:, None]
    fine = per_image("texture_fine")[:, None]
    texture = (1 - fine) * _smooth_noise(count, 4, size, generator) + fine * _smooth_noise(count, 9, size, generator)
    colour = colour * (1 + per_image("texture")[:, None] * texture)
    return mask[:, None], colour


def acquire(images: torch.Tensor, profile: dict, generator: torch.Generator) -> torch.Tensor:
    """Apply one hospital's optics, resolution, colour, vignette and sensor noise to float images."""
    count, _, size, _ = images.shape
    sigma_px = profile["blur"] * size
    if sigma_px > 0.05:
        kernel = 2 * math.ceil(3 * sigma_px) + 1
        images = gaussian_blur(images, torch.full((count,), sigma_px), (kernel, kernel))
    low = max(2, round_half_up(profile["resolution"] * size))
    if low < size:
        images = F.interpolate(images, size=(low, low), mode="area")
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    brightness = profile["brightness"] + 0.03 * torch.randn(count, 1, 1, 1, generator=generator)
    images = (images * profile["cast"].reshape(1, 3, 1, 1) - 0.5) * profile["contrast"] + 0.5 + brightness
    if profile["vignette"] > 0:
        coords = (torch.arange(size, dtype=torch.float32) + 0.5) / size * 2 - 1
        rho = torch.sqrt(coords[:, None] ** 2 + coords[None, :] ** 2)
        images = images * torch.sigmoid((1.45 - 0.5 * profile["vignette"] - rho) / 0.04)
    noise = profile["noise"] * profile["sensor_noise"]
    if noise > 0:
        images = images + noise * torch.randn(images.shape, generator=generator)
    return images


def generate_split(
    seed: int, centre: int, split: str, counts: torch.Tensor, size: int, knobs: dict,
    modes: torch.Tensor, mixtures: torch.Tensor,
) -> Split:  # fmt: skip
    """Generate one centre's ``split`` with ``counts[c]`` images of class c, in random order."""
    generator = torch_generator(seed, NAME, centre, split)
    labels = torch.repeat_interleave(torch.arange(NUM_CLASSES), counts)
    labels = labels[torch.randperm(len(labels), generator=generator)]
    if len(labels) == 0:
        return Split(torch.zeros(0, 3, size, size, dtype=torch.uint8), labels)
    mode_index = torch.multinomial(mixtures[centre][labels], 1, generator=generator).squeeze(1)
    jitter = knobs["appearance_noise"] * FEATURE_SCALE * feature_noise(len(labels), generator)
    features = (modes[labels, mode_index] + jitter).clamp(FEATURE_MIN, FEATURE_MAX)
    profile = {**acquisition_profile(centre, knobs["hospital_shift"]), "sensor_noise": knobs["sensor_noise"]}
    skin_noise = torch.randn(len(labels), 3, generator=generator) @ COLOUR_AXES.T
    skin = (profile["skin"] + 0.04 * skin_noise).clamp(0, 1)
    chunks = []
    for start in range(0, len(labels), RENDER_CHUNK):
        stop = min(start + RENDER_CHUNK, len(labels))
        mask, lesion = render_lesions(features[start:stop], size, generator)
        skin_texture = 1 + 0.04 * _smooth_noise(stop - start, 6, size, generator)
        images = skin[start:stop, :, None, None] * skin_texture * (1 - mask) + lesion * mask
        images = acquire(images, profile, generator)
        chunks.append((images.clamp(0, 1) * 255).round().to(torch.uint8))
    return Split(torch.cat(chunks), labels)


def generation_params(seed: int, image_size: int, scale: float, knobs: dict) -> dict:
    """Everything that determines the generated pixels (the cache key)."""
    return {"version": GENERATOR_VERSION, "seed": seed, "image_size": image_size, "scale": scale, "difficulty": knobs}


def cache_path(cache_dir: Path, params: dict) -> Path:
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir / f"{NAME}-{digest}.pt"


@contextmanager
def _one_thread() -> Iterator[None]:
    """Run torch ops on one thread: generation is many small memory-bound ops, which gain nothing
    from intra-op threads and slow down several-fold when the cores are busy (measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _generate_all(params: dict) -> list[dict[str, Split]]:
    with _one_thread():
        return _generate_splits(params)


def _generate_splits(params: dict) -> list[dict[str, Split]]:
    knobs = params["difficulty"]
    modes = appearance_modes(params["seed"], knobs)
    mixtures = hospital_mode_mixtures(params["seed"], knobs)
    train_counts = scaled_counts(TRAIN_COUNTS, params["scale"])
    test_counts = scaled_counts(TEST_COUNTS, params["scale"])
    return [
        {
            split: generate_split(params["seed"], centre, split, counts[centre], params["image_size"], knobs, modes, mixtures)
            for split, counts in (("train", train_counts), ("test", test_counts))
        }
        for centre in range(NUM_CLIENTS)
    ]


def _read_cache(path: Path, params: dict) -> list[dict[str, Split]]:
    """The cached splits; raises on anything that is not a complete cache for ``params``."""
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if payload["params"] != params or len(payload["clients"]) != NUM_CLIENTS:
        raise ValueError("cache parameters do not match")
    return [{split: Split(entry[f"{split}_images"], entry[f"{split}_labels"]) for split in ("train", "test")} for entry in payload["clients"]]


def _write_cache(path: Path, params: dict, splits: list[dict[str, Split]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    clients = [{f"{name}_{part}": getattr(s[name], part) for name in ("train", "test") for part in ("images", "labels")} for s in splits]
    temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    torch.save({"params": params, "clients": clients}, temporary)
    os.replace(temporary, path)  # atomic: a concurrent reader never sees a half-written file


def load(
    *,
    seed: int = 0,
    image_size: int = 32,
    scale: float = 0.2,
    val_fraction: float = 0.1,
    cache_dir: str | Path | None = None,
    **difficulty: float,
) -> FederatedData:
    """Generate (or load from the cache) the synthetic federated data set.

    ``difficulty`` takes any key of ``DEFAULT_DIFFICULTY``. The val split is carved, stratified,
    from each centre's train split after loading (so ``val_fraction`` is not part of the cache key).
    """
    if not isinstance(image_size, int) or image_size < 8:
        raise ConfigError(f"image_size must be an integer >= 8, got {image_size!r}")
    if not scale > 0:
        raise ConfigError(f"scale must be > 0, got {scale}")
    knobs = resolve_difficulty(difficulty)
    params = generation_params(seed, image_size, float(scale), knobs)
    path = cache_path(Path(cache_dir) if cache_dir is not None else cache_root(), params)
    splits = None
    if path.exists():
        try:
            splits = _read_cache(path, params)
        except Exception as error:  # any unreadable or mismatched file is rebuilt, never fatal
            warnings.warn(f"synthetic data cache {path} is unreadable ({type(error).__name__}); regenerating it", RuntimeWarning, stacklevel=2)
    if splits is None:
        splits = _generate_all(params)
        try:
            _write_cache(path, params, splits)
        except OSError as error:
            warnings.warn(f"could not write synthetic data cache {path} ({error}); continuing without it", RuntimeWarning, stacklevel=2)
    clients = []
    for centre, parts in enumerate(splits):
        train, val = carve_validation(parts["train"], val_fraction, numpy_generator(seed, NAME, "val", centre))
        clients.append(ClientData(centre, CLIENT_NAMES[centre], train, val, parts["test"]))
    info = {"seed": seed, "scale": float(scale), "source": NAME, "image_size": image_size, "val_fraction": val_fraction,
            "generator_version": GENERATOR_VERSION, "difficulty": knobs, "cache_file": str(path)}  # fmt: skip
    return FederatedData(NAME, NUM_CLASSES, list(CLASS_NAMES), image_size, clients, info=info)


def public_split(*, seed: int = 0, image_size: int = 32, count: int = 3072, **difficulty: float) -> Split:
    """Unlabelled-style "public" images for self-supervised priors: drawn from all six hospitals'
    acquisition processes with balanced classes, from random streams no client split uses (the
    role ImageNet plays for the real MoCo-v2 prior). Labels are returned for evaluation only."""
    if not isinstance(count, int) or count < NUM_CLIENTS * NUM_CLASSES:
        raise ConfigError(f"count must be an integer >= {NUM_CLIENTS * NUM_CLASSES}, got {count!r}")
    knobs = resolve_difficulty(difficulty)
    modes = appearance_modes(seed, knobs)
    mixtures = hospital_mode_mixtures(seed, knobs)
    per_cell = torch.full((NUM_CLASSES,), count // (NUM_CLIENTS * NUM_CLASSES), dtype=torch.long)
    with _one_thread():
        parts = [generate_split(seed, centre, "public", per_cell, image_size, knobs, modes, mixtures)
                 for centre in range(NUM_CLIENTS)]
    return Split.concat(parts)


@dataclass
class Options(ValidationSplit):
    data_scale: float = option(0.2, "fraction of Fed-ISIC2019's per-centre counts the synthetic set generates",
                               check=(lambda v: 0 < v <= 1, "in (0, 1]"))
    fold: int = option(1, "data fold (one fold, 1, as the reference code ships)",
                       check=(lambda v: v == 1, "1: the synthetic data set has a single fold, as the reference code"))


def public_from_config(cfg, count: int) -> Split:
    """``count`` public images in a seeded order (drawn in whole multiples of one per hospital and class)."""
    cells = NUM_CLIENTS * NUM_CLASSES
    drawn = public_split(seed=cfg.data_seed, image_size=cfg.image_size, count=-(-count // cells) * cells)
    return drawn.subset(torch.randperm(len(drawn), generator=torch_generator(cfg.data_seed, NAME, "public-order"))[:count])


@register_dataset(NAME, options=Options, needs_data_dir=False, public=public_from_config)
def from_config(cfg) -> FederatedData:
    """built in: Fed-ISIC2019's six centres and eight classes, synthetic images (the default)"""
    return load(seed=cfg.data_seed, image_size=cfg.image_size, scale=cfg.data_scale, val_fraction=cfg.val_fraction)
