"""KT-pFL (Zhang et al., NeurIPS 2021, "Parameterized Knowledge Transfer for Personalized Federated
Learning"), the client steps in ``publickd``.

The paper's objective (as we reconstruct it: see Sources), over the N local models w_n and the
knowledge-coefficient matrix C (N x N):

    min_{w, C}  sum_n L_n(w_n) + lambda sum_n KL( t_n(x) || s_n(x) ) + rho ||C - 1/N||^2,
    s_m(x) = softmax(z_m(x) / tau),   t_n(x) = sum_m c_nm s_m(x),

L_n the private loss of client n, x the public images, t_n client n's personalised soft target;
w and C are updated alternately by gradient steps. A round here:

- client n: distils toward t_n for ``--ktpfl_distill_epochs`` (mean_x KL(t_n(x) || s_n(x)) on the
  public set; in round 1 there is no t_n yet), trains on its private data (``--epochs``), sends
  s_n on the whole public set, (P, K);
- server: one projected gradient step on C (server state, checkpointed; C^0 = 1/N everywhere), with
  the mean over the P public images in place of the sum over x:

      dJ/dc_nm = (1/P) sum_x sum_k s_m(x)_k (log t_n(x)_k - log s_n(x)_k + 1) + 2 rho (c_nm - 1/N)
      C <- each row projected onto the simplex {c >= 0, sum_m c_nm = 1} (C - eta dJ/dC)

  (eta = ``--ktpfl_coef_lr``), then sends t_n = sum_m c_nm s_m with the new C.

The server keeps every client's target, (N, P, K), as its global state (checkpointed) and sends
client n only its own t_n (``client_message``), as the paper's protocol.

Sources: the abstract (personalised soft predictions as a linear combination of all clients'
through a knowledge-coefficient matrix, trained with the models by alternating gradient steps);
the authors' code (``cugzj/KT-pFL``) for the uniform start, the penalty toward 1/N and the
defaults tau = 10 (``Temp``), rho = 0.7 (``penalty_ratio``), one distillation epoch
(``N_logits_matching_round``); the KL in the C step as the paper's objective has it, following a
re-implementation (FedTED's) that says so. The paper's method section was not available to us
verbatim, so the objective above is our reconstruction of it.

Departures and choices of ours: lambda = 1, since the client's distillation is a stage of its own
under Adam (which does not see a constant factor) and in the C step only rho / lambda matters, so
``--ktpfl_rho`` is the paper's rho / lambda; the rows of C are projected onto the simplex after each
step, so every t_n is a distribution (an unconstrained step can make it negative; the
authors' code instead takes an MSE step, rescales its learning rate adaptively and passes each row
through softmax(5 c)); eta = 0.1 is ours; the mean over the public images in place of their sum
(eta and rho then do not depend on P); the whole public set every round (the code draws 5000
public images a round); no tau^2 on the KL (as the code); Adam at ``--local_lr`` and public batches
of ``--public_batch_size`` (the code: SGD 0.02, batch 256). A round needs every client's reply:
each target mixes all of them. At tau = 10 the soft predictions are close to uniform and C moves
slowly from 1/N (a short run on the built-in data: 2% after 8 rounds; 22% at tau = 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from fedward.algorithms.base import Arrays, ClientReply, ServerMessage, Workspace
from fedward.algorithms.publickd import PublicKDMethod, PublicKDOptions, soft_target_kl, stacked
from fedward.algorithms.registry import register_method
from fedward.data.types import ClientData
from fedward.errors import FedwardError
from fedward.options import NON_NEGATIVE, POSITIVE, option

COEFFICIENTS = "knowledge-coefficients"
# A soft prediction that underflowed to 0 would make a log, and so the step, infinite.
SMALLEST_PROBABILITY = 1e-12


def project_rows_onto_simplex(matrix: torch.Tensor) -> torch.Tensor:
    """The Euclidean projection of each row onto {c >= 0, sum c = 1} (Duchi et al. 2008): subtract
    the one threshold theta that leaves a row summing to 1 once negatives are cut to 0."""
    ordered = matrix.sort(dim=1, descending=True).values
    excess = ordered.cumsum(dim=1) - 1
    counts = torch.arange(1, matrix.shape[1] + 1, dtype=matrix.dtype, device=matrix.device)
    kept = (ordered - excess / counts > 0).sum(dim=1, keepdim=True)  # a prefix of the sorted row
    theta = excess.gather(1, kept - 1) / kept.to(matrix.dtype)
    return (matrix - theta).clamp(min=0)


def personalised_targets(coefficients: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
    """t_n = sum_m c_nm s_m: (N, N) coefficients and (N, P, K) soft predictions give (N, P, K)."""
    return torch.einsum("nm,mpk->npk", coefficients, soft)


def coefficient_step(coefficients: torch.Tensor, soft: torch.Tensor, rho: float, lr: float) -> torch.Tensor:
    """One projected gradient step on C (module docstring), in float64."""
    coefficients, soft = coefficients.double(), soft.double()
    targets = personalised_targets(coefficients, soft)
    log_ratio = targets.clamp_min(SMALLEST_PROBABILITY).log() - soft.clamp_min(SMALLEST_PROBABILITY).log()
    gradient = (torch.einsum("mpk,npk->nm", soft, log_ratio + 1) / soft.shape[1]
                + 2 * rho * (coefficients - 1.0 / coefficients.shape[0]))
    return project_rows_onto_simplex(coefficients - lr * gradient)


@dataclass
class KTpFLOptions(PublicKDOptions):
    ktpfl_temperature: float = option(10.0, "temperature tau of the soft predictions softmax(logits / tau) (KT-pFL "
                                            "code: 10)", check=POSITIVE)
    ktpfl_rho: float = option(0.7, "rho: weight of ||C - 1/N||^2 in the coefficient step (KT-pFL code's penalty_ratio: "
                                   "0.7)", check=NON_NEGATIVE)
    ktpfl_coef_lr: float = option(0.1, "eta: learning rate of the one coefficient step a round (ours; the KT-pFL code "
                                       "rescales its step adaptively)", check=POSITIVE)
    ktpfl_distill_epochs: int = option(1, "epochs toward the personalised target on the public set, each round (KT-pFL "
                                          "code: 1)", check=NON_NEGATIVE)


@register_method
class KTpFL(PublicKDMethod):
    name = "ktpfl"
    summary = "KT-pFL (Zhang et al. 2021): personalised soft targets on public data mixed by learnt coefficients"
    partial_participation = False
    Options = KTpFLOptions
    reply_key = "public-soft-predictions"

    # -- server -------------------------------------------------------------------------------
    def initial_server_state(self, global_state: Arrays) -> dict[str, Any]:
        n = self.num_clients
        return {COEFFICIENTS: torch.full((n, n), 1.0 / n, dtype=torch.float64)}

    def aggregate(self, round_index: int, global_state: Arrays, replies: list[ClientReply],
                  server_state: dict[str, Any]) -> tuple[Arrays, dict[str, Any]]:
        ids = [reply.client_id for reply in replies]
        if ids != list(range(self.num_clients)):
            raise FedwardError(f"round {round_index}: ktpfl mixes every client's soft predictions into each "
                               f"target, but only clients {ids} of {self.num_clients} replied; resume once every "
                               f"client is back")
        soft = stacked(replies, self.reply_key)
        coefficients = coefficient_step(server_state[COEFFICIENTS], soft, self.cfg.ktpfl_rho, self.cfg.ktpfl_coef_lr)
        server_state[COEFFICIENTS] = coefficients
        targets = personalised_targets(coefficients, soft.double()).float()
        # Each client's share of all targets (C's column means: they sum to 1), and C itself.
        return {"targets": targets}, {"weights": coefficients.mean(0).tolist(),
                                      "knowledge_coefficients": coefficients.tolist()}

    def client_message(self, message: ServerMessage, client_id: int) -> ServerMessage:
        if "targets" not in message.arrays:
            return message
        return ServerMessage(message.round, {"targets": message.arrays["targets"][client_id]}, message.config)

    # -- client -------------------------------------------------------------------------------
    def learn_from_server(self, ws: Workspace, client: ClientData, message: ServerMessage, state: dict[str, Any],
                          generator: torch.Generator, local) -> dict[str, float]:
        if "targets" not in message.arrays:  # round 1: no soft predictions yet
            return {"distill-steps": 0.0, "distill-loss": 0.0}
        target = message.arrays["targets"].to(ws.device)
        tau = self.cfg.ktpfl_temperature
        return self.fit_public(ws, local, state, "distill", None,
                               lambda logits, positions: soft_target_kl(logits, target[positions], tau),
                               epochs=self.cfg.ktpfl_distill_epochs, generator=generator)

    def upload(self, ws: Workspace, local, message: ServerMessage) -> Arrays:
        return {self.reply_key: F.softmax(self.public_logits(ws, local) / self.cfg.ktpfl_temperature, dim=1)}
