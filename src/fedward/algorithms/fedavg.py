"""FedAvg (McMahan et al. 2017) as in the Fed-MAS reference code, and the local training loop
that FedProx, MOON, local and centralized training share."""

from __future__ import annotations

import copy
from typing import Any, Callable

import torch
from torch import nn

from fedward.algorithms.aggregate import example_weights, weighted_average
from fedward.algorithms.privacy import (
    PerSampleStep, add_round_noise, check_dp_config, check_secure_config, clip_update, per_sample_epsilon,
)
from fedward.algorithms.registry import register_method
from fedward.algorithms.base import (
    Algorithm,
    Arrays,
    GlobalTraining,
    ClientReply,
    ServerMessage,
    Workspace,
    batchnorm_buffer_keys,
    examples_seen,
    make_optimizer,
    round_lr,
    set_lr,
    to_cpu,
    training_batches,
)
from fedward.data.types import ClientData
from fedward.losses import build_loss
from fedward.secure_aggregation import SecureSettings
from fedward.seeding import torch_generator

# (model, images) -> (logits, anything the extra loss needs)
ForwardFn = Callable[[nn.Module, torch.Tensor], tuple[torch.Tensor, Any]]
# (forward extras, images) -> scalar tensor added to the task loss
ExtraLossFn = Callable[[Any, torch.Tensor], torch.Tensor]


def plain_forward(model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, Any]:
    return model(images), None


def train_local(ws: Workspace, model: nn.Module, client: ClientData, *, epochs: int, batch_size: int,
                loss_fn: nn.Module, optimizer: torch.optim.Optimizer, generator: torch.Generator,
                forward: ForwardFn = plain_forward, extra_loss: ExtraLossFn | None = None,
                grad_clip: float | None = None, balanced: bool = False,
                after_backward: Callable[[nn.Module], None] | None = None,
                per_sample: dict[str, Any] | None = None) -> tuple[int, float]:
    """Run ``epochs`` epochs of minibatch training on the client's train split.

    Returns (number of steps, mean task+extra loss). Images are augmented as whole batches on the
    training device with the client's generator, so the work is reproducible bit for bit.
    ``after_backward(model)`` may change the gradients before clipping and the optimizer step
    (SCAFFOLD's control-variate correction). ``balanced``: class-balanced sampling
    (``--instance_sampling``). ``per_sample``: the keyword arguments of
    :class:`~fedward.algorithms.privacy.PerSampleStep` but the model and optimizer (DP-SGD).
    """
    private = None
    if per_sample is not None:
        if extra_loss is not None or after_backward is not None or grad_clip is not None:
            raise ValueError("per-sample DP-SGD takes the task loss's per-image gradients alone")
        # A client with fewer images than a batch trains on one batch of them all.
        private = PerSampleStep(model, optimizer, batch_size=min(batch_size, len(client.train)), **per_sample)
        optimizer = private.optimizer
    try:
        return _train_epochs(ws, private.model if private else model, client, epochs, batch_size, loss_fn,
                             optimizer, generator, forward, extra_loss, grad_clip, balanced, after_backward)
    finally:
        if private is not None:
            private.close()


def _train_epochs(ws, model, client, epochs, batch_size, loss_fn, optimizer, generator, forward, extra_loss,
                  grad_clip, balanced, after_backward) -> tuple[int, float]:
    model.train()
    split = client.train
    total, steps = torch.zeros((), dtype=torch.float64), 0
    for _, index in training_batches(split, batch_size, epochs, generator, balanced=balanced):
        images = split.images[index].to(ws.device, non_blocking=True)
        labels = split.labels[index].to(ws.device, non_blocking=True)
        inputs = ws.augment(images, generator)
        logits, extras = forward(model, inputs)
        loss = loss_fn(logits, labels)
        if extra_loss is not None:
            loss = loss + extra_loss(extras, inputs)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if after_backward is not None:
            after_backward(model)
        if grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        total += loss.detach().double().cpu()
        steps += 1
    return steps, float(total / max(steps, 1))


