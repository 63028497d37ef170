"""Train a self-supervised prior with MoCo-v2 (He et al. 2020; Chen et al. 2020) and save it in the
MoCo checkpoint format, so it loads exactly like ``moco_v2_800ep_pretrain.pth.tar``.

Two augmented views per image; the query encoder (backbone + MLP head 2048-2048-128 for ResNet-50)
is trained with InfoNCE against the key from the momentum encoder and a queue of past keys.
Single-process emulation of MoCo's shuffling BatchNorm: the batch is cut into ``bn_groups``
groups (MoCo's GPUs) with BatchNorm statistics per group, and the keys are computed on a shuffled
order, so a query and its positive key never share batch statistics.

Defaults differ from MoCo-v2's ImageNet recipe (lr 0.03 at batch 256, m 0.999, K 65536, 800
epochs) because the data are thousands of images, not a million: lr 0.03 at batch 64 (more,
smaller steps: at batch 128 and lr 0.06 or 0.015 the contrastive accuracy stalled near chance on
the synthetic public split), two BatchNorm groups of 32, key momentum 0.99, a queue of at most
half the images (rounded down to whole batches) so it holds few stale copies of the current
batch's images, and 10 epochs. All of them are settings.

Every random draw comes from a generator derived from (seed, epoch, step), and the checkpoint
written after every epoch carries the optimizer, queue and key encoder: an interrupted training
resumes to exactly the weights of an uninterrupted one.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from fedward.errors import CheckpointError, ConfigError
from fedward.models import get_model, list_models
from fedward.selfsup.augment import MocoV2Augment
from fedward.seeding import torch_generator

CHECKPOINT_FORMAT = "moco-v2"


@dataclass
class MocoSettings:
    arch: str = "resnet50"
    image_size: int = 32
    epochs: int = 10
    batch_size: int = 64
    lr: float = 0.03
    sgd_momentum: float = 0.9
    weight_decay: float = 1e-4
    feature_dim: int = 128  # MoCo's projection output
    queue_size: int = 0  # 0: half the images, rounded down to whole batches (at most 65536)
    key_momentum: float = 0.99
    temperature: float = 0.2
    bn_groups: int = 2
    # MoCo-v2's augmentation ("aug+"): the smallest crop's share of the image, and how often colour
    # jitter and greyscale apply.
    crop_min: float = 0.2
    jitter_p: float = 0.8
    grayscale_p: float = 0.2
    seed: int = 0

    def check(self, num_images: int) -> None:
        if self.arch not in list_models():
            raise ConfigError(f"prior architecture {self.arch!r} is not a registered model ({', '.join(list_models())})")
        for name in ("image_size", "batch_size", "feature_dim", "bn_groups"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.epochs < 0:
            raise ConfigError(f"epochs must be >= 0, got {self.epochs}")
        if self.batch_size % self.bn_groups:
            raise ConfigError(f"batch_size {self.batch_size} must be a multiple of bn_groups {self.bn_groups}")
        if num_images < self.batch_size:
            raise ConfigError(f"MoCo needs at least one full batch: {num_images} images < batch_size {self.batch_size}")
        if self.queue_size and self.queue_size % self.batch_size:
            raise ConfigError(f"queue_size {self.queue_size} must be a multiple of batch_size {self.batch_size} (as in MoCo)")
        if not 0 < self.crop_min <= 1 or not 0 <= self.jitter_p <= 1 or not 0 <= self.grayscale_p <= 1:
            raise ConfigError("crop_min must be in (0, 1], jitter_p and grayscale_p in [0, 1]")
        if not 0 <= self.key_momentum < 1 or not self.temperature > 0 or not self.lr > 0:
            raise ConfigError("key_momentum must be in [0, 1), temperature and lr > 0")

    def resolved_queue_size(self, num_images: int) -> int:
        if self.queue_size:
            return self.queue_size
        return self.batch_size * max(1, min(65536, num_images // 2) // self.batch_size)


def build_encoder(arch: str, feature_dim: int, image_size: int, generator: torch.Generator) -> nn.Module:
    """A registry backbone whose ``fc`` is MoCo-v2's MLP head (d -> d -> ReLU -> feature_dim), so
    its state-dict keys are MoCo's (``fc.0.*``, ``fc.2.*``)."""
    from fedward.models import model_options

    kwargs = {"stem": "imagenet"} if "stem" in model_options(arch) else {}
    encoder = get_model(arch, num_classes=feature_dim, image_size=image_size, generator=generator, **kwargs)
    width = encoder.num_features
    hidden = nn.Linear(width, width)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator)))
        hidden.reset_parameters()
    encoder.fc = nn.Sequential(hidden, nn.ReLU(), encoder.fc)
    return encoder


