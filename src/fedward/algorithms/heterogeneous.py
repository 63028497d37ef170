"""What the model-heterogeneous methods share.

Every client keeps a local model of its own architecture (``--client_models``) in its state
(:class:`LocalModelMethod`); the local model is the deliverable: it is what the engine evaluates,
on the client's own splits. In mhpflid, fml and fedkd (:class:`SharedModelMethod`) the only thing
that travels is a small shared model of one architecture for all (MH-pFLID's messenger, FML's
meme model, FedKD's mentee), whose state dict the server averages with weights n_k / sum(n), n_k
being the client's number of training images. The public-data methods exchange what their
papers say instead (predictions on public data, models).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from fedward.algorithms.aggregate import example_weights, weighted_average
from fedward.algorithms.base import (
    Algorithm, Arrays, ClientReply, ServerMessage, Workspace, check_client_models, to_cpu, training_batches,
)
from fedward.data.types import ClientData, Split
from fedward.losses import LocalLoss, build_loss
from fedward.options import POSITIVE, at_least, option
from fedward.seeding import torch_generator


def adam(param_groups: list[dict[str, Any]]) -> torch.optim.Adam:
    """Adam (the reproduction's optimizer for every part), fused where the tensors allow it."""
    params = [p for group in param_groups for p in group["params"]]
    fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.Adam(param_groups, fused=fused)


# (augmented inputs, labels) -> (loss to minimise, loss to report)
BatchLoss = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def train_stage(ws: Workspace, split: Split, *, epochs: int, batch_size: int, generator: torch.Generator,
                optimizer: torch.optim.Optimizer, clip: float, clip_groups: list[list[torch.nn.Parameter]],
                batch_loss: BatchLoss) -> tuple[int, float]:
    """``epochs`` of minibatch steps on ``split`` (batches augmented with the client's generator);
    each parameter group in ``clip_groups`` has its gradient norm clipped to ``clip`` on its own.
    Returns (steps, mean reported loss)."""
    total, steps = torch.zeros((), dtype=torch.float64), 0
    for _, index in training_batches(split, batch_size, epochs, generator):
        inputs = ws.augment(split.images[index].to(ws.device), generator)
        labels = split.labels[index].to(ws.device)
        loss, reported = batch_loss(inputs, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for group in clip_groups:
            torch.nn.utils.clip_grad_norm_(group, clip)
        optimizer.step()
        total += reported.detach().double().cpu()
        steps += 1
    return steps, float(total / max(steps, 1))


def relative_change(old: Arrays, new: Arrays, keys: list[str]) -> float:
    """||new - old|| / ||old|| over the arrays ``keys`` (how far the shared model's weights moved in a
    round; BatchNorm statistics are left out: they jump to the data's in the first round)."""
    moved = sum(float((new[k].double() - old[k].double()).pow(2).sum()) for k in keys)
    size = sum(float(old[k].double().pow(2).sum()) for k in keys)
    return (moved / size) ** 0.5 if size > 0 else 0.0


# MH-pFLID's BreakHis clients: the default local architectures, cycled when there are more clients.
DEFAULT_CLIENT_MODELS = ("resnet17", "resnet11", "resnet8", "resnet5")


@dataclass
class LocalModelOptions:
    client_models: list[str] = option(factory=list, help="one local model per client (default: resnet17,resnet11,"
                                                         "resnet8,resnet5, cycled over the clients)")
    local_lr: float = option(1e-4, "Adam lr of the local model (and of R/T in mhpflid, of the shared model in fml and "
                                   "fedkd)", check=POSITIVE)


@dataclass
class SharedModelOptions(LocalModelOptions):
    messenger_dim: int = option(512, "width D_mes of the shared messenger model", check=at_least(1))


class LocalModelMethod(Algorithm):
    """Base: each client's local model, of its own architecture, lives in its state (``"local"``)
    and is its deliverable; Adam optimizers, the task loss and per-client modules as the
    heterogeneous methods use them."""

    personalised = True
    # The MH-pFLID seed's batch size; its reproduction resizes and trains without augmentation.
    default_overrides = {"batch_size": 8, "augment": False}
    # Clients at different resolutions with different architectures: BreakHis's setting.
    natural_datasets = ("synthetic_multires", "breakhis")
    default_grad_clip: float  # each method's reference clip; --grad_clip overrides it

    @classmethod
    def check_config(cls, cfg) -> None:
        check_client_models(cfg)

    @classmethod
    def default_client_models(cls, cfg) -> list[str]:
        return list(DEFAULT_CLIENT_MODELS)

    @property
    def heterogeneous(self) -> bool:
        return True

    @property
    def grad_clip(self) -> float:
        return self.cfg.grad_clip if self.cfg.grad_clip is not None else self.default_grad_clip

    def local_model_state(self, reply: ClientReply, state: dict[str, Any]) -> Arrays | None:
        return state.get("local")

    # -- client helpers --------------------------------------------------------------------------
    def load_local(self, ws: Workspace, client: ClientData, state: dict[str, Any]) -> nn.Module:
        model = self.local_model(ws, client.client_id)
        model.load_state_dict(state["local"] if "local" in state else self.initial_local_state(client.client_id))
        return model

    def load_client_module(self, ws: Workspace, client: ClientData, state: dict[str, Any], role: str,
                           build) -> nn.Module:
        """A per-client module (R, T, FedKD's W_h) kept in the client's state; ``build(generator)``
        makes its seeded initial version in round 1."""
        arch = self.client_architecture(client.client_id)
        module = ws.cached_module((role, arch), lambda: build(None))
        if role in state:
            module.load_state_dict(state[role])
        else:
            fresh = build(torch_generator(self.cfg.seed, role, client.client_id))
            module.load_state_dict(fresh.state_dict())
        return module

    def optimizer(self, state: dict[str, Any], name: str, param_groups: list[dict[str, Any]]) -> torch.optim.Adam:
        """An Adam over ``param_groups``, with its moments from the last round when
        ``persist_optimizer_state`` is on (the reproduction re-creates its optimizers every round)."""
        optimizer = adam(param_groups)
        key = f"optimizer-{name}"
        if self.cfg.persist_optimizer_state and key in state:
            optimizer.load_state_dict(copy.deepcopy(state[key]))
        return optimizer

    def keep_optimizer(self, state: dict[str, Any], name: str, optimizer: torch.optim.Optimizer) -> None:
        if self.cfg.persist_optimizer_state:
            state[f"optimizer-{name}"] = optimizer.state_dict()

    def task_loss(self, client: ClientData, round_index: int) -> LocalLoss:
        loss_fn = build_loss(self.cfg.loss_fn_name, client.train.class_counts(self.spec.num_classes).tolist(),
                             global_class_counts=self.spec.global_class_counts)
        loss_fn.start_round(round_index - 1, self.cfg.comm_round)
        return loss_fn



class SharedModelMethod(LocalModelMethod):
    """Base: broadcast the shared model every round, keep the local model in the client's state,
    average the shared model's replies (BatchNorm buffers included)."""

    @classmethod
    def model_builder(cls, cfg, spec):
        from fedward.models import get_model

        # The global model is the shared messenger / meme / mentee.
        return lambda: get_model("messenger", num_classes=spec.num_classes, image_size=spec.image_size,
                                 width=cfg.messenger_dim)

    def global_model_name(self) -> str:
        return "messenger"

    # -- server -------------------------------------------------------------------------------
    def aggregate(self, round_index: int, global_state: Arrays, replies: list[ClientReply],
                  server_state: dict[str, Any]) -> tuple[Arrays, dict[str, Any]]:
        weights = example_weights([r.metrics["num-examples"] for r in replies])
        new_state = weighted_average([r.arrays for r in replies], weights)
        return new_state, {"weights": weights, "shared_displacement": relative_change(global_state, new_state, self.parameter_names)}

    def declared_reply_keys(self, global_state: Arrays) -> set[str]:
        return set(global_state)

    # -- client ---------------------------------------------------------------------------------
    def load_shared(self, ws: Workspace, message: ServerMessage) -> nn.Module:
        ws.model.load_state_dict(message.arrays)
        return ws.model

    def reply(self, client: ClientData, shared: nn.Module, metrics: dict[str, float]) -> ClientReply:
        """The shared model's state dict and scalars: nothing else leaves the client."""
        return ClientReply(client_id=client.client_id, arrays=to_cpu(shared.state_dict()),
                           metrics={"num-examples": float(len(client.train)), **metrics})
