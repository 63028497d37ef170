"""FedRep (Collins et al. 2021): a shared representation (body) and a personal head per client.

The model is split into the head h (the final classifier: every state-dict key starting with
``fc.``) and the body phi (every other key, BatchNorm statistics included). In round t client i
loads the global body phi^t and its own head h_i (in its first round: the initial global head), then

    h_i   <- GRD(f_i(phi^t, .), h_i)    for --head_epochs epochs, the body frozen
    phi_i <- GRD(f_i(., h_i), phi^t)    for --epochs epochs, the head frozen

keeps h_i and sends phi_i; the server sets phi^{t+1} = sum_i w_i phi_i with FedAvg's weights
w_i = n_i / sum_j n_j (n_i = floor(N_i/B) B). The global state dict keeps the initial head, so it
stays a whole model; no client's head ever leaves it. Client i's deliverable is (phi_i, h_i), the
body it has just trained with its head.

Defaults: ``--head_epochs 10``, the paper's 10 head epochs per round for each body epoch
(``--epochs`` is 1 by default), so every round the head is fitted to the newly received body;
PFLlib's FedRep trains the head for ``plocal_epochs`` = 1. With the body frozen a head epoch costs
about one forward pass over the client's data (no body gradients are computed).

Choices the paper leaves open: the head stage runs the body in train mode (batch statistics, as
the body stage does) but keeps none of the BatchNorm running-statistic updates it makes, so the
body stage starts from the received body, all of it. Each stage has its own optimizer
(``--lr``, ``--adam`` ... as FedAvg), kept across rounds with ``--persist_optimizer_state``.
Departure from PFLlib, which evaluates the received global body with the client's head: the
deliverable is the body the client has just trained, with its head.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import torch

from fedward.algorithms.aggregate import example_weights, weighted_average
from fedward.algorithms.base import (
    Arrays, ClientReply, LocalTraining, ServerMessage, TaskSpec, Workspace, to_cpu,
)
from fedward.algorithms.fedavg import FedAvg, train_local
from fedward.algorithms.registry import register_method
from fedward.data.types import ClientData
from fedward.errors import ConfigError
from fedward.options import at_least, option

HEAD_PREFIX = "fc."  # every fedward model names its final classifier ``fc``


def is_head(key: str) -> bool:
    return key.startswith(HEAD_PREFIX)


def head_of(arrays: Arrays) -> Arrays:
    return {k: v for k, v in arrays.items() if is_head(k)}


def body_of(arrays: Arrays) -> Arrays:
    return {k: v for k, v in arrays.items() if not is_head(k)}


@contextmanager
def frozen(params: Iterable[torch.nn.Parameter]) -> Iterator[None]:
    """Inside the block no gradient is computed for ``params`` (the optimizer then skips them)."""
    params = [p for p in params if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def check_head_split(method: type, cfg, spec: TaskSpec) -> None:
    """The model must have both a head (``fc``) and a body, or one of the parts would be empty."""
    keys = method.model_builder(cfg, spec)().state_dict()
    if not head_of(keys) or not body_of(keys):
        raise ConfigError(f"--method {method.name} splits the model into a body and its final classifier `fc`; "
                          f"--model {cfg.model} has {'no `fc`' if not head_of(keys) else 'nothing but `fc`'}")


def average_part(global_state: Arrays, replies: list[ClientReply]) -> tuple[Arrays, dict[str, Any]]:
    """The arrays the replies carry averaged with FedAvg's weights, every other entry of
    ``global_state`` unchanged (so the global model stays a whole state dict)."""
    weights = example_weights([r.metrics["num-examples"] for r in replies])
    averaged = weighted_average([r.arrays for r in replies], weights)
    return {k: averaged.get(k, v) for k, v in global_state.items()}, {"weights": weights}


@dataclass
class FedRepOptions(LocalTraining):
    head_epochs: int = option(10, "epochs training the head alone (body frozen) before the --epochs of the body "
                                  "(paper: 10; PFLlib: 1)", check=at_least(1))


class SplitModel(FedAvg):
    """Base of FedRep and LG-FedAvg: the model split into its head ``fc`` and its body; the part named
    by ``shares`` is averaged by the server, the other stays with each client (in its state), and the
    client's deliverable is the two parts it has just trained."""

    personalised = True
    shares: str  # "body" (FedRep) or "head" (LG-FedAvg)

    def shared_part(self, arrays: Arrays) -> Arrays:
        return body_of(arrays) if self.shares == "body" else head_of(arrays)

    @property
    def kept(self) -> str:
        return "head" if self.shares == "body" else "body"

    @classmethod
    def prepare_run(cls, cfg, spec: TaskSpec, num_clients: int) -> None:
        super().prepare_run(cfg, spec, num_clients)
        check_head_split(cls, cfg, spec)

    def declared_reply_keys(self, global_state: Arrays) -> set[str]:
        return set(self.shared_part(global_state))

    def reply_reference(self, global_state: Arrays, server_state: dict[str, Any]) -> Arrays:
        return self.shared_part(global_state)

    def aggregate(self, round_index: int, global_state: Arrays, replies: list[ClientReply],
                  server_state: dict[str, Any]) -> tuple[Arrays, dict[str, Any]]:
        return average_part(global_state, replies)

    def load_start_model(self, ws: Workspace, message: ServerMessage, state: dict[str, Any], client: ClientData):
        model = super().load_start_model(ws, message, state, client)
        if self.kept in state:
            model.load_state_dict(state[self.kept], strict=False)
        return model

    def reply_arrays(self, trained: Arrays, message: ServerMessage, state: dict[str, Any], steps: int) -> Arrays:
        # The shared part is kept only as part of the deliverable: next round starts from the global one.
        state["head"], state["body"] = head_of(trained), body_of(trained)
        return state[self.shares]

    def local_model_state(self, reply: ClientReply, state: dict[str, Any]) -> Arrays | None:
        return {**state["body"], **state["head"]} if "body" in state else None


