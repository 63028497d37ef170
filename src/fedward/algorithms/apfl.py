"""APFL (Deng, Kamani and Mahdavi 2020): each client mixes a personal model with the global one.

Client i keeps a personal model v_i and a mixing weight alpha_i (in its state; in its first round
v_i starts from the global model it receives and alpha_i is ``--apfl_alpha``) and receives the
global model w. At every local step, on one augmented batch xi, both models step from the same
point (w, v), as in the paper's update equations:

    w   <- w - eta grad f_i(w; xi)
    v   <- v - eta grad_v f_i(vbar; xi) = v - eta alpha_i grad f_i(vbar; xi),   vbar = alpha_i v + (1 - alpha_i) w

(w held fixed inside vbar), and with ``--apfl_adaptive_alpha true`` the paper's adaptive weight

    alpha_i <- clip(alpha_i - eta grad_alpha f_i(vbar; xi), 0, 1),   grad_alpha f_i(vbar) = <v - w, grad f_i(vbar)>.

The client sends w (its whole state dict), averaged with FedAvg's weights n_i / sum_j n_j. Its
deliverable is vbar_i = alpha_i v_i + (1 - alpha_i) w_i, w_i the global model after the client's
local steps, built as a state dict of the same architecture. BatchNorm: vbar's forward passes run
on v's modules, so v's running statistics are those of vbar's own activations, and they are vbar's
statistics in the deliverable (statistics are not mixed); w's are its own, sent and averaged.

Defaults: ``--apfl_alpha 0.5`` and no adaptation, the authors' code (FedTorch's
``--fed_personal_alpha 0.5``, ``--fed_adaptive_alpha false``); PFLlib's default alpha is 1.0. The alpha
step uses the client's ``--lr``, as FedTorch and PFLlib do. w and v share fedward's local optimizer
settings (``--lr``, ``--adam`` ...; the paper's steps are plain SGD: ``--momentum 0 --wd 0``).
Departures from the authors' code, which mixes the two models' outputs (alpha v(x) + (1 - alpha) w(x)),
steps w before v, and adapts alpha once per round: we follow the paper's parameter mixture and
update equations, alpha adapted at every step. PFLlib adds 0.02 alpha to grad_alpha; we do not.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn
from torch.func import functional_call

from fedward.algorithms.base import (
    Arrays, ClientReply, LocalTraining, ServerMessage, Workspace, batchnorm_buffer_keys, examples_seen,
    round_lr, to_cpu, training_batches,
)
from fedward.algorithms.fedavg import FedAvg
from fedward.algorithms.registry import register_method
from fedward.data.types import ClientData
from fedward.options import UNIT_INTERVAL, option


def apfl_step(w_model: nn.Module, v_model: nn.Module, alpha: torch.Tensor, inputs: torch.Tensor,
              labels: torch.Tensor, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
              optimizer: torch.optim.Optimizer, *, alpha_lr: float | None = None,
              grad_clip: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One local step on a batch: w on its own loss, v on the loss of vbar = alpha v + (1 - alpha) w,
    both gradients taken at the current (w, v) and applied by ``optimizer`` (which holds both
    models' parameters). With ``alpha_lr``, ``alpha`` (a 0-d tensor that requires grad) then takes
    its step in place, clipped to [0, 1]. Returns the two losses, detached."""
    w_params = dict(w_model.named_parameters())
    mixed = {name: alpha * v + (1 - alpha) * w_params[name].detach() for name, v in v_model.named_parameters()}
    loss_w = loss_fn(w_model(inputs), labels)
    loss_mixed = loss_fn(functional_call(v_model, mixed, (inputs,)), labels)
    optimizer.zero_grad(set_to_none=True)
    alpha.grad = None
    # One backward pass: loss_w reaches only w, loss_mixed only v and alpha (w is detached in vbar).
    (loss_w + loss_mixed).backward()
    if grad_clip is not None:
        for model in (w_model, v_model):
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    if alpha_lr is not None:
        with torch.no_grad():
            alpha.sub_(alpha_lr * alpha.grad).clamp_(0.0, 1.0)
    return loss_w.detach(), loss_mixed.detach()


