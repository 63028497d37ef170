"""A built-in synthetic multi-resolution data set modelled on BreakHis, for MH-pFLID.

BreakHis holds breast-tumour histopathology images of 82 patients (many images each), labelled
benign/malignant and by one of eight tumour subtypes. The MH-pFLID paper (ICML 2024) gives four
clients the images at x1, x2, x4 and x8 downsampling (downsample, then resize back), so the
clients differ in resolution, not in content. This module is a *synthetic* stand-in with the same
structure; no BreakHis image is used. It copies these facts:

* BreakHis's patients per subtype (adenosis 4, fibroadenoma 10, phyllodes tumour 3, tubular
  adenoma 7; ductal 38, lobular 5, mucinous 9, papillary carcinoma 6: 24 benign and 58 malignant
  patients), scaled by ``patients_scale`` (round half up, at least 1 per subtype), each patient
  with ``images_per_patient`` images;
* the binary (benign/malignant, the default and MH-pFLID's task) and the eight-subtype labels;
* four clients ``x1``, ``x2``, ``x4``, ``x8``: client k's images are area-downsampled by
  ``DOWNSAMPLING[k]`` and resized back (bilinear) to ``image_size``;
* 70/30 train/test splits grouped by patient (no patient in both), stratified by the binary label.

Each subtype draws its appearance from one of the generator prototypes of
``fedward.data.synthetic`` (``SUBTYPE_PROTOTYPE``). The confusable prototype pairs MEL/NV
(ductal carcinoma / fibroadenoma) and AK/BKL (papillary carcinoma / adenosis) straddle the
benign/malignant boundary, which keeps the binary task non-trivial (``class_overlap`` pulls them
together). Every patient has its own lesion features (a class appearance mode plus patient
jitter) and skin tone; each of its images is another view of it (small feature jitter, its own
position, orientation and border, texture and sensor noise). There is no per-client acquisition
shift: resolution is the only thing that differs between clients.

Two settings:

* ``shared_images=False`` (default, patient-disjoint): patients are dealt to the four clients,
  stratified by subtype, so no patient is at two clients; each client splits its own patients.
* ``shared_images=True`` (the MH-pFLID reproduction): every client holds all patients' images at
  its own resolution, with its own patient-grouped split drawn from ``REPRODUCTION_SPLIT_SEEDS``.

Validation patients are carved, grouped and stratified, from each client's train patients.

The x1 images (one per patient and view) are rendered once, in float, quantised to uint8 and
cached on disk; every client's images are derived from those uint8 x1 images at load time by
``degrade``. Client 0's (x1) images are therefore exactly the cached render, and a patient's view
is the same image in both settings. ``info["patients"][k][split]`` and ``info["views"][k][split]``
give the patient id and view index of every image.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fedward.data import synthetic
from fedward.data.partition import round_half_up
from fedward.data.synthetic import (
    COLOUR_AXES,
    FEATURE_MAX,
    FEATURE_MIN,
    FEATURE_SCALE,
    RENDER_CHUNK,
    SKIN_COMMON,
    _one_thread,
    _smooth_noise,
    appearance_modes,
    feature_noise,
    render_lesions,
    resolve_difficulty,
)
from fedward.data.types import ClientData, FederatedData, Split
from fedward.errors import ConfigError
from fedward.paths import cache_root
from fedward.seeding import numpy_generator, torch_generator
from fedward.data.registry import BreakHisLabels, ValidationSplit, register_dataset
from fedward.options import POSITIVE, option

NAME = "synthetic_multires"
NUM_CLIENTS = 4
CLIENT_NAMES = ["x1", "x2", "x4", "x8"]
DOWNSAMPLING = (1, 2, 4, 8)

# Benign subtypes first, then malignant: subtype // 4 is the binary label.
SUBTYPE_NAMES = ["adenosis", "fibroadenoma", "phyllodes_tumor", "tubular_adenoma",
                 "ductal_carcinoma", "lobular_carcinoma", "mucinous_carcinoma", "papillary_carcinoma"]  # fmt: skip
BINARY_NAMES = ["benign", "malignant"]
NUM_CLASSES = 2
CLASS_NAMES = list(BINARY_NAMES)
LABEL_CHOICES = ("binary", "subtype")
NUM_BENIGN_SUBTYPES = 4
# BreakHis: patients per subtype, in SUBTYPE_NAMES order (24 benign + 58 malignant = 82).
BREAKHIS_PATIENTS = (4, 10, 3, 7, 38, 5, 9, 6)
# Index into synthetic.CLASS_NAMES of the prototype each subtype is drawn from.
SUBTYPE_PROTOTYPE = tuple(
    synthetic.CLASS_NAMES.index(p) for p in ("BKL", "NV", "DF", "VASC", "MEL", "BCC", "SCC", "AK")
)
# The seeds the MH-pFLID reproduction split each client's patients with (shared_images=True).
REPRODUCTION_SPLIT_SEEDS = (17, 27, 117, 1017)

TEST_FRACTION = 0.3
VIEW_NOISE = 0.3  # per-view jitter of the patient's lesion features, x FEATURE_SCALE
SKIN_JITTER = 0.04  # per-patient skin tone spread along COLOUR_AXES
SKIN_TEXTURE = 0.04
SENSOR_NOISE = 0.02  # std on [0, 1] pixels, times the sensor_noise knob
# The difficulty knobs of fedward.data.synthetic that act here (there are no hospital mixtures
# or acquisition profiles, so mode_concentration and hospital_shift do not apply).
KNOBS = ("class_overlap", "appearance_noise", "num_modes", "mode_spread", "sensor_noise")

# Bump whenever a change alters the rendered x1 pixels: it is part of the cache key.
GENERATOR_VERSION = 1
SPLITS = ("train", "val", "test")


def patient_counts(patients_scale: float) -> list[int]:
    """Synthetic patients per subtype: round_half_up(BreakHis count * scale), at least 1."""
    return [max(1, round_half_up(count * patients_scale)) for count in BREAKHIS_PATIENTS]


def patient_subtypes(patients_scale: float) -> torch.Tensor:
    """(P,) int64 subtype of every patient id 0..P-1 (patients are numbered subtype by subtype)."""
    return torch.repeat_interleave(torch.arange(len(SUBTYPE_NAMES)), torch.tensor(patient_counts(patients_scale)))


def degrade(images: torch.Tensor, factor: int) -> torch.Tensor:
    """uint8 (N, 3, S, S) images area-downsampled to max(1, S // factor) and resized back to S
    (bilinear, align_corners=False), rounded to uint8. ``factor`` 1 returns the images unchanged."""
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise ValueError(f"degrade expects uint8 (N, C, H, W) images, got {images.dtype} {tuple(images.shape)}")
    if int(factor) != factor or factor < 1:
        raise ValueError(f"degrade factor must be an integer >= 1, got {factor!r}")
    if factor == 1 or len(images) == 0:
        return images.clone()
    height, width = images.shape[-2:]
    low = F.interpolate(images.float(), size=(max(1, height // factor), max(1, width // factor)), mode="area")
    back = F.interpolate(low, size=(height, width), mode="bilinear", align_corners=False)
    return back.round().clamp(0, 255).to(torch.uint8)


def resolve_knobs(difficulty: dict) -> dict[str, float]:
    """The difficulty knobs that act on this data set, with defaults filled in, checked."""
    unknown = sorted(set(difficulty) - set(KNOBS))
    if unknown:
        raise ConfigError(f"unknown {NAME} data option(s) {', '.join(unknown)}; expected any of {', '.join(KNOBS)}")
    knobs = resolve_difficulty(difficulty)
    return {key: knobs[key] for key in KNOBS}


def generation_params(seed: int, image_size: int, patients_scale: float, images_per_patient: int, knobs: dict) -> dict:
    """Everything that determines the rendered x1 pixels (the cache key)."""
    return {"version": GENERATOR_VERSION, "seed": seed, "image_size": image_size, "patients_scale": patients_scale,
            "images_per_patient": images_per_patient, "difficulty": knobs}  # fmt: skip


def cache_path(cache_dir: Path, params: dict) -> Path:
    """``<cache_dir>/synthetic_multires-<sha256 of params>.pt`` (synthetic.cache_path's key, renamed)."""
    keyed = synthetic.cache_path(cache_dir, params)
    return keyed.with_name(NAME + keyed.name.removeprefix(synthetic.NAME))


def _generate_images(params: dict) -> torch.Tensor:
    """The uint8 x1 render (P * V, 3, S, S): patient p's view v is row p * V + v."""
    with _one_thread():
        return _render(params)


def _render(params: dict) -> torch.Tensor:
    seed, size, views, knobs = params["seed"], params["image_size"], params["images_per_patient"], params["difficulty"]
    subtypes = patient_subtypes(params["patients_scale"])
    prototypes = torch.tensor(SUBTYPE_PROTOTYPE)[subtypes]
    patients = len(subtypes)
    per_patient = torch_generator(seed, NAME, "patients")
    mode = torch.randint(knobs["num_modes"], (patients,), generator=per_patient)
    patient_jitter = knobs["appearance_noise"] * FEATURE_SCALE * feature_noise(patients, per_patient)
    lesion_features = (appearance_modes(seed, knobs)[prototypes, mode] + patient_jitter).clamp(FEATURE_MIN, FEATURE_MAX)
    skin_tone = torch.tensor(SKIN_COMMON) + SKIN_JITTER * torch.randn(patients, 3, generator=per_patient) @ COLOUR_AXES.T
    skin_tone = skin_tone.clamp(0, 1).repeat_interleave(views, dim=0)[:, :, None, None]
    view_jitter = VIEW_NOISE * FEATURE_SCALE * feature_noise(patients * views, torch_generator(seed, NAME, "views"))
    features = (lesion_features.repeat_interleave(views, dim=0) + view_jitter).clamp(FEATURE_MIN, FEATURE_MAX)
    generator = torch_generator(seed, NAME, "render")
    noise = SENSOR_NOISE * knobs["sensor_noise"]
    rendered = []
    for first in range(0, len(features), RENDER_CHUNK):
        last = min(first + RENDER_CHUNK, len(features))
        lesion_mask, lesion_colour = render_lesions(features[first:last], size, generator)
        background = skin_tone[first:last] * (1 + SKIN_TEXTURE * _smooth_noise(last - first, 6, size, generator))
        pixels = torch.lerp(background, lesion_colour, lesion_mask)
        if noise > 0:
            pixels = pixels + noise * torch.randn(pixels.shape, generator=generator)
        rendered.append((pixels.clamp(0, 1) * 255).round().to(torch.uint8))
    return torch.cat(rendered)


def _read_cache(path: Path, params: dict) -> torch.Tensor:
    """The cached x1 render; raises on anything that is not a complete cache for ``params``."""
    payload = torch.load(path, map_location="cpu", weights_only=True)
    images = payload["images"]
    size = params["image_size"]
    expected = (len(patient_subtypes(params["patients_scale"])) * params["images_per_patient"], 3, size, size)
    if payload["params"] != params or images.dtype != torch.uint8 or tuple(images.shape) != expected:
        raise ValueError("cache parameters do not match")
    return images


def _write_cache(path: Path, params: dict, images: torch.Tensor) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    torch.save({"params": params, "images": images}, temporary)
    os.replace(temporary, path)  # atomic: a concurrent reader never sees a half-written file


def _x1_images(params: dict, path: Path) -> torch.Tensor:
    """The x1 render from the cache at ``path``, or rendered now and cached."""
    if path.exists():
        try:
            return _read_cache(path, params)
        except Exception as error:  # any unreadable or mismatched file is rebuilt, never fatal
            warnings.warn(f"{NAME} data cache {path} is unreadable ({type(error).__name__}); regenerating it", RuntimeWarning, stacklevel=3)
    images = _generate_images(params)
    try:
        _write_cache(path, params, images)
    except OSError as error:
        warnings.warn(f"could not write {NAME} data cache {path} ({error}); continuing without it", RuntimeWarning, stacklevel=3)
    return images


def grouped_split(
    patients: np.ndarray, binary: np.ndarray, fraction: float, generator: np.random.Generator, *, at_least_one: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Split patient ids into (kept, carved), sorted: of the n patients of each binary class,
    round_half_up(fraction * n) go to carved but never all n; with ``at_least_one``, a class with
    n >= 2 patients always gives at least one."""
    carved = []
    for label in (0, 1):
        members = patients[binary[patients] == label]
        take = min(round_half_up(fraction * len(members)), len(members) - 1)
        if at_least_one and len(members) >= 2:
            take = max(take, 1)
        if take > 0:
            carved.append(generator.choice(members, size=take, replace=False))
    carved_ids = np.sort(np.concatenate(carved)) if carved else np.zeros(0, dtype=np.int64)
    return np.setdiff1d(patients, carved_ids), carved_ids


def deal_patients(subtypes: np.ndarray, generator: np.random.Generator) -> list[np.ndarray]:
    """Patient-disjoint assignment: each subtype's patients, shuffled, are dealt to the clients in
    turn, continuing where the previous subtype stopped (from a random first client), so client
    sizes differ by at most one and every subtype is spread as evenly as its count allows."""
    order = np.concatenate([generator.permutation(np.flatnonzero(subtypes == s)) for s in range(len(SUBTYPE_NAMES))])
    owner = (int(generator.integers(NUM_CLIENTS)) + np.arange(len(order))) % NUM_CLIENTS
    return [np.sort(order[owner == client]) for client in range(NUM_CLIENTS)]


def client_patients(patients: np.ndarray, binary: np.ndarray, val_fraction: float, seed: int, *keys) -> dict[str, np.ndarray]:
    """One client's patient ids per split: 70/30 grouped train/test, then val carved from train."""
    train, test = grouped_split(patients, binary, TEST_FRACTION, numpy_generator(seed, NAME, "test", *keys), at_least_one=True)
    train, val = grouped_split(train, binary, val_fraction, numpy_generator(seed, NAME, "val", *keys), at_least_one=False)
    return {"train": train, "val": val, "test": test}


def _check_arguments(image_size, patients_scale, images_per_patient, labels, shared_images, val_fraction) -> None:
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 16:
        raise ConfigError(f"image_size must be an integer >= 16, got {image_size!r}")
    if isinstance(patients_scale, bool) or not isinstance(patients_scale, (int, float)) or not (0 < patients_scale < math.inf):
        raise ConfigError(f"patients_scale must be a number > 0, got {patients_scale!r}")
    if isinstance(images_per_patient, bool) or not isinstance(images_per_patient, int) or images_per_patient < 1:
        raise ConfigError(f"images_per_patient must be an integer >= 1, got {images_per_patient!r}")
    check_split_options(labels, shared_images, val_fraction)


def check_split_options(labels, shared_images, val_fraction) -> None:
    """The options this data set shares with the real BreakHis loader."""
    if labels not in LABEL_CHOICES:
        raise ConfigError(f"labels must be one of {', '.join(LABEL_CHOICES)}, got {labels!r}")
    if not isinstance(shared_images, bool):
        raise ConfigError(f"shared_images must be true or false, got {shared_images!r}")
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0 <= val_fraction < 1:
        raise ConfigError(f"val_fraction must be in [0, 1), got {val_fraction!r}")


def load(
    *,
    seed: int = 0,
    image_size: int = 32,
    patients_scale: float = 4.0,
    images_per_patient: int = 6,
    labels: str = "binary",
    shared_images: bool = False,
    val_fraction: float = 0.1,
    cache_dir: str | Path | None = None,
    **difficulty: float,
) -> FederatedData:
    """Generate (or load the cached x1 render of) the synthetic multi-resolution data set.

    ``labels``: ``"binary"`` (benign/malignant) or ``"subtype"`` (SUBTYPE_NAMES). ``difficulty``
    takes ``class_overlap``, ``appearance_noise``, ``num_modes``, ``mode_spread`` and
    ``sensor_noise`` (as in ``fedward.data.synthetic``). Only the x1 render is cached; the
    client assignment, splits and degradation are redone at every load (they are cheap), so
    ``labels``, ``shared_images`` and ``val_fraction`` are not part of the cache key.
    """
    _check_arguments(image_size, patients_scale, images_per_patient, labels, shared_images, val_fraction)
    knobs = resolve_knobs(difficulty)
    params = generation_params(seed, image_size, float(patients_scale), images_per_patient, knobs)
    path = cache_path(Path(cache_dir) if cache_dir is not None else cache_root(), params)
    x1 = _x1_images(params, path)

    subtypes = patient_subtypes(patients_scale).numpy()
    binary = (subtypes >= NUM_BENIGN_SUBTYPES).astype(np.int64)
    patient_labels = torch.from_numpy(subtypes if labels == "subtype" else binary)
    all_patients = np.arange(len(subtypes))
    if shared_images:
        splits = [client_patients(all_patients, binary, val_fraction, seed, "shared", split_seed)
                  for split_seed in REPRODUCTION_SPLIT_SEEDS]  # fmt: skip
    else:
        owners = deal_patients(subtypes, numpy_generator(seed, NAME, "clients"))
        splits = [client_patients(owned, binary, val_fraction, seed, client) for client, owned in enumerate(owners)]

    clients, patients_info, views_info = [], [], []
    for client, parts in enumerate(splits):
        built, patients_info_k, views_info_k = {}, {}, {}
        for split in SPLITS:
            image_ids = (parts[split][:, None] * images_per_patient + np.arange(images_per_patient)).reshape(-1)
            order = numpy_generator(seed, NAME, "order", "shared" if shared_images else "disjoint", client, split)
            image_ids = torch.from_numpy(order.permutation(image_ids))
            patient_ids = image_ids // images_per_patient
            built[split] = Split(degrade(x1[image_ids], DOWNSAMPLING[client]), patient_labels[patient_ids].clone())
            patients_info_k[split] = patient_ids.tolist()
            views_info_k[split] = (image_ids % images_per_patient).tolist()
        clients.append(ClientData(client, CLIENT_NAMES[client], built["train"], built["val"], built["test"]))
        patients_info.append(patients_info_k)
        views_info.append(views_info_k)

    class_names = list(SUBTYPE_NAMES) if labels == "subtype" else list(BINARY_NAMES)
    info = {"source": NAME, "seed": seed, "image_size": image_size, "patients_scale": float(patients_scale),
            "images_per_patient": images_per_patient, "labels": labels, "shared_images": shared_images,
            "val_fraction": val_fraction, "downsampling": list(DOWNSAMPLING), "generator_version": GENERATOR_VERSION,
            "difficulty": knobs, "cache_file": str(path), "patient_subtypes": subtypes.tolist(),
            "patients": patients_info, "views": views_info}  # fmt: skip
    return FederatedData(NAME, len(class_names), class_names, image_size, clients, info=info)


@dataclass
class Options(BreakHisLabels, ValidationSplit):
    patients_scale: float = option(4.0, "synthetic patients per BreakHis patient (82 x scale patients)", check=POSITIVE)


@register_dataset(NAME, options=Options, needs_data_dir=False)
def from_config(cfg) -> FederatedData:
    """built in, BreakHis-like: 4 clients at x1/x2/x4/x8 resolution (for mhpflid)"""
    return load(seed=cfg.data_seed, image_size=cfg.image_size, patients_scale=cfg.patients_scale, labels=cfg.label_set,
                shared_images=cfg.shared_images, val_fraction=cfg.val_fraction)
