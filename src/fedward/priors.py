"""Frozen self-supervised priors for Fed-MAS: an encoder giving pooled features f(x).

The reference (fedmas.md section 2.1) builds torchvision's ResNet-50, loads the query encoder of
the MoCo-v2 checkpoint (``state_dict`` with ``module.encoder_q.*`` keys), drops the MLP head and
uses the 2048-d average-pooled backbone feature, with every parameter frozen. ``--pre_trained_models``
picks the checkpoint: ``moco``, ``IMAGENET1K_V1`` (which in the reference actually loads ResNet-50
*V2* weights), ``18_img`` (ResNet-18 ImageNet, 512-d), ``mix`` (each client gets ``moco`` or
``IMAGENET1K_V1``), or a file path. fedward adds ``random`` (a seeded random ResNet-50: the control)
and ``auto`` (the MoCo-v2 file if it is there, otherwise a MoCo-v2 prior fedward trains on the
built-in data set's public split, once, and caches).

A public prior missing from fedward's cache is downloaded there when the run needs it, as
``fedward prior download NAME`` does; with ``--offline`` (``FEDWARD_OFFLINE``) or an explicit
``--prior_path``, a missing file is an error that says where to put it and names that command.
A checkpoint that names its architecture (MoCo's ``arch`` key, also written by ``fedward prior
train``) is built as that architecture, so a self-trained ResNet-18 prior loads like the real
ResNet-50 one.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from fedward.download import RemoteFile
from fedward.errors import CheckpointError, ConfigError
from fedward.models import get_model, list_models, model_options
from fedward.models.pretrained import MAX_KEYS_IN_ERROR, read_state_dict
from fedward.seeding import numpy_generator

MOCO_FILE = "moco_v2_800ep_pretrain.pth.tar"
# name -> (architecture, file name looked for in the prior folder)
PRIOR_FILES = {
    "moco": ("resnet50", MOCO_FILE),
    # The reference's IMAGENET1K_V1 prior loads torchvision's ResNet-50 IMAGENET1K_V2 weights.
    "IMAGENET1K_V1": ("resnet50", "resnet50-11ad3fa6.pth"),
    "18_img": ("resnet18", "resnet18-f37072fd.pth"),
}
# Where ``fedward prior download`` fetches them, with the published checksum prefixes: the MoCo
# README gives the md5's first 8 hex digits; torchvision file names carry the sha256's.
REMOTE_PRIORS = {
    "moco": RemoteFile(MOCO_FILE, "https://dl.fbaipublicfiles.com/moco/moco_checkpoints/moco_v2_800ep/" + MOCO_FILE,
                       md5_prefix="a04e12f8",
                       licence="MoCo-v2 weights (facebookresearch/moco) are released under CC BY-NC 4.0: non-commercial use only."),
    "IMAGENET1K_V1": RemoteFile("resnet50-11ad3fa6.pth", "https://download.pytorch.org/models/resnet50-11ad3fa6.pth",
                                sha256_prefix="11ad3fa6"),
    "18_img": RemoteFile("resnet18-f37072fd.pth", "https://download.pytorch.org/models/resnet18-f37072fd.pth",
                         sha256_prefix="f37072fd"),
}
PRIOR_ALIASES = {"moco-v2": "moco", "moco_v2": "moco"}
# --pre_trained_models mix: the reference assigns each client one of these (see client_prior_names).
MIX = ("IMAGENET1K_V1", "moco")
# channels_last from 128 px: bench/bench_fedmas.py measured the prior's forward at 224 px (batch 32,
# 2 CPU threads) 1.47x faster for ResNet-50 and 1.29x for ResNet-18, and 0.95-0.97x at 32 px.
CHANNELS_LAST_MIN_SIZE = 128


def default_prior_dir() -> Path:
    """Where fedward looks for prior checkpoints: ``$FEDWARD_CACHE/priors`` (default ``~/.cache/fedward``)."""
    from fedward.paths import cache_root

    return cache_root() / "priors"


class FrozenPrior(nn.Module):
    """An encoder whose pooled feature is the prior f(x); always in eval mode, never trained.

    ``keep_batchnorm_drift`` reproduces the reference's round-0 quirk (fedmas.md section 7 item 9):
    its prior runs once in train mode, so BatchNorm running statistics move towards the client's data.
    """

    def __init__(self, encoder: nn.Module, *, keep_batchnorm_drift: bool = False, channels_last: bool = False):
        super().__init__()
        self.encoder = encoder
        self.keep_batchnorm_drift = keep_batchnorm_drift
        # channels_last: see CHANNELS_LAST_MIN_SIZE; load_prior turns it on by image size.
        self.channels_last = channels_last
        if channels_last:
            self.encoder.to(memory_format=torch.channels_last)
        self.num_features = encoder.num_features
        for param in self.encoder.parameters():
            param.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> "FrozenPrior":
        # Switching a frozen prior to train mode would normalise with batch statistics and move
        # its running statistics; only the reference-quirk flag allows it.
        return super().train(mode and self.keep_batchnorm_drift)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return self.encoder.embed(images)


def resolve_prior_file(name: str, prior_path: str | Path | None) -> tuple[str, Path]:
    """(architecture, file) for a ``--pre_trained_models`` value and an optional explicit path."""
    if name in PRIOR_FILES:
        architecture, file_name = PRIOR_FILES[name]
        path = Path(prior_path).expanduser() if prior_path else default_prior_dir() / file_name
        if not path.is_file():
            fetch_prior_file(name, path, explicit=bool(prior_path))
        return checkpoint_architecture(path, architecture), path
    candidate = Path(name).expanduser()
    if candidate.is_file():
        return checkpoint_architecture(candidate, "resnet50"), candidate
    raise ConfigError(f"--pre_trained_models '{name}' is neither one of {', '.join(PRIOR_FILES)}, mix, auto, random, "
                      "nor an existing file")


def checkpoint_architecture(path: Path, default: str) -> str:
    """The architecture a checkpoint names in its top-level ``arch`` key (MoCo's and fedward's
    format), else ``default``. Loaded memory-mapped, so reading it costs almost nothing."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # not a zip checkpoint (or unreadable): load_prior reports it properly
        return default
    arch = payload.get("arch") if isinstance(payload, dict) else None
    if arch is None:
        return default
    if arch not in list_models():
        raise CheckpointError(f"prior file {path} names architecture {arch!r}, which is not a registered model "
                              f"({', '.join(list_models())})")
    return str(arch)