@register_method
class FedRep(SplitModel):
    name = "fedrep"
    summary = "FedRep (Collins et al. 2021): the body is averaged, each client's head fc stays with it"
    Options = FedRepOptions
    shares = "body"

    def client_update(self, ws: Workspace, client: ClientData, message: ServerMessage, state: dict[str, Any],
                      generator: torch.Generator) -> ClientReply:
        head_loss = self.train_head(ws, client, message, state, generator)
        # FedAvg's update is the body stage: it reloads the received body (undoing the head stage's
        # BatchNorm statistics) with the head just trained, and trains with the head frozen.
        with frozen(p for name, p in ws.model.named_parameters() if is_head(name)):
            reply = super().client_update(ws, client, message, state, generator)
        reply.metrics["head-train-loss"] = head_loss
        return reply

    def train_head(self, ws: Workspace, client: ClientData, message: ServerMessage, state: dict[str, Any],
                   generator: torch.Generator) -> float:
        """The head stage: ``--head_epochs`` epochs on the head alone, which then goes into ``state``.
        Returns the mean training loss."""
        cfg = self.cfg
        model = self.load_start_model(ws, message, state, client)
        # The workspace's last update may have left body gradients, which would enter the clip norm.
        model.zero_grad(set_to_none=True)
        loss_fn = self.task_loss(client, message.round)
        optimizer = self.kept_optimizer((p for name, p in model.named_parameters() if is_head(name)), state,
                                        "head-optimizer", message.round)
        with frozen(p for name, p in model.named_parameters() if not is_head(name)):
            _, mean_loss = train_local(
                ws, model, client, epochs=cfg.head_epochs, batch_size=cfg.batch_size, loss_fn=loss_fn,
                optimizer=optimizer, generator=generator, balanced=cfg.instance_sampling,
                grad_clip=cfg.grad_clip if cfg.grad_clip is not None else self.default_grad_clip)
        if cfg.persist_optimizer_state:
            state["head-optimizer"] = optimizer.state_dict()
        state["head"] = head_of(to_cpu(model.state_dict()))
        return mean_loss
