"""What every method is made of: messages, a client update and a server aggregate.

A method never knows which engine runs it. The server sends a :class:`ServerMessage` (named
arrays + a config dict), a client answers with a :class:`ClientReply` (named arrays + scalar
metrics). Anything a client must remember between rounds (optimizer moments, its previous model,
a personalised model) lives in the ``state`` dict that the engine keeps for that client: in
memory in simulation, on the node in a deployment. Raw images, labels and personalised models
never go into a reply.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from fedward.config import HETEROGENEOUS_METHODS, RunConfig, client_architectures
from fedward.data.types import ClientData, Split
from fedward.models import get_model, model_options
from fedward.seeding import torch_generator

Arrays = dict[str, torch.Tensor]


@dataclass
class ServerMessage:
    """Server -> client: the round (1-based), named arrays and settings."""

    round: int
    arrays: Arrays
    config: dict[str, Any] = field(default_factory=dict)


@dataclass
class ClientReply:
    """Client -> server: named arrays and scalar metrics (``num-examples``, ``train-loss`` ...)."""

    client_id: int
    arrays: Arrays
    metrics: dict[str, float]


@dataclass
class TaskSpec:
    """Facts about the data that every method may use: none of them is a client's private data
    except ``train_class_counts``, which a client only ever reads for itself."""

    num_classes: int
    image_size: int
    class_names: list[str]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    train_class_counts: list[list[int]]  # per client
    global_class_counts: list[int]  # pooled train counts (FLamby's focal-loss weights need them)


class Workspace:
    """Per-worker reusable objects: the training model (built once and re-loaded for each client,
    so at most one training model lives in memory), spare models, the device and the augmenter."""

    def __init__(self, build_model: Callable[[], nn.Module], device: torch.device, augment: Callable | None):
        self._build_model = build_model
        self.device = device
        self.augment = augment
        self.model = build_model().to(device)
        self._spares: dict[str, nn.Module] = {}
        self.priors: dict[str, nn.Module] = {}  # frozen priors by name, for methods that use them (fedmas)
        self.prior_buffers: dict[str, Arrays] = {}  # each prior's BatchNorm buffers as loaded
        # (prior name, client id) -> prior features of that client's un-augmented train images;
        # kept in the worker's memory only (recomputed identically after a resume)
        self.prior_features: dict[tuple[str, int], torch.Tensor] = {}

    def cached_module(self, key: tuple, build: Callable[[], nn.Module]) -> nn.Module:
        """A module built once per worker under ``key`` (one local model per architecture, R/T per
        architecture): clients load their own state into it, so memory does not grow with clients."""
        if key not in self._spares:
            self._spares[key] = build().to(self.device)
        return self._spares[key]

    def spare_model(self, name: str) -> nn.Module:
        """A second model of the same architecture (e.g. MOON's global and previous models)."""
        if name not in self._spares:
            self._spares[name] = self._build_model().to(self.device)
        return self._spares[name]


def clone_arrays(arrays: Arrays) -> Arrays:
    return {k: v.detach().clone() for k, v in arrays.items()}


def to_cpu(arrays: Arrays) -> Arrays:
    return {k: v.detach().to("cpu", copy=True) for k, v in arrays.items()}


def batchnorm_buffer_keys(model: nn.Module) -> set[str]:
    """State-dict keys of BatchNorm running statistics (kept local under the FedBN policy)."""
    keys: set[str] = set()
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            prefix = f"{name}." if name else ""
            for buffer in ("running_mean", "running_var", "num_batches_tracked"):
                if getattr(module, buffer, None) is not None:
                    keys.add(prefix + buffer)
    return keys


def make_optimizer(cfg: RunConfig, params) -> torch.optim.Optimizer:
    """SGD(momentum, nesterov, weight decay) or, with ``--adam``, Adam without weight decay
    (the reference's choice for every method).

    The fused kernels compute the same update in one pass over each tensor; on our 2-core CPU the
    fused Adam step is about 2x faster than torch's default per-tensor loop.
    """
    params = list(params)
    fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    if cfg.adam:
        return torch.optim.Adam(params, lr=cfg.lr, fused=fused)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0,
                           weight_decay=cfg.wd, fused=fused)