def client_prior_names(name: str, num_clients: int, seed: int) -> list[str]:
    """The prior each client uses. ``mix``: a seeded random permutation of ``MIX`` repeated over the
    clients, so the two priors are split as evenly as possible. The reference assigns per client
    from a seeded permutation too; its exact split is not recoverable from the notes (an unclear
    point, stated in the docs). Any other name: every client uses it."""
    if name != "mix":
        return [name] * num_clients
    pool = [MIX[i % len(MIX)] for i in range(num_clients)]
    order = numpy_generator(seed, "prior-mix").permutation(num_clients)
    return [pool[i] for i in order]


def resolve_auto(image_size: int, prior_path: str | Path | None = None) -> str:
    """``auto``: the MoCo-v2 checkpoint when it is present, else fedward's self-trained prior file
    (trained on first use; see ``selfsup.cached_prior``)."""
    moco = Path(prior_path).expanduser() if prior_path else default_prior_dir() / MOCO_FILE
    if moco.is_file():
        return str(moco)
    from fedward.selfsup.cached import cached_prior_path

    return str(cached_prior_path(image_size))


def prior_dim(name: str, prior_path: str | Path | None = None, image_size: int = 224) -> int:
    """Feature width of a prior: 512 for ResNet-18 priors, 2048 for ResNet-50 ones."""
    if name == "random":
        return 2048
    if name == "auto":
        from fedward.selfsup.cached import cached_prior_settings

        path = resolve_auto(image_size, prior_path)
        if not Path(path).is_file():  # not trained yet: its settings say what it will be
            return prior_dim_of(cached_prior_settings(image_size).arch)
        name, prior_path = path, None
    names = set(client_prior_names(name, len(MIX), 0))
    dims = {prior_dim_of(_architecture(n, prior_path)) for n in names}
    if len(dims) > 1:
        raise ConfigError(f"--pre_trained_models {name}: its priors have different feature widths {sorted(dims)}")
    return dims.pop()


def _architecture(name: str, prior_path: str | Path | None) -> str:
    try:
        return resolve_prior_file(name, prior_path)[0]
    except CheckpointError:
        if name in PRIOR_FILES:  # a missing file is reported when the prior is loaded
            return PRIOR_FILES[name][0]
        raise


def prior_dim_of(architecture: str) -> int:
    """Pooled feature width of a registered architecture (built tiny, on the meta device)."""
    with torch.device("meta"):
        return int(get_model(architecture, num_classes=1, image_size=32).num_features)


