"""FedDF (Lin et al., NeurIPS 2020, "Ensemble distillation for robust model fusion in federated
learning") for heterogeneous models, and fedward's reading of pFedDF.

FedDF exchanges models. The server keeps one prototype per architecture of ``--client_models``;
the global state is all of them, each state-dict key prefixed with its architecture
(``<arch>.<key>``, e.g. ``resnet5.fc.weight``). A round:
1. the message carries every prototype; a client loads its own architecture's;
2. the client trains it on its train split for ``--epochs`` (Adam at ``--local_lr``, the task loss)
   and uploads the whole trained state dict (BatchNorm buffers included): these are the method's
   declared reply arrays, so, unlike the other heterogeneous methods here, a client's trained
   local model does leave it, as in the paper;
3. per architecture a, the server initialises the prototype with the uploads of a, weighted by
   n_k / sum of n over a's clients (n_k: the client's training images);
4. it distils each prototype on the unlabelled public set (``--public_data``, or the data set's
   built-in public split; its labels are never read) toward the ensemble of ALL uploaded models,
   whatever their architecture: the target of a public image x is the plain mean of the uploaded
   models' logits (eval mode), and the prototype (train mode) minimises
   KL(softmax(mean logits / T) || softmax(f_a(x) / T)) * T^2 at T = ``--feddf_temperature`` with
   Adam at ``--feddf_server_lr``, cosine-annealed to 0 over ``--feddf_server_steps`` steps of
   ``--feddf_server_batch`` images (seeded by (seed, round, architecture)), gradient norm clipped
   at 5 (the official code's clip).
An architecture no client uploaded this round keeps its prototype.

The deliverable of FedDF is the fused prototype of the client's architecture, and that is what is
evaluated. The server fuses after the clients' round, so a client first holds the fused prototype
of round r - 1 when round r's message arrives: it stores it in its state at the start of its
update, and that stored prototype is its evaluated (and, after the last round, saved) local model.
Round r's rows therefore score the prototypes fused in round r - 1 (round 1: the initial
prototypes); the prototypes fused in the last round are in the checkpoint's global state only.

pFedDF: the MH-pFLID paper lists it without a definition we could read. fedward's reading:
FedDF unchanged, plus, every round, each client fine-tunes the received prototype on its own
train split for ``--pfeddf_finetune_epochs`` epochs (its own Adam at ``--local_lr``) and keeps that
personalised copy in its state as its deliverable. The copy is never uploaded: the reply is the
same FedDF model as above.

Departures from the paper and its official code (epfml/federated-learning-public-code, FedDF-code):
a fixed number of distillation steps, fewer than the paper's budget (up to 10^4 steps, stopped
early when the fused model's accuracy on a labelled server-side validation set plateaus for 10^3
steps), because fedward's server holds no labelled data and the default is sized for CPU runs;
local training with Adam at ``--local_lr`` like fedward's other heterogeneous methods (the
official code: SGD at lr 0.1, fresh every round; here the Adam moments persist under
``--persist_optimizer_state``) and without a gradient clip unless ``--grad_clip`` is given; no
augmentation of the public images.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from itertools import islice
from typing import Any, Callable, Iterable

import torch
from torch import nn

from fedward.algorithms.aggregate import example_weights, weighted_average
from fedward.algorithms.base import (
    Arrays, ClientReply, Epochs, ServerMessage, TaskSpec, Workspace, client_architectures, to_cpu, training_batches,
)
from fedward.algorithms.heterogeneous import LocalModelMethod, LocalModelOptions, adam, train_stage
from fedward.algorithms.registry import register_method
from fedward.data.augment import normalize
from fedward.data.public import PublicData, load_public
from fedward.data.types import ClientData, Split
from fedward.losses import distillation_kl
from fedward.models import get_model, model_options
from fedward.options import POSITIVE, at_least, option
from fedward.seeding import torch_generator

SERVER_GRAD_CLIP = 5.0  # the official code's clip_grad_norm_(student, 5) in its distillation step


@dataclass
class FedDFOptions(LocalModelOptions, PublicData, Epochs):
    feddf_temperature: float = option(1.0, "temperature of the server's KL to the ensemble (the paper: 1)",
                                      check=POSITIVE)
    feddf_server_lr: float = option(1e-3, "Adam lr of the server's distillation, cosine-annealed to 0 over its steps "
                                          "(the paper: 1e-3)", check=POSITIVE)
    feddf_server_steps: int = option(50, "distillation steps per prototype and round (the paper: up to 10^4 with "
                                          "early stopping on labelled validation data; fewer for CPU runs)",
                                     check=at_least(1))
    feddf_server_batch: int = option(64, "public images per distillation step (the official code: 128)",
                                     check=at_least(1))


def architecture_of(arrays: Arrays) -> str:
    """The architecture whose prototype keys (``<arch>.<key>``) these arrays carry."""
    return next(iter(arrays)).split(".", 1)[0]


def prototype(arrays: Arrays, arch: str) -> Arrays:
    """Architecture ``arch``'s prototype as a plain state dict (prefix removed)."""
    prefix = f"{arch}."
    return {key[len(prefix):]: value for key, value in arrays.items() if key.startswith(prefix)}