class MocoModel(nn.Module):
    """Query and key encoders and the queue; state-dict keys ``encoder_q.*``, ``encoder_k.*``,
    ``queue``, ``queue_ptr`` as MoCo's ``MoCo`` module (saved under ``module.``)."""

    def __init__(self, settings: MocoSettings, queue_size: int) -> None:
        super().__init__()
        generator = torch_generator(settings.seed, "moco", "init")
        self.encoder_q = build_encoder(settings.arch, settings.feature_dim, settings.image_size, generator)
        self.encoder_k = build_encoder(settings.arch, settings.feature_dim, settings.image_size, generator)
        self.encoder_k.load_state_dict(self.encoder_q.state_dict())
        for param in self.encoder_k.parameters():
            param.requires_grad_(False)
        queue = torch.randn(settings.feature_dim, queue_size, generator=generator)
        self.register_buffer("queue", F.normalize(queue, dim=0))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))
        self.key_momentum, self.temperature, self.groups = settings.key_momentum, settings.temperature, settings.bn_groups

    @torch.no_grad()
    def _update_key_encoder(self) -> None:
        for key, query in zip(self.encoder_k.parameters(), self.encoder_q.parameters()):
            key.mul_(self.key_momentum).add_(query.detach(), alpha=1 - self.key_momentum)

    def _grouped(self, encoder: nn.Module, images: torch.Tensor) -> torch.Tensor:
        """Encode in ``groups`` chunks: BatchNorm statistics per chunk, as per GPU in MoCo."""
        return torch.cat([encoder(chunk) for chunk in images.chunk(self.groups)])

    def forward(self, view_q: torch.Tensor, view_k: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """InfoNCE loss and the fraction of queries whose positive key scores highest."""
        query = F.normalize(self._grouped(self.encoder_q, view_q), dim=1)
        with torch.no_grad():
            self._update_key_encoder()
            order = torch.randperm(len(view_k), generator=generator).to(view_k.device)
            keys = torch.empty_like(query)
            keys[order] = F.normalize(self._grouped(self.encoder_k, view_k[order]), dim=1)
        positive = (query * keys).sum(dim=1, keepdim=True)
        negative = query @ self.queue.clone().detach()
        logits = torch.cat([positive, negative], dim=1) / self.temperature
        target = torch.zeros(len(query), dtype=torch.long, device=query.device)
        loss = F.cross_entropy(logits, target)
        self._enqueue(keys)
        accuracy = (logits.argmax(dim=1) == 0).float().mean()
        return loss, accuracy

    @torch.no_grad()
    def _enqueue(self, keys: torch.Tensor) -> None:
        pointer = int(self.queue_ptr)
        self.queue[:, pointer:pointer + len(keys)] = keys.T
        self.queue_ptr[0] = (pointer + len(keys)) % self.queue.shape[1]


def cosine_lr(base_lr: float, epoch: int, epochs: int) -> float:
    """MoCo's cosine schedule, set once per epoch."""
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * epoch / max(epochs, 1)))


