"""What the public-data baselines (fedmd, dsfl, ktpfl) share: no global model, one public set that
every client holds, and the client's steps on it.

Every client keeps a local model of its own architecture (:class:`LocalModelMethod`: client state
``"local"``; it is the deliverable and what is evaluated). A client's update, every round:

1. learn from what the server sent about the public set (a consensus, soft labels, a personalised
   target; nothing in the client's first round, where FedMD does its transfer learning instead);
2. train on its private data for ``--epochs`` (task loss, Adam at ``--local_lr``);
3. compute its local model's outputs on the public images, in eval mode and without augmentation
   (normalised with the data set's mean and std), and send only them: one (P, K) array for P
   public images and K classes, plus scalar metrics.

The papers run 2-3 before the server's aggregate and 1 after it, in the same round; here 1 opens the
next round's update, so the sequence of steps is the same, only the last round's aggregate is never
learnt from. The server's state between rounds is its last aggregate (empty before round 1): it is
the engine's "global state", what the next message carries, and what a checkpoint keeps. There is
no global model and no global row is scored.

The public set is :func:`fedward.data.public.load_public` (the data set's built-in public split, or
``--public_data``), loaded once per process; it is the same on every worker and node because it is
seeded. Clients and server agree on its size through ``--public_size``: a public set of another size
is an error, so the server checks each reply's shape without loading an image. Public batches go
through the same ``--augment`` pipeline as private ones (off by default for these methods).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from fedward.algorithms.base import Arrays, ClientReply, Epochs, ServerMessage, Workspace, to_cpu
from fedward.algorithms.heterogeneous import BatchLoss, LocalModelMethod, LocalModelOptions, train_stage
from fedward.data.augment import normalize
from fedward.data.public import PublicData, load_public
from fedward.data.types import ClientData, Split
from fedward.errors import ConfigError
from fedward.options import at_least, option


@dataclass
class PublicKDOptions(LocalModelOptions, PublicData, Epochs):
    public_batch_size: int = option(64, "batch size of the steps on the public set (FedMD's and KT-pFL's code: 256 on "
                                        "5000 public images a round, about 20 steps; 1200 / 64 is as many)",
                                    check=at_least(1))


def checked_public(cfg, public: Split) -> Split:
    if len(public) != cfg.public_size:
        raise ConfigError(f"the public set holds {len(public)} images, not --public_size {cfg.public_size}: clients "
                          f"and server agree on the size of what travels through --public_size; set --public_size "
                          f"{len(public)}")
    return public


def stacked(replies: list[ClientReply], key: str) -> torch.Tensor:
    """The replies' ``key`` arrays, (N, P, K), in the order given (the round loop's: by client id)."""
    return torch.stack([reply.arrays[key] for reply in replies])


def uniform_weights(replies: list[ClientReply]) -> list[float]:
    return [1.0 / len(replies)] * len(replies)


def soft_target_kl(student_logits: torch.Tensor, target: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(target || softmax(student / T)), mean over the batch; ``target`` holds probabilities."""
    return F.kl_div(F.log_softmax(student_logits.float() / temperature, dim=1), target, reduction="batchmean")