def prefixed(arch: str, state: Arrays) -> Arrays:
    return {f"{arch}.{key}": value for key, value in state.items()}


@register_method
class FedDF(LocalModelMethod):
    name = "feddf"
    summary = "FedDF (Lin et al. 2020): uploaded models fused per architecture by ensemble distillation on public data"
    Options = FedDFOptions
    default_grad_clip = None  # FedDF's local training has no clip; --grad_clip sets one

    def __init__(self, cfg, spec: TaskSpec, build_model: Callable[[], nn.Module]):
        super().__init__(cfg, spec, build_model)
        self._server_modules: dict[str, nn.Module] = {}

    # -- the prototypes ------------------------------------------------------------------------
    @classmethod
    def architectures(cls, cfg, spec: TaskSpec) -> list[str]:
        """Each architecture of the federation once, in the order of the clients."""
        names = client_architectures(cfg, len(spec.train_class_counts), cls.default_client_models(cfg))
        return list(dict.fromkeys(names))

    @classmethod
    def model_builder(cls, cfg, spec: TaskSpec) -> Callable[[], nn.Module]:
        """The global "model": every architecture's prototype, each seeded from (seed, architecture)."""
        archs = cls.architectures(cfg, spec)

        def build() -> nn.Module:
            return nn.ModuleDict({arch: build_architecture(cfg, spec, arch,
                                                           torch_generator(cfg.seed, "feddf-prototype", arch))
                                  for arch in archs})

        return build

    @classmethod
    def prepare_run(cls, cfg, spec: TaskSpec, num_clients: int) -> None:
        super().prepare_run(cfg, spec, num_clients)
        load_public(cfg, spec.class_names, labelled=False)  # a missing public set fails before round 1

    def local_model_state(self, reply: ClientReply, state: dict[str, Any]) -> Arrays | None:
        return state.get("prototype")

    def reply_as_state(self, arrays: Arrays, global_state: Arrays) -> Arrays:
        # A reply must be one whole prototype, or the per-architecture average could not be formed.
        arch = architecture_of(arrays) if arrays else ""
        if not arrays or set(arrays) != {key for key in global_state if key.startswith(f"{arch}.")}:
            raise ValueError("a reply must carry exactly one architecture's whole state dict")
        return arrays

    # -- client ---------------------------------------------------------------------------------
    def train_local(self, ws: Workspace, client: ClientData, model: nn.Module, state: dict[str, Any], name: str,
                    epochs: int, generator: torch.Generator, round_index: int) -> tuple[int, float]:
        """``epochs`` of the task loss on the client's train split (Adam at ``--local_lr``)."""
        loss_fn = self.task_loss(client, round_index)
        params = list(model.parameters())
        optimizer = self.optimizer(state, name, [{"params": params, "lr": self.cfg.local_lr}])
        model.train()

        def batch_loss(inputs, labels):
            loss = loss_fn(model(inputs), labels)
            return loss, loss

        result = train_stage(ws, client.train, epochs=epochs, batch_size=self.cfg.batch_size, generator=generator,
                             optimizer=optimizer, clip=self.grad_clip,
                             clip_groups=[params] if self.grad_clip is not None else [], batch_loss=batch_loss)
        self.keep_optimizer(state, name, optimizer)
        return result

    def client_update(self, ws: Workspace, client: ClientData, message: ServerMessage, state: dict[str, Any],
                      generator: torch.Generator) -> ClientReply:
        arch = self.client_architecture(client.client_id)
        received = {key: value.detach().clone() for key, value in prototype(message.arrays, arch).items()}
        model = self.local_model(ws, client.client_id)
        model.load_state_dict(received)
        steps, loss = self.train_local(ws, client, model, state, "local", self.cfg.epochs, generator, message.round)
        arrays = prefixed(arch, to_cpu(model.state_dict()))
        metrics = {"num-examples": float(len(client.train)), "train-loss": loss, "steps": float(steps)}
        metrics.update(self.keep_deliverable(ws, client, model, received, state, generator, message.round))
        return ClientReply(client_id=client.client_id, arrays=arrays, metrics=metrics)

    def keep_deliverable(self, ws: Workspace, client: ClientData, model: nn.Module, received: Arrays,
                         state: dict[str, Any], generator: torch.Generator, round_index: int) -> dict[str, float]:
        """FedDF: the received (fused) prototype is the client's model. Returns extra metrics."""
        state["prototype"] = received
        return {}

    # -- server ---------------------------------------------------------------------------------
    @cached_property
    def public(self) -> Split:
        """The unlabelled public set, loaded once on the server (clients never need it)."""
        return load_public(self.cfg, self.spec.class_names, labelled=False)

    @cached_property
    def server_device(self) -> torch.device:
        from fedward.engine.setup import resolve_devices  # the engine imports the methods, not the reverse

        return torch.device(resolve_devices(self.cfg)[0])

    def server_module(self, arch: str) -> nn.Module:
        """One module per architecture on the server: each upload, then each prototype, loads into it."""
        if arch not in self._server_modules:
            self._server_modules[arch] = build_architecture(self.cfg, self.spec, arch).to(self.server_device)
        return self._server_modules[arch]

    def public_inputs(self, index: torch.Tensor | slice) -> torch.Tensor:
        return normalize(self.public.images[index].to(self.server_device), self.spec.mean, self.spec.std)

    def ensemble_logits(self, replies: list[ClientReply]) -> torch.Tensor:
        """The ensemble's logits on every public image: the mean over all uploaded models."""
        def uploaded_models():
            for reply in replies:  # one module per architecture: each upload is used before the next loads
                arch = architecture_of(reply.arrays)
                model = self.server_module(arch)
                model.load_state_dict(prototype(reply.arrays, arch))
                yield model

        chunk = self.cfg.eval_batch_size
        return mean_logits(uploaded_models(), lambda: (self.public_inputs(slice(start, start + chunk))
                                                       for start in range(0, len(self.public), chunk)))

    def distil(self, arch: str, start: Arrays, target: torch.Tensor, round_index: int) -> tuple[Arrays, list[float]]:
        """The prototype ``start`` after the distillation steps toward ``target``; the KL of the first
        and the last step."""
        cfg = self.cfg
        model = self.server_module(arch)
        model.load_state_dict(start)
        model.train()
        params = list(model.parameters())
        optimizer = adam([{"params": params, "lr": cfg.feddf_server_lr}])
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.feddf_server_steps)
        generator = torch_generator(cfg.seed, "feddf-server", round_index, arch)
        per_pass = max(len(self.public) // cfg.feddf_server_batch, 1)
        batches = training_batches(self.public, cfg.feddf_server_batch, math.ceil(cfg.feddf_server_steps / per_pass),
                                   generator)
        losses = []
        for _, index in islice(batches, cfg.feddf_server_steps):
            loss = distillation_kl(model(self.public_inputs(index)), target[index.to(target.device)],
                                   cfg.feddf_temperature)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, SERVER_GRAD_CLIP)
            optimizer.step()
            schedule.step()
            losses.append(float(loss.detach()))
        return to_cpu(model.state_dict()), [losses[0], losses[-1]]

    def aggregate(self, round_index: int, global_state: Arrays, replies: list[ClientReply],
                  server_state: dict[str, Any]) -> tuple[Arrays, dict[str, Any]]:
        """Per architecture: the n_k-weighted average of its uploads, distilled toward the ensemble of
        all uploads. ``weights`` are each reply's weight in its architecture's average."""
        groups: dict[str, list[int]] = {}
        for i, reply in enumerate(replies):
            groups.setdefault(architecture_of(reply.arrays), []).append(i)
        target = self.ensemble_logits(replies)
        new_state, weights, kl = dict(global_state), [0.0] * len(replies), {}
        for arch, members in groups.items():
            group_weights = example_weights([replies[i].metrics["num-examples"] for i in members])
            for i, weight in zip(members, group_weights):
                weights[i] = weight
            start = weighted_average([prototype(replies[i].arrays, arch) for i in members], group_weights)
            fused, kl[arch] = self.distil(arch, start, target, round_index)
            new_state.update(prefixed(arch, fused))
        return new_state, {"weights": weights, "distillation_kl": kl}


