"""ImageNet weights for the torchvision ResNets, from a local file in torchvision's format.

No download: the file is looked up where torchvision itself caches it
(``$TORCH_HOME/hub/checkpoints/<file>``), so anyone who has run torchvision once already has it.
As in the reference code, the classifier (``fc``) is not loaded: heads start from random init.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
import torch.hub
from torch import nn

from fedward.errors import CheckpointError, ConfigError
from fedward.models.heads import ProjectionModel

TORCHVISION_FILES: dict[str, str] = {
    "resnet18": "resnet18-f37072fd.pth",
    "resnet34": "resnet34-b627a593.pth",
    "resnet50": "resnet50-0676ba61.pth",
}

# torchvision's own download location; a file name carries the first 8 hex digits of its sha256.
TORCHVISION_URL = "https://download.pytorch.org/models/"

MAX_KEYS_IN_ERROR = 5


def torchvision_remote(model_name: str):
    """The torchvision weights file of ``model_name`` as a checksum-verified download."""
    from fedward.download import RemoteFile

    file_name = _check_model_name(model_name)
    return RemoteFile(file_name, TORCHVISION_URL + file_name, sha256_prefix=file_name.rsplit("-", 1)[1].split(".")[0])


def fetch_torchvision_weights(model_name: str, *, progress: bool = True) -> Path:
    """Download ``model_name``'s torchvision weights into torchvision's cache, as torchvision does
    on first use (resumable, checksum-verified); offline, an error that says where to put the file."""
    from fedward import logs
    from fedward.download import DownloadError, download, offline
    from fedward.priors import REMOTE_PRIORS

    target = default_weights_path(model_name)
    remote = torchvision_remote(model_name)
    if offline():
        fetch = next((f"run `fedward prior download {name} --to {target.parent}`" for name, known in REMOTE_PRIORS.items()
                      if known.name == remote.name), f"fetch {remote.url}")
        raise CheckpointError(f"ImageNet weights for {model_name} are not at {target} and downloads are off "
                              f"(--offline or FEDWARD_OFFLINE): on a machine with internet {fetch}, put it at {target}, "
                              "or pass --pre_trained_tv PATH")
    logs.info(f"downloading torchvision's ImageNet weights {remote.name} into {target.parent}")
    try:
        return download(remote, target.parent, progress=progress)
    except DownloadError as err:
        raise CheckpointError(f"ImageNet weights for {model_name} are not at {target} and could not be downloaded "
                              f"({err}); on a machine with internet fetch {remote.url}, put it at {target}, or pass "
                              "--pre_trained_tv PATH") from None


def _check_model_name(model_name: str) -> str:
    if model_name not in TORCHVISION_FILES:
        raise ConfigError(
            f"model {model_name!r} has no torchvision ImageNet weights; expected one of: {', '.join(TORCHVISION_FILES)}"
        )
    return TORCHVISION_FILES[model_name]


def default_weights_path(model_name: str) -> Path:
    """``$TORCH_HOME/hub/checkpoints/<torchvision file>`` (TORCH_HOME defaults to ~/.cache/torch)."""
    file_name = _check_model_name(model_name)
    # torch.hub.get_dir() reads TORCH_HOME (and XDG_CACHE_HOME) on every call, exactly as torchvision does.
    return Path(torch.hub.get_dir()) / "checkpoints" / file_name


def _is_head_key(key: str) -> bool:
    """Keys of the classifier (``fc.weight``, MoCo's ``fc.0.weight``, ...), which are never loaded."""
    return "fc" in key.split(".")


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a weights file: a plain state dict or one under ``state_dict``/``model``.

    Strips DataParallel's ``module.`` prefix; for a MoCo checkpoint keeps the query encoder
    (``encoder_q.``) and drops the rest (key encoder, queue), as MoCo's own conversion does.
    """
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any unpickling / zip error means "not a weights file"
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"cannot read weights file {path}: {reason}") from exc
    if isinstance(raw, Mapping):
        for wrapper in ("state_dict", "model"):
            if isinstance(raw.get(wrapper), Mapping):
                raw = raw[wrapper]
                break
    if not isinstance(raw, Mapping):
        raise CheckpointError(f"weights file {path} holds a {type(raw).__name__}, expected a state dict")
    tensors = {str(k).removeprefix("module."): v for k, v in raw.items()}
    if any(k.startswith("encoder_q.") for k in tensors):
        tensors = {k.removeprefix("encoder_q."): v for k, v in tensors.items() if k.startswith("encoder_q.")}
    bad = [k for k, v in tensors.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"weights file {path} is not a state dict: key {bad[0]!r} holds no tensor")
    return tensors


def _fit_errors(model_sd: Mapping[str, torch.Tensor], file_sd: Mapping[str, torch.Tensor]) -> list[str]:
    """One description per key that is missing, unexpected or of the wrong shape."""
    errors = []
    for key, tensor in model_sd.items():
        if key not in file_sd:
            # Old torchvision files predate BatchNorm's counter; it has no effect in training.
            if not key.endswith("num_batches_tracked"):
                errors.append(f"{key} missing from file (model wants {_shape(tensor)})")
        elif _shape(file_sd[key]) != _shape(tensor):
            errors.append(f"{key} model wants {_shape(tensor)}, file has {_shape(file_sd[key])}")
    errors += [f"{key} not in model (file has {_shape(t)})" for key, t in file_sd.items() if key not in model_sd]
    return errors


def load_pretrained_backbone(model: nn.Module, model_name: str, path: str | Path | None = None) -> list[str]:
    """Load torchvision ImageNet weights into ``model`` (all but ``fc``); returns notices for the log.

    ``path`` None means :func:`default_weights_path`, downloaded there when missing (as torchvision
    does). A ProjectionModel gets them in its backbone.
    A model with a non-ImageNet stem keeps a random ``conv1`` when the file's has another shape.
    """
    _check_model_name(model_name)
    default_path = default_weights_path(model_name)
    file_path = default_path if path is None else Path(path).expanduser()
    if not file_path.is_file() and path is None:
        fetch_torchvision_weights(model_name)
    elif not file_path.is_file():
        raise CheckpointError(
            f"ImageNet weights for {model_name} not found at {file_path}: expected torchvision's "
            f"{TORCHVISION_FILES[model_name]}; put it there, or give --pre_trained_tv without a path to use (and "
            f"download into) torchvision's cache {default_path}"
        )
    target = model.backbone if isinstance(model, ProjectionModel) else model
    file_sd = {k: v for k, v in read_state_dict(file_path).items() if not _is_head_key(k)}
    model_sd = {k: v for k, v in target.state_dict().items() if not _is_head_key(k)}

    notices = []
    stem = getattr(target, "stem", "imagenet")
    conv1 = "conv1.weight"
    both_have_conv1 = conv1 in file_sd and conv1 in model_sd
    if stem != "imagenet" and both_have_conv1 and _shape(file_sd[conv1]) != _shape(model_sd[conv1]):
        notices.append(
            f"{conv1} not loaded: the model's {stem!r} stem wants {_shape(model_sd[conv1])}, {file_path} has "
            f"{_shape(file_sd[conv1])}; conv1 keeps its random init"
        )
        del file_sd[conv1]
        del model_sd[conv1]

    errors = _fit_errors(model_sd, file_sd)
    if errors:
        more = f" (and {len(errors) - MAX_KEYS_IN_ERROR} more)" if len(errors) > MAX_KEYS_IN_ERROR else ""
        raise CheckpointError(
            f"weights file {file_path} does not fit {model_name}: {'; '.join(errors[:MAX_KEYS_IN_ERROR])}{more}"
        )
    target.load_state_dict(file_sd, strict=False)
    notices.insert(0, f"loaded {len(file_sd)} ImageNet tensors for {model_name} from {file_path}; fc starts random")
    return notices