def training_batches(split: Split, batch_size: int, epochs: int, generator: torch.Generator):
    """Yield (epoch, index tensor) for shuffled batches, the last incomplete batch dropped as in the
    reference loader. A client with fewer samples than a batch trains on one smaller batch
    rather than not at all."""
    n = len(split)
    for epoch in range(epochs):
        order = torch.randperm(n, generator=generator)
        if n < batch_size:
            yield epoch, order
            continue
        for start in range(0, n - batch_size + 1, batch_size):
            yield epoch, order[start:start + batch_size]


def examples_seen(n: int, batch_size: int) -> int:
    """The reference's ``num_samples`` = floor(n / B) * B (drop_last), used for FedAvg weights."""
    return (n // batch_size) * batch_size if n >= batch_size else n


class Algorithm:
    """Base class: FedAvg-style broadcast of the whole model, weighted averaging by examples."""

    name = "base"
    personalised = False  # True when each client's own model is the deliverable (local)
    centralized = False  # True when one pooled pseudo-client trains on everything

    def __init__(self, cfg: RunConfig, spec: TaskSpec, build_model: Callable[[], nn.Module]):
        self.cfg = cfg
        self.spec = spec
        self.build_model = build_model

    # -- per-client architectures (model-heterogeneous methods; local with --client_models) ----------
    @property
    def heterogeneous(self) -> bool:
        """True when every client keeps a local model of its own architecture."""
        return bool(self.cfg.client_models) or self.cfg.method in HETEROGENEOUS_METHODS

    def client_architecture(self, client_id: int) -> str:
        return client_architectures(self.cfg, len(self.spec.train_class_counts))[client_id]

    def build_local_model(self, client_id: int, generator: torch.Generator | None = None) -> nn.Module:
        name = self.client_architecture(client_id)
        options = {"stem": self.cfg.stem} if "stem" in model_options(name) else {}
        return get_model(name, num_classes=self.spec.num_classes, image_size=self.spec.image_size,
                         generator=generator, **options)

    def initial_local_state(self, client_id: int) -> Arrays:
        """A client's own seeded initial local model (built on the client: nothing is sent)."""
        generator = torch_generator(self.cfg.seed, "local-model", client_id)
        return to_cpu(self.build_local_model(client_id, generator).state_dict())

    def local_model(self, ws: Workspace, client_id: int) -> nn.Module:
        """The module that client ``client_id``'s local model state loads into."""
        if not self.heterogeneous:
            return ws.model
        name = self.client_architecture(client_id)
        return ws.cached_module(("local", name), lambda: self.build_local_model(client_id))

    # -- server side -------------------------------------------------------------------------
    def server_message(self, round_index: int, global_state: Arrays) -> ServerMessage:
        return ServerMessage(round=round_index, arrays=global_state, config={"total-rounds": self.cfg.comm_round})

    def aggregate(self, round_index: int, global_state: Arrays, replies: list[ClientReply]) -> tuple[Arrays, dict[str, Any]]:
        raise NotImplementedError

    # -- client side -------------------------------------------------------------------------
    def client_update(self, ws: Workspace, client: ClientData, message: ServerMessage, state: dict[str, Any],
                      generator: torch.Generator) -> ClientReply:
        raise NotImplementedError

    def local_model_state(self, reply: ClientReply, state: dict[str, Any]) -> Arrays | None:
        """The client's local model after its update (for --validate_client), if it has one."""
        return reply.arrays or None

    def declared_reply_keys(self, global_state: Arrays) -> set[str]:
        """Array names a reply may carry: the privacy tests check replies against this."""
        return set(global_state)

    def reply_as_state(self, arrays: Arrays, global_state: Arrays) -> Arrays:
        """A reply's arrays under the global model's names and shapes, for the server's shape checks
        (FedKD overrides this to multiply its low-rank factors out)."""
        return arrays

    def diagnostic_models(self, ws: Workspace, client: ClientData, state: dict[str, Any]) -> dict[str, nn.Module]:
        """Extra predictors evaluated on a client's own splits next to its local model, by name
        (logged as ``model: <name>`` rows; never part of the summary)."""
        return {}
