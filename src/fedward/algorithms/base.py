"""What every method is made of: messages, a client update and a server aggregate.

A method never knows which engine runs it. The server sends a :class:`ServerMessage` (named
arrays + a config dict), a client answers with a :class:`ClientReply` (named arrays + scalar
metrics). Anything a client must remember between rounds (optimizer moments, its previous model,
a personalised model) lives in the ``state`` dict that the engine keeps for that client: in
memory in simulation, on the node in a deployment. Raw images, labels and personalised models
never go into a reply.
"""

from __future__ import annotations

import math

from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import nn

from fedward.algorithms.privacy import ClientLevelDP, PerSampleDP, SecureAggregation
from fedward.data.types import ClientData, Split
from fedward.errors import ConfigError
from fedward.models import get_model, model_options
from fedward.options import NON_NEGATIVE, POSITIVE, NoOptions, at_least, option
from fedward.seeding import seed_globals, torch_generator

if TYPE_CHECKING:
    from fedward.secure_aggregation import SecureSettings
    from fedward.config import RunConfig

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


# -- options several methods share -------------------------------------------------------------------
@dataclass
class Epochs:
    epochs: int = option(1, "local epochs per round", check=at_least(1))


@dataclass
class LocalTraining(Epochs):
    """The local training of the FedAvg family (one model architecture for every client)."""

    # Defaults that learn on the built-in data, chosen by `bench/bench_results.py --grid optimizer`
    # (docs/results.md); the reference's argparse defaults (SGD at 3e-4) are `--adam false --lr 3e-4`.
    lr: float = option(1e-3, "learning rate", check=POSITIVE)
    adam: bool = option(True, "use Adam (no weight decay, as the reference); false: SGD with --momentum, --nesterov "
                              "and --wd")
    adamw: bool = option(False, "use AdamW at --lr with weight decay --wd, instead of Adam or SGD (the reference's "
                                "fedavg, fedprox and moon; its fedmas ignores the flag and runs SGD)", reference=True)
    momentum: float = option(0.9, "SGD momentum", check=NON_NEGATIVE)
    nesterov: bool = option(True, "SGD Nesterov momentum")
    wd: float = option(1e-4, "SGD and AdamW weight decay (the reference's Adam has none)", check=NON_NEGATIVE)
    adjust_learning_rate: bool = option(False, "the reference's per-round cosine decay to 1e-4: lr_r = 1e-4 + (lr - "
                                               "1e-4)(1 + cos(pi (r + 1) / R)) / 2 at 0-based round r of R (its moon "
                                               "ignores the flag)", reference=True)
    instance_sampling: bool = option(False, "class-balanced sampling (the reference's ImbalancedDatasetSampler): each "
                                            "epoch draws n train samples with replacement, sample i with probability "
                                            "proportional to 1 / n_(y_i)", reference=True)
    bn_policy: str = option("average", "BatchNorm statistics: 'average' (whole state dict, reference) or 'local' "
                                       "(FedBN/FLamby)", choices=("average", "local"))
    model: str = option("resnet18", "model name from the registry (fedward models)")
    pre_trained_tv: str | None = option(None, "initialise the backbone from torchvision ImageNet weights: a file, or no "
                                              "value for torchvision's cache path", const="default")


@dataclass
class GlobalTraining(ClientLevelDP, PerSampleDP, SecureAggregation, LocalTraining):
    """The FedAvg family's local training, the "+FT" evaluation of its global model, and
    client-level and per-sample differential privacy and secure aggregation
    (``fedward.algorithms.privacy``)."""

    finetune_epochs: int = option(0, "+FT: after the last round each client fine-tunes the final global model for this "
                                     "many epochs on its own train split and is evaluated on its own splits (Collins et "
                                     "al. 2022); 0: off", check=NON_NEGATIVE)


def participants(clients_per_round: float, num_clients: int) -> int:
    """How many of ``num_clients`` train in a round: all for 0, K for a count, round(f N) (at least
    1) for a fraction f."""
    if clients_per_round == 0:
        return num_clients
    if clients_per_round < 1:
        return max(1, round(clients_per_round * num_clients))
    return min(int(clients_per_round), num_clients)


def fine_tunes(cfg: "RunConfig") -> bool:
    """Whether the run evaluates its final global model fine-tuned at each client (+FT)."""
    return cfg.has("finetune_epochs") and cfg.finetune_epochs > 0


