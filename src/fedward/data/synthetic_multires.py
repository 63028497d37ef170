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

The label lives in fine detail, as BreakHis's benign/malignant signal (nuclear texture) does:
every image is a tissue field with a "chromatin" texture, zero-mean block noise at block sizes
1, 2, 4 and 8 pixels (``TEXTURE_SCALES``, weighted by the subtype's ``SCALE_PROFILES``), whose
amplitude is the patient's and is higher for malignant patients (the two amplitude ranges overlap
by ``class_overlap``). The texture moves each pixel by a symmetric, never-clipped amount, so a
region's mean colour does not depend on the label; area downsampling by d averages the blocks
smaller than d away, so the x2, x4 and x8 clients see less and less of the cue. The coarse
appearance (colour, lesion shape, skin tone: one of four tissue prototypes of
``fedward.data.synthetic`` per patient, ``TISSUE_PROTOTYPES``, with appearance modes and patient
and view jitter) is drawn independently of the label. A linear probe on fixed random features
(``fedward.data.probe``) of all patients' images degraded by 1/2/4/8/32 scores
0.85/0.77/0.76/0.66/0.49 balanced accuracy at 32 px (mean of data seeds 0 and 1; the test
checks the trend); the first version of this set, whose classes differed in colour and shape,
scored 0.79/0.79/0.77/0.73/0.57 on the same probe: no trend, and label signal in the mean colour.
There is no per-client acquisition shift: resolution is the only thing
that differs between clients.

Two settings:

* ``shared_images=False`` (default, patient-disjoint): patients are dealt to the four clients,
  stratified by subtype, so no patient is at two clients; each client splits its own patients.
* ``shared_images=True`` (the MH-pFLID reproduction's data): every client holds all patients' images
  at its own resolution. By default one patient-grouped split serves every client, so a test
  patient is a test patient everywhere and only the resolution differs. With
  ``split_per_client=True`` each client re-splits all patients with its own seed from
  ``REPRODUCTION_SPLIT_SEEDS``, as the reproduction does: then most of one client's test patients
  are another client's training patients, and a shared model carries them across (a leak; it
  warns).

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
# Coarse tissue appearances (indices into synthetic.CLASS_NAMES): each patient draws one uniformly,
# independently of its subtype, so colour and shape, which survive downsampling, carry no label.
TISSUE_PROTOTYPES = tuple(synthetic.CLASS_NAMES.index(p) for p in ("BKL", "NV", "DF", "VASC"))
# The fine "chromatin" texture: zero-mean block noise at these block sizes in pixels. Area
# downsampling by d averages a block of size c < d away (its residual std is about c / d), so
# client x_d keeps only the components with c >= d.
TEXTURE_SCALES = (1, 2, 4, 8)
# Each subtype's weight on each texture scale (the subtype task's cue): pair p = subtype % 4, one
# benign and one malignant subtype, leans on scale p. Every profile has the same total energy.
SCALE_PROFILES = tuple(tuple(0.6 if c == s % 4 else 0.35 for c in range(len(TEXTURE_SCALES))) for s in range(8))
# The label: a patient's texture amplitude, uniform on [low, high] for its binary class, the two
# ranges overlapping by class_overlap x OVERLAP_WIDTH around MIDPOINT.
AMPLITUDE_RANGE = (0.05, 0.95)
MIDPOINT = 0.5
OVERLAP_WIDTH = 0.4
FINE_CONTRAST = 1.0  # texture strength at amplitude 1, in units of a pixel's headroom to 0 or 1
VIEW_AMPLITUDE_NOISE = 0.1  # relative jitter of the amplitude between a patient's images
# The seeds the MH-pFLID reproduction split each client's patients with (shared_images=True).
REPRODUCTION_SPLIT_SEEDS = (17, 27, 117, 1017)

TEST_FRACTION = 0.3
VIEW_NOISE = 0.3  # per-view jitter of the patient's coarse appearance features, x FEATURE_SCALE
SKIN_JITTER = 0.04  # per-patient skin tone spread along COLOUR_AXES
SKIN_TEXTURE = 0.04
SENSOR_NOISE = 0.02  # std on [0, 1] pixels, times the sensor_noise knob
# The difficulty knobs that act here (there are no hospital mixtures or acquisition profiles, so
# mode_concentration and hospital_shift do not apply). class_overlap is the overlap of the benign
# and malignant texture amplitudes; the others shape the coarse appearance as in
# fedward.data.synthetic.
KNOBS = ("class_overlap", "appearance_noise", "num_modes", "mode_spread", "sensor_noise")

# Bump whenever a change alters the rendered x1 pixels: it is part of the cache key.
GENERATOR_VERSION = 2
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


def texture_amplitudes(binary: torch.Tensor, class_overlap: float, generator: torch.Generator) -> torch.Tensor:
    """(P,) each patient's fine-texture amplitude: uniform on its binary class's range."""
    half = 0.5 * class_overlap * OVERLAP_WIDTH
    low = torch.where(binary == 1, torch.tensor(MIDPOINT - half), torch.tensor(AMPLITUDE_RANGE[0]))
    high = torch.where(binary == 1, torch.tensor(AMPLITUDE_RANGE[1]), torch.tensor(MIDPOINT + half))
    return low + (high - low) * torch.rand(len(binary), generator=generator)