def load_prior(name: str, *, prior_path: str | Path | None = None, image_size: int = 224,
               keep_batchnorm_drift: bool = False, seed: int = 0, progress: bool = True) -> FrozenPrior:
    """Build the prior's encoder and load its backbone weights (every backbone key must be in the
    file; MoCo's MLP head and key encoder are dropped). ``random``: a seeded, randomly initialised
    ResNet-50 (the control that shows what the prior's training contributes)."""
    if name == "auto":
        from fedward.selfsup.cached import ensure_cached_prior

        resolved = resolve_auto(image_size, prior_path)
        if not Path(resolved).is_file():
            ensure_cached_prior(image_size, progress=progress)
        name, prior_path = resolved, None
    if name == "mix":
        raise ConfigError("--pre_trained_models mix is resolved per client; load one of its priors by name")
    if name == "random":
        generator = torch.Generator().manual_seed(seed)
        encoder = get_model("resnet50", num_classes=1, image_size=image_size, stem="imagenet", generator=generator)
        encoder.fc = nn.Identity()
        return FrozenPrior(encoder, keep_batchnorm_drift=keep_batchnorm_drift,
                           channels_last=image_size >= CHANNELS_LAST_MIN_SIZE)
    architecture, path = resolve_prior_file(name, prior_path)
    # The real priors (and fedward's MoCo training) use the ImageNet stem at every image size.
    stem = {"stem": "imagenet"} if "stem" in model_options(architecture) else {}
    encoder = get_model(architecture, num_classes=1, image_size=image_size, **stem)
    encoder.fc = nn.Identity()  # f(x) is the pooled backbone feature, not a projection
    file_sd = {k: v for k, v in read_state_dict(path).items() if "fc" not in k.split(".")}
    model_sd = encoder.state_dict()
    missing = [k for k in model_sd if k not in file_sd and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in file_sd if k not in model_sd]
    wrong = [f"{k} (model {tuple(model_sd[k].shape)}, file {tuple(file_sd[k].shape)})"
             for k in model_sd if k in file_sd and file_sd[k].shape != model_sd[k].shape]
    if missing or unexpected or wrong:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
            if keys:
                parts.append(f"{label}: {', '.join(keys[:MAX_KEYS_IN_ERROR])}"
                             + (f" (+{len(keys) - MAX_KEYS_IN_ERROR} more)" if len(keys) > MAX_KEYS_IN_ERROR else ""))
        raise CheckpointError(f"prior file {path} is not a {architecture} backbone: {'; '.join(parts)}")
    encoder.load_state_dict(file_sd, strict=False)
    return FrozenPrior(encoder, keep_batchnorm_drift=keep_batchnorm_drift,
                       channels_last=image_size >= CHANNELS_LAST_MIN_SIZE)


def fetch_prior_file(name: str, path: Path, *, explicit: bool) -> None:
    """A public prior missing from fedward's cache is downloaded there, with a notice (the licence
    with it); an explicit ``--prior_path`` that is missing, or downloads off, is an error that names
    the command fetching it."""
    from fedward import logs
    from fedward.download import DownloadError, offline

    command = f"`fedward prior download {name} --to {path.parent}`"
    missing = f"prior '{name}' needs {PRIOR_FILES[name][1]}: not found at {path}"
    if explicit:
        raise CheckpointError(f"{missing}; put it there ({command} fetches it as {PRIOR_FILES[name][1]})")
    if offline():
        raise CheckpointError(f"{missing} and downloads are off (--offline or FEDWARD_OFFLINE); put it there, pass "
                              f"--prior_path PATH, or run {command} on a machine with internet")
    remote = REMOTE_PRIORS[name]
    logs.info(f"prior '{name}': downloading {remote.url} into {path.parent}"
              + (f" ({remote.licence})" if remote.licence else ""))
    try:
        download_prior(name, path.parent, accept_licence=True)
    except DownloadError as err:
        raise CheckpointError(f"{missing} and could not be downloaded ({err}); put it there, pass --prior_path "
                              f"PATH, or run {command} on a machine with internet") from None


def download_prior(name: str, folder: str | Path | None = None, *, accept_licence: bool = False,
                   progress: bool = True) -> Path:
    """Fetch a public prior checkpoint (resumable, checksum-verified), then check that it loads:
    every backbone key present with the right shape."""
    from fedward.download import download

    key = PRIOR_ALIASES.get(name, name)
    if key not in REMOTE_PRIORS:
        raise ConfigError(f"no public checkpoint named {name!r}; expected one of: "
                          f"{', '.join(sorted([*REMOTE_PRIORS, *PRIOR_ALIASES]))}")
    path = download(REMOTE_PRIORS[key], Path(folder).expanduser() if folder else default_prior_dir(),
                    progress=progress, accept_licence=accept_licence)
    load_prior(key, prior_path=path, image_size=32)  # raises, naming missing/unexpected keys
    return path