@register_method
class FedAvg(Algorithm):
    """Clients load the global state dict, train locally, send the whole state dict back; the
    server averages every entry with weights num-examples / sum (the reference's rule, where
    num-examples = floor(n/B)*B). With ``bn_policy: local`` a client keeps its own BatchNorm
    statistics across rounds (FedBN / FLamby behaviour)."""

    name = "fedavg"
    summary = "FedAvg (McMahan et al. 2017): the whole state dict, averaged by examples"
    Options = GlobalTraining
    default_grad_clip: float | None = None
    # Why a method cannot run under --dp_clip, and under --dp_sgd_clip (None: it can; see
    # fedward.algorithms.privacy).
    client_dp_refusal: str | None = None
    per_sample_dp_refusal: str | None = None
    # Why a method cannot run under --secure_aggregation (None: it can; fedward.secure_aggregation).
    secure_aggregation_refusal: str | None = None

    # -- hooks for subclasses ------------------------------------------------------------------
    def forward_fn(self, ws: Workspace, message: ServerMessage, state: dict[str, Any]) -> ForwardFn:
        return plain_forward

    def extra_loss_fn(self, ws: Workspace, message: ServerMessage, state: dict[str, Any]) -> ExtraLossFn | None:
        return None

    def model_arrays(self, message: ServerMessage) -> Arrays:
        """The global model's state dict in the server's message (default: all its arrays)."""
        return message.arrays

    def gradient_hook(self, ws: Workspace, message: ServerMessage, state: dict[str, Any]):
        """Called after each backward pass with the model (None: no hook)."""
        return None

    def after_training(self, ws: Workspace, state: dict[str, Any]) -> None:
        """Client-side bookkeeping after local training (MOON keeps its previous model)."""

    # -- client -------------------------------------------------------------------------------
    def task_loss(self, client: ClientData, round_index: int) -> nn.Module:
        """The local loss from this client's own class counts, at round ``round_index``'s schedule."""
        loss_fn = build_loss(self.cfg.loss_fn_name, client.train.class_counts(self.spec.num_classes).tolist(),
                             global_class_counts=self.spec.global_class_counts)
        loss_fn.start_round(round_index - 1, self.cfg.comm_round)
        return loss_fn

    @classmethod
    def check_config(cls, cfg) -> None:
        if cfg.has("dp_clip"):
            check_dp_config(cfg, cls.name, cls.client_dp_refusal, cls.per_sample_dp_refusal)
        if cfg.has("secure_aggregation"):
            own_step = ("its server step is its own aggregate, which the secure path (weights, then the weighted "
                        "average) would skip" if cls.aggregate is not FedAvg.aggregate else None)
            check_secure_config(cfg, cls.name, cls.secure_aggregation_refusal or own_step)

    def kept_optimizer(self, params, state: dict[str, Any], key: str, round_index: int) -> torch.optim.Optimizer:
        """The local optimizer at round ``round_index``'s learning rate, with its state from
        ``state[key]`` under ``persist_optimizer_state``."""
        optimizer = make_optimizer(self.cfg, params, round_index)
        if self.cfg.persist_optimizer_state and key in state:
            # A copy: the saved state must stay as it was (the checkpoint may still be writing it).
            optimizer.load_state_dict(copy.deepcopy(state[key]))
            set_lr(optimizer, round_lr(self.cfg, round_index))  # the saved groups carry last round's lr
        return optimizer

    def load_start_model(self, ws: Workspace, message: ServerMessage, state: dict[str, Any],
                         client: ClientData) -> nn.Module:
        model = ws.model
        model.load_state_dict(self.model_arrays(message))
        if self.cfg.bn_policy == "local" and "bn-statistics" in state:
            model.load_state_dict(state["bn-statistics"], strict=False)
        return model

    def client_update(self, ws: Workspace, client: ClientData, message: ServerMessage, state: dict[str, Any],
                      generator: torch.Generator) -> ClientReply:
        cfg = self.cfg
        model = self.load_start_model(ws, message, state, client)
        loss_fn = self.task_loss(client, message.round)
        optimizer = self.kept_optimizer(model.parameters(), state, "optimizer", message.round)
        per_sample = self.per_sample_settings(message.round, client.client_id, ws.device)
        steps, mean_loss = train_local(
            ws, model, client, epochs=cfg.epochs, batch_size=cfg.batch_size, loss_fn=loss_fn, optimizer=optimizer,
            generator=generator, balanced=cfg.instance_sampling, forward=self.forward_fn(ws, message, state),
            extra_loss=self.extra_loss_fn(ws, message, state), after_backward=self.gradient_hook(ws, message, state),
            grad_clip=cfg.grad_clip if cfg.grad_clip is not None else self.default_grad_clip, per_sample=per_sample)
        if cfg.persist_optimizer_state:
            state["optimizer"] = optimizer.state_dict()
        arrays = to_cpu(model.state_dict())
        if cfg.bn_policy == "local":
            state["bn-statistics"] = {k: arrays[k] for k in batchnorm_buffer_keys(model)}
        self.after_training(ws, state)
        metrics = {"num-examples": float(examples_seen(len(client.train), cfg.batch_size)),
                   "train-loss": mean_loss, "steps": float(steps)}
        if per_sample is not None:
            # Every DP-SGD step this client has taken, over the run: its own privacy account.
            state["dp-sgd-steps"] = state.get("dp-sgd-steps", 0) + steps
            metrics["dp-sgd-epsilon"] = per_sample_epsilon(cfg.dp_sgd_noise_multiplier, cfg.batch_size,
                                                           len(client.train), state["dp-sgd-steps"], cfg.dp_delta)
        if cfg.has("dp_clip") and cfg.dp_clip is not None:
            start = self.model_arrays(message)
            arrays = clip_update(arrays, {k: start[k] for k in arrays}, cfg.dp_clip)
        return ClientReply(client_id=client.client_id, arrays=self.reply_arrays(arrays, message, state, steps),
                           metrics=metrics)

    def per_sample_settings(self, round_index: int, client_id: int, device: torch.device) -> dict[str, Any] | None:
        """DP-SGD's settings for one client's round (None without --dp_sgd_clip); its noise comes
        from its own stream, seeded by (seed, round, client), so a resumed run draws the same."""
        cfg = self.cfg
        if not cfg.has("dp_sgd_clip") or cfg.dp_sgd_clip is None:
            return None
        return {"clip": cfg.dp_sgd_clip, "noise_multiplier": cfg.dp_sgd_noise_multiplier,
                "generator": torch_generator(cfg.seed, "dp-sgd-noise", round_index, client_id, device=device)}

    def reply_arrays(self, trained: Arrays, message: ServerMessage, state: dict[str, Any], steps: int) -> Arrays:
        """What the reply carries, given the trained state dict and the number of steps (default: the
        state dict)."""
        return trained

    def finetune(self, ws: Workspace, client: ClientData, global_state: Arrays, generator: torch.Generator) -> nn.Module:
        """+FT (``--finetune_epochs``): the final global model trained on this client's train split with
        the task loss alone (no proximal, contrastive or alignment term: plain fine-tuning, as Collins
        et al. 2022), a fresh optimizer and the run's local settings; the model is left in ``ws.model``."""
        cfg = self.cfg
        model = ws.model
        model.load_state_dict(global_state)
        train_local(ws, model, client, epochs=cfg.finetune_epochs, batch_size=cfg.batch_size,
                    loss_fn=self.task_loss(client, cfg.comm_round),
                    optimizer=make_optimizer(cfg, model.parameters()), generator=generator,
                    balanced=cfg.instance_sampling,
                    grad_clip=cfg.grad_clip if cfg.grad_clip is not None else self.default_grad_clip)
        return model

    # -- server -------------------------------------------------------------------------------
    def aggregate(self, round_index: int, global_state: Arrays, replies: list[ClientReply],
                  server_state: dict[str, Any]) -> tuple[Arrays, dict[str, Any]]:
        weights = self.aggregation_weights(round_index, replies)
        average = weighted_average([r.arrays for r in replies], weights)
        return self.aggregate_average(round_index, global_state, average, weights, server_state)

    def client_level_dp(self) -> bool:
        return self.cfg.has("dp_clip") and self.cfg.dp_clip is not None

    def aggregation_weights(self, round_index: int, replies: list[ClientReply]) -> list[float]:
        """The weight of each reply in the average, from its metrics: num-examples / sum, or under
        --dp_clip equal weights (the noise is calibrated to an equal-weight average)."""
        if self.client_level_dp():
            return [1.0 / len(replies)] * len(replies)
        return example_weights([r.metrics["num-examples"] for r in replies])

    def secure_weighting(self, round_index: int) -> tuple[str | None, float]:
        """Under --secure_aggregation: the reply metric each client weights its own update by (None:
        equal weights) and a bound on it over the federation; :meth:`aggregation_weights` normalised."""
        if self.client_level_dp():
            return None, 1.0
        return "num-examples", float(max(sum(counts) for counts in self.spec.train_class_counts))

    def secure_settings(self, round_index: int) -> SecureSettings | None:
        cfg = self.cfg
        if not (cfg.has("secure_aggregation") and cfg.secure_aggregation):
            return None
        metric, bound = self.secure_weighting(round_index)
        return SecureSettings(metric, bound, clipping_range=cfg.secagg_clipping_range, shares=cfg.secagg_shares,
                              threshold=cfg.secagg_threshold)

    def aggregate_average(self, round_index: int, global_state: Arrays, average: Arrays, weights: list[float],
                          server_state: dict[str, Any]) -> tuple[Arrays, dict[str, Any]]:
        """The next global model from the replies' weighted average (all that secure aggregation lets
        the server see); under --dp_clip, with the round's Gaussian noise (``fedward.algorithms.privacy``)."""
        if self.client_level_dp():
            average = add_round_noise(average, bound=self.cfg.dp_clip, noise_multiplier=self.cfg.dp_noise_multiplier,
                                      num_clients=len(weights), seed=self.cfg.seed, round_index=round_index)
        return average, {"weights": weights}