@dataclass
class APFLOptions(LocalTraining):
    apfl_alpha: float = option(0.5, "weight alpha of the personal model in vbar = alpha v + (1 - alpha) w (the start "
                                    "with --apfl_adaptive_alpha; authors' code: 0.5)", check=UNIT_INTERVAL)
    apfl_adaptive_alpha: bool = option(False, "learn each client's alpha: alpha <- clip(alpha - lr <v - w, "
                                              "grad f(vbar)>, 0, 1) at every step")


@register_method
class APFL(FedAvg):
    name = "apfl"
    summary = "APFL (Deng et al. 2020): a personal model v mixed with the global w, vbar = alpha v + (1 - alpha) w"
    Options = APFLOptions
    personalised = True

    def client_update(self, ws: Workspace, client: ClientData, message: ServerMessage, state: dict[str, Any],
                      generator: torch.Generator) -> ClientReply:
        cfg = self.cfg
        w_model = self.load_start_model(ws, message, state, client)
        v_model = ws.spare_model("apfl-personal")
        v_model.load_state_dict(state.get("personal", message.arrays))  # first round: the received global model
        adaptive = cfg.apfl_adaptive_alpha
        alpha = torch.tensor(state.get("alpha", cfg.apfl_alpha), device=ws.device, requires_grad=adaptive)
        loss_fn = self.task_loss(client, message.round)
        optimizer = self.kept_optimizer([*w_model.parameters(), *v_model.parameters()], state, "optimizer",
                                        message.round)
        grad_clip = cfg.grad_clip if cfg.grad_clip is not None else self.default_grad_clip
        w_model.train()
        v_model.train()
        split = client.train
        totals, steps = torch.zeros(2, dtype=torch.float64), 0
        for _, index in training_batches(split, cfg.batch_size, cfg.epochs, generator, balanced=cfg.instance_sampling):
            images = split.images[index].to(ws.device, non_blocking=True)
            labels = split.labels[index].to(ws.device, non_blocking=True)
            losses = apfl_step(w_model, v_model, alpha, ws.augment(images, generator), labels, loss_fn, optimizer,
                               alpha_lr=round_lr(cfg, message.round) if adaptive else None, grad_clip=grad_clip)
            totals += torch.stack(losses).double().cpu()
            steps += 1
        if cfg.persist_optimizer_state:
            state["optimizer"] = optimizer.state_dict()
        trained = to_cpu(w_model.state_dict())
        if cfg.bn_policy == "local":
            state["bn-statistics"] = {k: trained[k] for k in batchnorm_buffer_keys(w_model)}
        state["personal"] = to_cpu(v_model.state_dict())
        state["alpha"] = float(alpha.detach())
        state["mixed"] = self.mixture(state["personal"], trained, state["alpha"])
        mean_w, mean_mixed = (totals / max(steps, 1)).tolist()
        metrics = {"num-examples": float(examples_seen(len(split), cfg.batch_size)), "train-loss": mean_w,
                   "personal-train-loss": mean_mixed, "alpha": state["alpha"], "steps": float(steps)}
        return ClientReply(client_id=client.client_id, arrays=trained, metrics=metrics)

    def mixture(self, personal: Arrays, shared: Arrays, alpha: float) -> Arrays:
        """vbar as a state dict: alpha v + (1 - alpha) w for every parameter, v's buffers (its
        BatchNorm statistics are vbar's)."""
        parameters = set(self.parameter_names)
        return {k: alpha * v + (1 - alpha) * shared[k] if k in parameters else v for k, v in personal.items()}

    def local_model_state(self, reply: ClientReply, state: dict[str, Any]) -> Arrays | None:
        return state.get("mixed")