class PublicKDMethod(LocalModelMethod):
    """Base: the client update above; a method says what it learns from the server's message
    (:meth:`learn_from_server`), what it sends (:meth:`upload`) and how the server aggregates."""

    needs_labels = False  # FedMD's transfer learning trains on the public labels
    reply_key = ""  # the one array a reply carries
    default_grad_clip: float | None = None  # the papers clip nothing; --grad_clip sets a clip

    # -- no global model --------------------------------------------------------------------
    @classmethod
    def model_builder(cls, cfg, spec):
        return nn.Module  # an empty module: the workspace builds one, nothing is averaged

    @classmethod
    def initial_state(cls, cfg, build) -> tuple[Arrays, list[str]]:
        return {}, []  # no aggregate before round 1

    @classmethod
    def prepare_run(cls, cfg, spec, num_clients: int) -> None:
        super().prepare_run(cfg, spec, num_clients)
        checked_public(cfg, load_public(cfg, spec.class_names, labelled=cls.needs_labels))

    @property
    def num_clients(self) -> int:
        return len(self.spec.train_class_counts)

    @cached_property
    def public(self) -> Split:
        """The public set, loaded once per process."""
        return checked_public(self.cfg, load_public(self.cfg, self.spec.class_names, labelled=self.needs_labels))

    # -- what a reply may carry ---------------------------------------------------------------
    def reply_rows(self) -> int:
        """P, the public images a reply has outputs for."""
        return self.cfg.public_size

    def declared_reply_keys(self, global_state: Arrays) -> set[str]:
        return {self.reply_key}

    def reply_reference(self, global_state: Arrays, server_state: dict[str, Any]) -> Arrays:
        return {self.reply_key: torch.zeros(self.reply_rows(), self.spec.num_classes)}

    # -- the client ---------------------------------------------------------------------------
    def learn_from_server(self, ws: Workspace, client: ClientData, message: ServerMessage, state: dict[str, Any],
                          generator: torch.Generator, local: nn.Module) -> dict[str, float]:
        """Step 1 (see the module docstring); returns its metrics, the same keys every round."""
        raise NotImplementedError

    def upload(self, ws: Workspace, local: nn.Module, message: ServerMessage) -> Arrays:
        """Step 3: ``{reply_key: (P, K) outputs}``."""
        raise NotImplementedError

    def client_update(self, ws: Workspace, client: ClientData, message: ServerMessage, state: dict[str, Any],
                      generator: torch.Generator) -> ClientReply:
        local = self.load_local(ws, client, state)
        metrics = self.learn_from_server(ws, client, message, state, generator, local)
        loss_fn = self.task_loss(client, message.round)

        def private_loss(inputs, labels):
            loss = loss_fn(local(inputs), labels)
            return loss, loss

        steps, loss = self.stage(ws, local, state, "private", client.train, epochs=self.cfg.epochs,
                                 batch_size=self.cfg.batch_size, generator=generator, batch_loss=private_loss)
        arrays = self.upload(ws, local, message)
        state["local"] = to_cpu(local.state_dict())
        return ClientReply(client_id=client.client_id, arrays=arrays,
                           metrics={"num-examples": float(len(client.train)), "train-loss": loss, "steps": float(steps),
                                    **metrics})

    def stage(self, ws: Workspace, model: nn.Module, state: dict[str, Any], name: str, split: Split, *, epochs: int,
              batch_size: int, generator: torch.Generator, batch_loss: BatchLoss,
              keep: bool = True) -> tuple[int, float]:
        """``epochs`` of Adam steps at ``--local_lr`` on ``split``; the optimizer is kept as ``name``
        unless the stage never runs again (``keep``)."""
        model.train()
        params = list(model.parameters())
        optimizer = self.optimizer(state, name, [{"params": params, "lr": self.cfg.local_lr}])
        clip = self.grad_clip  # None: no clip group, so no clipping
        result = train_stage(ws, split, epochs=epochs, batch_size=batch_size, generator=generator, optimizer=optimizer,
                             clip=clip or 0.0, clip_groups=[params] if clip is not None else [], batch_loss=batch_loss)
        if keep:
            self.keep_optimizer(state, name, optimizer)
        return result

    def fit_public(self, ws: Workspace, model: nn.Module, state: dict[str, Any], name: str,
                   index: torch.Tensor | None, loss_of: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], *,
                   epochs: int, generator: torch.Generator, keep: bool = True) -> dict[str, float]:
        """A stage on the public images ``index`` (all when None); ``loss_of(logits, positions)``
        gets each batch's positions in ``index``, to look its targets up. Returns the stage's
        ``<name>-steps`` and ``<name>-loss`` (0 when it ran no step)."""
        images = self.public.images if index is None else self.public.images[index]

        def batch_loss(inputs, positions):
            loss = loss_of(model(inputs), positions)
            return loss, loss

        # The split's "labels" are positions, so each batch finds its own targets.
        steps, loss = self.stage(ws, model, state, name, Split(images, torch.arange(len(images))), epochs=epochs,
                                 batch_size=self.cfg.public_batch_size, generator=generator, batch_loss=batch_loss,
                                 keep=keep)
        return {f"{name}-steps": float(steps), f"{name}-loss": loss}

    @torch.no_grad()
    def public_logits(self, ws: Workspace, model: nn.Module, index: torch.Tensor | None = None) -> torch.Tensor:
        """The model's logits on the public images ``index`` (all when None): eval mode, no
        augmentation; float32 on the CPU."""
        model.eval()
        images = self.public.images if index is None else self.public.images[index]
        size = self.cfg.eval_batch_size
        return torch.cat([model(normalize(images[i:i + size].to(ws.device), self.spec.mean, self.spec.std)).float()
                          for i in range(0, len(images), size)]).cpu()