def fine_texture(weights: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """(N, 1, S, S) zero-mean unit-variance texture: per image, the sum over TEXTURE_SCALES of block
    noise (a Gaussian per c x c block, the grid aligned to the image) weighted by ``weights`` (N, 4)."""
    total = torch.zeros(len(weights), 1, size, size)
    for column, scale in enumerate(TEXTURE_SCALES):
        cells = -(-size // scale)
        blocks = torch.randn(len(weights), 1, cells, cells, generator=generator)
        field = blocks.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)[..., :size, :size]
        total += weights[:, column].reshape(-1, 1, 1, 1) * field
    return total / weights.pow(2).sum(1).sqrt().reshape(-1, 1, 1, 1)


def _render(params: dict, subtypes: torch.Tensor | None = None, stream: tuple = ()) -> torch.Tensor:
    """The x1 images of ``subtypes``' patients (default: the data set's own), with random streams
    keyed by ``stream`` (the public split draws other patients from other streams)."""
    seed, size, views, knobs = params["seed"], params["image_size"], params["images_per_patient"], params["difficulty"]
    if subtypes is None:
        subtypes = patient_subtypes(params["patients_scale"])
    patients = len(subtypes)
    keys = (NAME, *stream)
    per_patient = torch_generator(seed, *keys, "patients")
    tissue = torch.tensor(TISSUE_PROTOTYPES)[torch.randint(len(TISSUE_PROTOTYPES), (patients,), generator=per_patient)]
    mode = torch.randint(knobs["num_modes"], (patients,), generator=per_patient)
    patient_jitter = knobs["appearance_noise"] * FEATURE_SCALE * feature_noise(patients, per_patient)
    lesion_features = (appearance_modes(seed, knobs)[tissue, mode] + patient_jitter).clamp(FEATURE_MIN, FEATURE_MAX)
    skin_tone = torch.tensor(SKIN_COMMON) + SKIN_JITTER * torch.randn(patients, 3, generator=per_patient) @ COLOUR_AXES.T
    skin_tone = skin_tone.clamp(0, 1).repeat_interleave(views, dim=0)[:, :, None, None]
    binary = (subtypes >= NUM_BENIGN_SUBTYPES).long()
    amplitude = texture_amplitudes(binary, knobs["class_overlap"], torch_generator(seed, *keys, "amplitudes"))
    view_generator = torch_generator(seed, *keys, "views")
    view_jitter = VIEW_NOISE * FEATURE_SCALE * feature_noise(patients * views, view_generator)
    features = (lesion_features.repeat_interleave(views, dim=0) + view_jitter).clamp(FEATURE_MIN, FEATURE_MAX)
    amplitude = (amplitude.repeat_interleave(views)
                 * (1 + VIEW_AMPLITUDE_NOISE * torch.randn(patients * views, generator=view_generator))).clamp(min=0)
    weights = torch.tensor(SCALE_PROFILES)[subtypes].repeat_interleave(views, dim=0)
    generator = torch_generator(seed, *keys, "render")
    noise = SENSOR_NOISE * knobs["sensor_noise"]
    rendered = []
    for first in range(0, len(features), RENDER_CHUNK):
        last = min(first + RENDER_CHUNK, len(features))
        lesion_mask, lesion_colour = render_lesions(features[first:last], size, generator)
        background = skin_tone[first:last] * (1 + SKIN_TEXTURE * _smooth_noise(last - first, 6, size, generator))
        pixels = torch.lerp(background, lesion_colour, lesion_mask)
        # The label's cue: fine texture over the whole tissue field. It moves each pixel by
        # headroom * tanh(.) of a symmetric zero-mean field, which never leaves [0, 1], so nothing is
        # clipped and the mean colour of a region (all a coarse client sees) does not depend on the label.
        texture = fine_texture(weights[first:last], size, generator)
        headroom = torch.minimum(pixels, 1 - pixels).clamp(min=0)
        pixels = pixels + headroom * torch.tanh(FINE_CONTRAST * amplitude[first:last].reshape(-1, 1, 1, 1) * texture)
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


def shared_image_splits(groups: np.ndarray, binary: np.ndarray, val_fraction: float, seed: int, *keys,
                        split_per_client: bool) -> list[dict[str, np.ndarray]]:
    """Every client's split of all patient groups (``shared_images``): one split for all clients, or
    with ``split_per_client`` one per client from ``REPRODUCTION_SPLIT_SEEDS`` (the reproduction's)."""
    if split_per_client:
        warnings.warn("split_per_client: each client re-splits all patients with its own seed (the MH-pFLID "
                      "reproduction): most of a client's test patients are other clients' training patients, and the "
                      "shared model carries them across", UserWarning, stacklevel=3)
        return [client_patients(groups, binary, val_fraction, seed, *keys, "shared", split_seed)
                for split_seed in REPRODUCTION_SPLIT_SEEDS]  # fmt: skip
    one = client_patients(groups, binary, val_fraction, seed, *keys, "shared")
    return [one] * NUM_CLIENTS


def _check_arguments(image_size, patients_scale, images_per_patient, labels, shared_images, val_fraction,
                     split_per_client) -> None:
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 16:
        raise ConfigError(f"image_size must be an integer >= 16, got {image_size!r}")
    if isinstance(patients_scale, bool) or not isinstance(patients_scale, (int, float)) or not (0 < patients_scale < math.inf):
        raise ConfigError(f"patients_scale must be a number > 0, got {patients_scale!r}")
    if isinstance(images_per_patient, bool) or not isinstance(images_per_patient, int) or images_per_patient < 1:
        raise ConfigError(f"images_per_patient must be an integer >= 1, got {images_per_patient!r}")
    check_split_options(labels, shared_images, val_fraction, split_per_client)


def check_split_options(labels, shared_images, val_fraction, split_per_client) -> None:
    """The options this data set shares with the real BreakHis loader."""
    if labels not in LABEL_CHOICES:
        raise ConfigError(f"labels must be one of {', '.join(LABEL_CHOICES)}, got {labels!r}")
    if not isinstance(shared_images, bool):
        raise ConfigError(f"shared_images must be true or false, got {shared_images!r}")
    if not isinstance(split_per_client, bool):
        raise ConfigError(f"split_per_client must be true or false, got {split_per_client!r}")
    if split_per_client and not shared_images:
        raise ConfigError("--split_per_client applies with --shared_images true (disjoint patients already give each "
                          "client its own split)")
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
    split_per_client: bool = False,
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
    _check_arguments(image_size, patients_scale, images_per_patient, labels, shared_images, val_fraction,
                     split_per_client)
    knobs = resolve_knobs(difficulty)
    params = generation_params(seed, image_size, float(patients_scale), images_per_patient, knobs)
    path = cache_path(Path(cache_dir) if cache_dir is not None else cache_root(), params)
    x1 = _x1_images(params, path)

    subtypes = patient_subtypes(patients_scale).numpy()
    binary = (subtypes >= NUM_BENIGN_SUBTYPES).astype(np.int64)
    patient_labels = torch.from_numpy(subtypes if labels == "subtype" else binary)
    all_patients = np.arange(len(subtypes))
    if shared_images:
        splits = shared_image_splits(all_patients, binary, val_fraction, seed, split_per_client=split_per_client)
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
            "split_per_client": split_per_client,
            "val_fraction": val_fraction, "downsampling": list(DOWNSAMPLING), "generator_version": GENERATOR_VERSION,
            "difficulty": knobs, "cache_file": str(path), "patient_subtypes": subtypes.tolist(),
            "patients": patients_info, "views": views_info}  # fmt: skip
    return FederatedData(NAME, len(class_names), class_names, image_size, clients, info=info)