@torch.no_grad()
def mean_logits(models: Iterable[nn.Module], batches: Callable[[], Iterable[torch.Tensor]]) -> torch.Tensor:
    """(1/M) sum_m f_m(x) for every input x of ``batches()``, each model in eval mode, summed in
    the order given (FedDF's "avg_logits" ensemble, uniform over the uploads)."""
    total, count = None, 0
    for model in models:
        model.eval()
        logits = torch.cat([model(inputs).float() for inputs in batches()])
        total = logits if total is None else total.add_(logits)
        count += 1
    return total / count


def build_architecture(cfg, spec: TaskSpec, arch: str, generator: torch.Generator | None = None) -> nn.Module:
    options = {"stem": cfg.stem} if "stem" in model_options(arch) else {}
    return get_model(arch, num_classes=spec.num_classes, image_size=spec.image_size, generator=generator, **options)


@dataclass
class PFedDFOptions(FedDFOptions):
    pfeddf_finetune_epochs: int = option(1, "epochs each client fine-tunes the received prototype on its train split "
                                            "every round (its deliverable, never uploaded)", check=at_least(1))


@register_method
class PFedDF(FedDF):
    name = "pfeddf"
    summary = "pFedDF (fedward's reading): FedDF, each client's fine-tuned copy of its prototype as deliverable"
    Options = PFedDFOptions

    def local_model_state(self, reply: ClientReply, state: dict[str, Any]) -> Arrays | None:
        return state.get("personal")

    def keep_deliverable(self, ws: Workspace, client: ClientData, model: nn.Module, received: Arrays,
                         state: dict[str, Any], generator: torch.Generator, round_index: int) -> dict[str, float]:
        """The received prototype fine-tuned on the client's train split: kept in its state only."""
        model.load_state_dict(received)
        steps, loss = self.train_local(ws, client, model, state, "finetune", self.cfg.pfeddf_finetune_epochs,
                                       generator, round_index)
        state["personal"] = to_cpu(model.state_dict())
        return {"finetune-loss": loss, "finetune-steps": float(steps)}