SCHEDULE_FLOOR_LR = 1e-4  # the reference's adjust_learning_rate decays to this, whatever --lr is


def round_lr(cfg: "RunConfig", round_index: int | None) -> float:
    """The learning rate of 1-based round ``round_index``: ``--lr``, or with ``--adjust_learning_rate``
    the reference's cosine 1e-4 + (lr - 1e-4)(1 + cos(pi (r + 1) / R)) / 2 at 0-based r. (With
    --lr below 1e-4 the reference's schedule rises to 1e-4; fedward computes the same.)"""
    if round_index is None or not (cfg.has("adjust_learning_rate") and cfg.adjust_learning_rate):
        return cfg.lr
    r = round_index - 1
    return SCHEDULE_FLOOR_LR + 0.5 * (cfg.lr - SCHEDULE_FLOOR_LR) * (1.0 + math.cos(math.pi * (r + 1) / cfg.comm_round))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def make_optimizer(cfg: "RunConfig", params, round_index: int | None = None) -> torch.optim.Optimizer:
    """SGD(momentum, nesterov, weight decay) or, with ``--adam``, Adam without weight decay
    (the reference's choice for every method), or with ``--adamw`` AdamW with weight decay; at
    round ``round_index``'s learning rate (:func:`round_lr`).

    The fused kernels compute the same update in one pass over each tensor; on our 2-core CPU the
    fused Adam step is about 2x faster than torch's default per-tensor loop.
    """
    params = list(params)
    fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    lr = round_lr(cfg, round_index)
    if cfg.has("adamw") and cfg.adamw:
        return torch.optim.AdamW(params, lr=lr, weight_decay=cfg.wd, fused=fused)
    if cfg.adam:
        return torch.optim.Adam(params, lr=lr, fused=fused)
    return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0,
                           weight_decay=cfg.wd, fused=fused)