def public_split(*, seed: int = 0, image_size: int = 32, count: int = 1200, labels: str = "binary",
                 **difficulty: float) -> Split:
    """A labelled "public" set at full resolution for the public-data baselines (FedMD, FedDF, KT-pFL ...):
    ``count`` images of other patients (BreakHis's subtype mix, ``images_per_patient`` 6) drawn from
    random streams no client uses, in a random order. Which public set the MH-pFLID paper's
    baselines used is not known; this plays its role."""
    if isinstance(count, bool) or not isinstance(count, int) or count < 2:
        raise ConfigError(f"public split size must be an integer >= 2, got {count!r}")
    check_split_options(labels, False, 0.0, False)
    knobs = resolve_knobs(difficulty)
    views = 6
    patients = -(-count // views)
    generator = torch_generator(seed, NAME, "public", "subtypes")
    weights = torch.tensor(BREAKHIS_PATIENTS, dtype=torch.float64)
    subtypes = torch.multinomial(weights, patients, replacement=True, generator=generator)
    params = generation_params(seed, image_size, 1.0, views, knobs)
    with _one_thread():
        images = _render(params, subtypes, ("public",))[:count]
    subtype_of_image = subtypes.repeat_interleave(views)[:count]
    targets = subtype_of_image if labels == "subtype" else (subtype_of_image >= NUM_BENIGN_SUBTYPES).long()
    order = torch.randperm(count, generator=generator)
    return Split(images[order], targets[order].clone())


@dataclass
class Options(BreakHisLabels, ValidationSplit):
    patients_scale: float = option(4.0, "synthetic patients per BreakHis patient (82 x scale patients)", check=POSITIVE)


def public_from_config(cfg, count: int) -> Split:
    return public_split(seed=cfg.data_seed, image_size=cfg.image_size, count=count, labels=cfg.label_set)


@register_dataset(NAME, options=Options, needs_data_dir=False, public=public_from_config)
def from_config(cfg) -> FederatedData:
    """built in, BreakHis-like: 4 clients at x1/x2/x4/x8 resolution (for mhpflid)"""
    return load(seed=cfg.data_seed, image_size=cfg.image_size, patients_scale=cfg.patients_scale, labels=cfg.label_set,
                shared_images=cfg.shared_images, split_per_client=cfg.split_per_client, val_fraction=cfg.val_fraction)
