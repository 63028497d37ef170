"""Frozen self-supervised priors for Fed-MAS: an encoder giving pooled features f(x).

The reference (fedmas.md section 2.1) builds torchvision's ResNet-50, loads the query encoder of
the MoCo-v2 checkpoint (``state_dict`` with ``module.encoder_q.*`` keys), drops the MLP head and
uses the 2048-d average-pooled backbone feature, with every parameter frozen. ``--pre_trained_models``
picks the checkpoint: ``moco``, ``IMAGENET1K_V1`` (which in the reference actually loads ResNet-50
*V2* weights), ``18_img`` (ResNet-18 ImageNet, 512-d) or a file path.

Weights cannot be downloaded at run time here: every prior loads from a local file, and a missing
file is an error that says where to put it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from fedward.errors import CheckpointError, ConfigError
from fedward.models import get_model
from fedward.models.pretrained import MAX_KEYS_IN_ERROR, read_state_dict

MOCO_FILE = "moco_v2_800ep_pretrain.pth.tar"
# name -> (architecture, file name looked for in the prior folder)
PRIOR_FILES = {
    "moco": ("resnet50", MOCO_FILE),
    # The reference's IMAGENET1K_V1 prior loads torchvision's ResNet-50 IMAGENET1K_V2 weights.
    "IMAGENET1K_V1": ("resnet50", "resnet50-11ad3fa6.pth"),
    "18_img": ("resnet18", "resnet18-f37072fd.pth"),
}


def default_prior_dir() -> Path:
    """Where fedward looks for prior checkpoints: ``$FEDWARD_CACHE/priors`` (default ``~/.cache/fedward``)."""
    import os

    root = os.environ.get("FEDWARD_CACHE") or str(Path.home() / ".cache" / "fedward")
    return Path(root) / "priors"


class FrozenPrior(nn.Module):
    """An encoder whose pooled feature is the prior f(x); always in eval mode, never trained.

    ``keep_batchnorm_drift`` reproduces the reference's round-0 quirk (fedmas.md section 7 item 9):
    its prior runs once in train mode, so BatchNorm running statistics move towards the client's data.
    """

    def __init__(self, encoder: nn.Module, *, keep_batchnorm_drift: bool = False):
        super().__init__()
        self.encoder = encoder
        self.keep_batchnorm_drift = keep_batchnorm_drift
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
        return self.encoder.embed(images)


def resolve_prior_file(name: str, prior_path: str | Path | None) -> tuple[str, Path]:
    """(architecture, file) for a ``--pre_trained_models`` value and an optional explicit path."""
    if name in PRIOR_FILES:
        architecture, file_name = PRIOR_FILES[name]
        path = Path(prior_path).expanduser() if prior_path else default_prior_dir() / file_name
        if not path.is_file():
            raise CheckpointError(f"prior '{name}' needs {file_name}: not found at {path}; put it there or pass "
                                  f"--prior_path PATH")
        return architecture, path
    candidate = Path(name).expanduser()
    if candidate.is_file():
        return "resnet50", candidate
    raise ConfigError(f"--pre_trained_models '{name}' is neither one of {', '.join(PRIOR_FILES)}, random, "
                      "nor an existing file")


def prior_dim(name: str) -> int:
    """Feature width of a prior: 512 for ResNet-18 priors, 2048 for ResNet-50 ones (and files)."""
    return 512 if name in PRIOR_FILES and PRIOR_FILES[name][0] == "resnet18" else 2048


def load_prior(name: str, *, prior_path: str | Path | None = None, image_size: int = 224,
               keep_batchnorm_drift: bool = False, seed: int = 0) -> FrozenPrior:
    """Build the prior's encoder and load its backbone weights (every backbone key must be in the
    file; MoCo's MLP head and key encoder are dropped). ``random``: a seeded, randomly initialised
    ResNet-50 (the control that shows what the prior's training contributes)."""
    if name == "random":
        generator = torch.Generator().manual_seed(seed)
        encoder = get_model("resnet50", num_classes=1, image_size=image_size, stem="imagenet", generator=generator)
        encoder.fc = nn.Identity()
        return FrozenPrior(encoder, keep_batchnorm_drift=keep_batchnorm_drift)
    architecture, path = resolve_prior_file(name, prior_path)
    encoder = get_model(architecture, num_classes=1, image_size=image_size, stem="imagenet")
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
    return FrozenPrior(encoder, keep_batchnorm_drift=keep_batchnorm_drift)