def training_batches(split: Split, batch_size: int, epochs: int, generator: torch.Generator, *,
                     balanced: bool = False):
    """Yield (epoch, index tensor) for shuffled batches, the last incomplete batch dropped as in the
    reference loader. A client with fewer samples than a batch trains on one smaller batch
    rather than not at all. ``balanced`` (``--instance_sampling``): each epoch's order is n draws
    with replacement, sample i with probability proportional to 1 / n_(y_i), so every class present
    is drawn equally often on average."""
    n = len(split)
    if balanced and n:
        counts = torch.bincount(split.labels.long())
        sample_weights = 1.0 / counts[split.labels.long()].double()
    for epoch in range(epochs):
        if balanced and n:
            order = torch.multinomial(sample_weights, n, replacement=True, generator=generator)
        else:
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
    """A method: what the server sends, what a client does with it, how the server combines replies.

    A subclass declares, in one place, everything the rest of fedward needs to know about it:
    ``name``, ``summary`` (one line for ``--help``), ``Options`` (a dataclass of its own settings,
    built with :func:`fedward.options.option`: the CLI flags, help, YAML keys and validation come
    from it), ``default_overrides`` (common settings it defaults differently), ``personalised``,
    ``centralized``, :meth:`check_config` (rules across settings), :meth:`model_builder`,
    :meth:`prepare_run` (checks before a run directory is written), :meth:`declared_reply_keys`
    (what a reply may carry) and :meth:`initial_server_state` (what the server keeps between rounds;
    it is checkpointed with the global model, so a resumed run continues exactly). Register it
    with :func:`fedward.algorithms.register_method`.
    """

    name = "base"
    summary = ""
    Options: type = NoOptions
    default_overrides: dict[str, Any] = {}
    # The data set a run takes when none is named: (built in, read from --data_dir alone).
    natural_datasets: tuple[str, str] = ("synthetic", "fed_isic2019")
    # False where a round needs every client (KT-pFL's coefficients mix them all) or the method picks
    # its own (cyclic, centralized's one pseudo-client, local's lone training).
    partial_participation = True
    personalised = False  # True when each client's own model is the deliverable (local)
    centralized = False  # True when one pooled pseudo-client trains on everything (no deployment)

    def __init__(self, cfg: "RunConfig", spec: TaskSpec, build_model: Callable[[], nn.Module]):
        self.cfg = cfg
        self.spec = spec
        self.build_model = build_model

    # -- declarations used before a run starts ----------------------------------------------------
    @classmethod
    def check_config(cls, cfg: "RunConfig") -> None:
        """Rules across settings (each option's own check has run already); raise ConfigError."""

    @classmethod
    def model_builder(cls, cfg: "RunConfig", spec: TaskSpec) -> Callable[[], nn.Module]:
        """A function building the global model: ``--model`` from the registry (with the LDAM
        cosine classifier when the loss needs it), wrapped by :meth:`wrap_model`."""
        from fedward.losses import build_loss
        from fedward.models.heads import use_cosine_classifier

        cosine = build_loss(cfg.loss_fn_name, [1] * spec.num_classes).needs_cosine_classifier
        # The stem applies to the ResNets; models without one (smallcnn) take no stem.
        kwargs = {"stem": cfg.stem} if "stem" in model_options(cfg.model) else {}

        def build() -> nn.Module:
            model = cls.wrap_model(cfg, spec, get_model(cfg.model, num_classes=spec.num_classes,
                                                        image_size=spec.image_size, **kwargs))
            if cosine:
                use_cosine_classifier(model)
            if cfg.has("dp_sgd_clip") and cfg.dp_sgd_clip is not None:
                from fedward.algorithms.privacy import per_sample_model

                model = per_sample_model(model)
            return model

        return build

    @classmethod
    def wrap_model(cls, cfg: "RunConfig", spec: TaskSpec, model: nn.Module) -> nn.Module:
        """The method's additions to the backbone (MOON's projection head, Fed-MAS's projector)."""
        return model

    @classmethod
    def resolved_settings(cls, cfg: "RunConfig") -> dict[str, Any]:
        """Settings whose given value stands for another one the run records in its config.yaml
        (``--pre_trained_models auto`` records the prior file it resolved to): what
        :meth:`prepare_run` writes back, so that a finished run can be compared with a request."""
        return {}

    @classmethod
    def prepare_run(cls, cfg: "RunConfig", spec: TaskSpec, num_clients: int) -> None:
        """Checks that need the data's facts, run before the run directory is written (a missing
        weights file fails here, not in round 1). ``cfg`` is completed with :meth:`resolved_settings`."""
        client_architectures(cfg, num_clients, cls.default_client_models(cfg))
        if cfg.clients_per_round >= 1 and cfg.clients_per_round > num_clients:
            raise ConfigError(f"--clients_per_round {cfg.clients_per_round:g}: the federation has {num_clients} clients")

    @classmethod
    def initial_state(cls, cfg: "RunConfig", build: Callable[[], nn.Module]) -> tuple[Arrays, list[str]]:
        """Seeded initial global weights (and ImageNet backbone weights with --pre_trained_tv), with
        notices for the user."""
        seed_globals(cfg.seed, "initial-model")
        model = build()
        notices: list[str] = []
        if cfg.has("pre_trained_tv") and cfg.pre_trained_tv is not None:
            from fedward.models.pretrained import load_pretrained_backbone

            target = getattr(model, "backbone", model)  # MOON / Fed-MAS wrappers hold the ResNet as backbone
            path = None if cfg.pre_trained_tv == "default" else cfg.pre_trained_tv
            notices = load_pretrained_backbone(target, cfg.model, path)
        return to_cpu(model.state_dict()), notices

    # -- per-client architectures (model-heterogeneous methods; local with --client_models) ----------
    @classmethod
    def default_client_models(cls, cfg: "RunConfig") -> list[str] | None:
        """Each client's architecture when --client_models is not given; None: ``--model`` for all."""
        return None

    @property
    def heterogeneous(self) -> bool:
        """True when every client keeps a local model of its own architecture."""
        return bool(self.cfg.has("client_models") and self.cfg.client_models)

    def client_architecture(self, client_id: int) -> str:
        return client_architectures(self.cfg, len(self.spec.train_class_counts),
                                    self.default_client_models(self.cfg))[client_id]

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

    def global_model_name(self) -> str:
        """The registry name of the global model (recorded with the saved model)."""
        return self.cfg.model

    @cached_property
    def parameter_names(self) -> list[str]:
        """State-dict keys of the global model's trainable parameters (BatchNorm running statistics
        are buffers: server optimizers leave them to the plain average, as FLamby, which exchanges
        parameters only)."""
        return [name for name, _ in self.build_model().named_parameters()]

    # -- server side -------------------------------------------------------------------------
    def initial_server_state(self, global_state: Arrays) -> dict[str, Any]:
        """What the server keeps between rounds besides the global model (server optimizer moments,
        control variates): tensors and plain values, checkpointed every round."""
        return {}

    def select_clients(self, round_index: int, client_ids: list[int], server_state: dict[str, Any]) -> list[int]:
        """The clients that train this round: all, or ``--clients_per_round`` of them drawn from
        (seed, round), so every engine and a resumed run pick the same ones."""
        count = participants(self.cfg.clients_per_round, len(client_ids))
        if count >= len(client_ids):
            return list(client_ids)
        order = torch.randperm(len(client_ids), generator=torch_generator(self.cfg.seed, "participation", round_index))
        return sorted(client_ids[i] for i in order[:count].tolist())

    def server_message(self, round_index: int, global_state: Arrays, server_state: dict[str, Any]) -> ServerMessage:
        return ServerMessage(round=round_index, arrays=global_state, config={"total-rounds": self.cfg.comm_round})

    def client_message(self, message: ServerMessage, client_id: int) -> ServerMessage:
        """What client ``client_id`` receives of the round's message (default: all of it; KT-pFL sends each
        client its own personalised target only)."""
        return message

    def secure_settings(self, round_index: int) -> "SecureSettings | None":
        """Round ``round_index``'s secure-aggregation settings; None: the replies reach the server in
        the clear. A method that returns settings aggregates with ``aggregation_weights`` and
        ``aggregate_average`` (see :class:`~fedward.algorithms.fedavg.FedAvg`)."""
        return None

    def aggregate(self, round_index: int, global_state: Arrays, replies: list[ClientReply],
                  server_state: dict[str, Any]) -> tuple[Arrays, dict[str, Any]]:
        """The next global model and what to log (``weights``: one per reply). ``server_state`` may be
        updated in place; it must not keep references to tensors it will later modify in place."""
        raise NotImplementedError

    # -- client side -------------------------------------------------------------------------
    def client_update(self, ws: Workspace, client: ClientData, message: ServerMessage, state: dict[str, Any],
                      generator: torch.Generator) -> ClientReply:
        raise NotImplementedError

    def local_model_state(self, reply: ClientReply, state: dict[str, Any]) -> Arrays | None:
        """The client's local model after its update (for --validate_client), if it has one."""
        return reply.arrays or None

    def declared_reply_keys(self, global_state: Arrays) -> set[str]:
        """Array names a reply may carry: the reply checks and the privacy tests hold replies to it."""
        return set(global_state)

    def reply_reference(self, global_state: Arrays, server_state: dict[str, Any]) -> Arrays:
        """The arrays a reply's shapes and dtypes are checked against (by name)."""
        return global_state

    def reply_as_state(self, arrays: Arrays, global_state: Arrays) -> Arrays:
        """A reply's arrays under the reference's names and shapes, for the server's shape checks
        (FedKD overrides this to multiply its low-rank factors out)."""
        return arrays

    def diagnostic_models(self, ws: Workspace, client: ClientData, state: dict[str, Any]) -> dict[str, nn.Module]:
        """Extra predictors evaluated on a client's own splits next to its local model, by name
        (logged as ``model: <name>`` rows; never part of the summary)."""
        return {}


def client_architectures(cfg: "RunConfig", num_clients: int, default: list[str] | None = None) -> list[str]:
    """Each client's local model: --client_models (one per client), else ``default`` cycled over the
    clients, else ``--model`` for all."""
    given = list(cfg.client_models) if cfg.has("client_models") else []
    if given:
        if len(given) != num_clients:
            raise ConfigError(f"--client_models lists {len(given)} models ({', '.join(given)}) "
                              f"but the data set has {num_clients} clients; give one model per client")
        return given
    if default:
        return [default[k % len(default)] for k in range(num_clients)]
    return [cfg.model] * num_clients


def check_client_models(cfg: "RunConfig") -> None:
    from fedward.models import list_models

    for name in cfg.client_models:
        if name not in list_models() or name == "messenger":
            raise ConfigError(f"--client_models entry '{name}' is not a model; expected names from: "
                              f"{', '.join(m for m in list_models() if m != 'messenger')}")