@torch.no_grad()
def embed_images(encoder: nn.Module, images_uint8: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """L2-normalised pooled backbone features of un-augmented images (eval mode)."""
    from fedward.data.augment import IMAGENET_MEAN, IMAGENET_STD, normalize

    was_training = encoder.training
    encoder.eval()
    out = [F.normalize(encoder.embed(normalize(images_uint8[i:i + batch_size], IMAGENET_MEAN, IMAGENET_STD)), dim=1)
           for i in range(0, len(images_uint8), batch_size)]
    encoder.train(was_training)
    return torch.cat(out)


def knn_accuracy(features: torch.Tensor, labels: torch.Tensor, k: int = 20) -> float:
    """Leave-one-out k-nearest-neighbour accuracy (cosine similarity, majority vote weighted by
    exp(similarity / 0.07) as in InstDisc/MoCo's monitor): a label-free training's quick check."""
    similarity = features @ features.T
    similarity.fill_diagonal_(-float("inf"))
    k = min(k, len(features) - 1)
    top, index = similarity.topk(k, dim=1)
    votes = torch.zeros(len(features), int(labels.max()) + 1)
    votes.scatter_add_(1, labels[index], torch.exp(top / 0.07))
    return float((votes.argmax(dim=1) == labels).float().mean())


def save_checkpoint(path: Path, model: MocoModel, optimizer: torch.optim.Optimizer, epoch: int,
                    settings: MocoSettings, info: dict[str, Any]) -> None:
    """MoCo's checkpoint layout (``epoch``, ``arch``, ``state_dict`` with ``module.`` keys,
    ``optimizer``) plus fedward's own ``fedward`` entry; written atomically."""
    from fedward.tracking.rundir import atomic_torch_save

    payload = {
        "epoch": epoch,
        "arch": settings.arch,
        "state_dict": {f"module.{k}": v.detach().cpu() for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "fedward": {"format": CHECKPOINT_FORMAT, "settings": asdict(settings), **info},
    }
    atomic_torch_save(payload, path)


def read_settings(path: Path) -> MocoSettings | None:
    """The settings a fedward-trained prior was made with (None for other checkpoints)."""
    payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    meta = payload.get("fedward") if isinstance(payload, dict) else None
    if not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT:
        return None
    known = {f.name for f in fields(MocoSettings)}
    return MocoSettings(**{k: v for k, v in meta["settings"].items() if k in known})


def train_moco(images: torch.Tensor, settings: MocoSettings, out: str | Path, *, labels: torch.Tensor | None = None,
               source: str = "", resume: bool = False, progress: bool = True, device: str = "cpu",
               log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train on ``images`` (uint8, (N, 3, S, S) with S = settings.image_size) and write ``out``.

    ``labels`` (optional, never used for training) give a kNN accuracy of the features before and
    after, printed as a check that the prior learned something. Returns the training history.
    """
    out = Path(out)
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        raise ConfigError(f"MoCo training expects uint8 (N, 3, H, W) images, got {images.dtype} {tuple(images.shape)}")
    if images.shape[-1] != settings.image_size or images.shape[-2] != settings.image_size:
        raise ConfigError(f"images are {tuple(images.shape[-2:])} px, settings say image_size {settings.image_size}")
    settings.check(len(images))
    queue_size = settings.resolved_queue_size(len(images))
    model = MocoModel(settings, queue_size).to(device)
    optimizer = torch.optim.SGD(model.encoder_q.parameters(), lr=settings.lr, momentum=settings.sgd_momentum,
                                weight_decay=settings.weight_decay)
    start_epoch, history = 0, []
    if out.exists():
        if not resume:
            raise ConfigError(f"{out} exists; pass --resume to continue it, or choose another --out")
        saved = read_settings(out)
        if saved is None or asdict(saved) | {"epochs": 0} != asdict(settings) | {"epochs": 0}:
            raise CheckpointError(f"{out} was not trained with these settings; cannot resume it "
                                  f"(saved: {asdict(saved) if saved else 'not a fedward MoCo checkpoint'})")
        payload = torch.load(out, map_location="cpu", weights_only=True)
        model.load_state_dict({k.removeprefix("module."): v for k, v in payload["state_dict"].items()})
        optimizer.load_state_dict(payload["optimizer"])
        start_epoch, history = int(payload["epoch"]), list(payload["fedward"].get("history", []))
        log(f"resuming {out} after epoch {start_epoch}")
    augment = MocoV2Augment(settings.image_size, crop_scale=(settings.crop_min, 1.0), jitter_p=settings.jitter_p,
                            grayscale_p=settings.grayscale_p)
    info = {"source": source, "num_images": len(images), "queue_size": queue_size}
    if labels is not None and start_epoch == 0:
        info["knn_before"] = knn_accuracy(embed_images(model.encoder_q, images.to(device)), labels)
    elif labels is not None:
        info["knn_before"] = payload["fedward"].get("knn_before")
    steps = len(images) // settings.batch_size
    bar = tqdm(total=(settings.epochs - start_epoch) * steps, desc="MoCo-v2 prior", unit="step", disable=not progress)
    model.train()
    for epoch in range(start_epoch, settings.epochs):
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(settings.lr, epoch, settings.epochs)
        order = torch.randperm(len(images), generator=torch_generator(settings.seed, "moco", "order", epoch))
        started, losses, accuracies = time.perf_counter(), [], []
        for step in range(steps):
            generator = torch_generator(settings.seed, "moco", "step", epoch, step)
            batch = images[order[step * settings.batch_size:(step + 1) * settings.batch_size]].to(device)
            view_q, view_k = augment(batch, generator), augment(batch, generator)
            loss, accuracy = model(view_q, view_k, generator)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            accuracies.append(float(accuracy))
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{losses[-1]:.3f}")
        history.append({"epoch": epoch + 1, "loss": sum(losses) / steps, "contrastive_accuracy": sum(accuracies) / steps,
                        "seconds": time.perf_counter() - started})
        save_checkpoint(out, model, optimizer, epoch + 1, settings, {**info, "history": history})
    bar.close()
    if labels is not None:
        info["knn_after"] = knn_accuracy(embed_images(model.encoder_q, images.to(device)), labels)
        save_checkpoint(out, model, optimizer, settings.epochs, settings, {**info, "history": history})
    elif settings.epochs == 0 or start_epoch == settings.epochs:
        save_checkpoint(out, model, optimizer, settings.epochs, settings, {**info, "history": history})
    return {**info, "history": history}
