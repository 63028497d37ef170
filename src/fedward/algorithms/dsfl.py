"""DS-FL (Itahara et al., IEEE TMC 2021, "Distillation-Based Semi-Supervised Federated Learning for
Communication-Efficient Collaborative Training with Non-IID Private Data"), with each client's own
local model as its deliverable (the client steps are in ``publickd``).

MH-pFLID's baseline table has a row "DS-pFL" and cites it; that definition was not available to
us, so fedward's reading is DS-FL with personalised (heterogeneous) local models.

A round: each client k trains on its private data (``--epochs``) and sends its local model's
softmax outputs p_k(x) = softmax(z_k(x)) on the whole public set (unlabelled: labels are never
used), (P, K). The server aggregates them by entropy reduction averaging (ERA):

    q(x) = softmax( (1/m) sum_k p_k(x) / T ),   T = ``--dsfl_temperature``

(the mean of the m replies' probabilities, sharpened). Next round each client first distils
toward q on the public set for ``--dsfl_distill_epochs``, with  mean_x KL(q(x) || softmax(z(x))),
which has the gradient of the soft-label cross-entropy  -sum_j q_j log softmax(z)_j. Round 1 has
no q yet: private training and the upload only.

T = 0.1 is the ERA temperature of AIJack's and BlazeFL's DS-FL implementations, which we take to
be the paper's (its text was not checked for it). With probabilities in [0, 1], only a low T
sharpens: at T = 1 the mean is flattened. Departures: no server model (DS-FL also distils a
global model on the open data; here each client's local model is what is scored); the whole
public set every round (BlazeFL draws a subset of the open set each round); Adam at
``--local_lr`` with public batches of ``--public_batch_size``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from fedward.algorithms.base import Arrays, ClientReply, ServerMessage, Workspace
from fedward.algorithms.publickd import PublicKDMethod, PublicKDOptions, soft_target_kl, stacked, uniform_weights
from fedward.algorithms.registry import register_method
from fedward.data.types import ClientData
from fedward.options import NON_NEGATIVE, POSITIVE, option


def entropy_reduction_average(probabilities: torch.Tensor, temperature: float) -> torch.Tensor:
    """ERA: softmax(mean over clients / T) of (m, P, K) probabilities, (P, K)."""
    return F.softmax(probabilities.mean(0) / temperature, dim=-1)


@dataclass
class DSFLOptions(PublicKDOptions):
    dsfl_temperature: float = option(0.1, "ERA temperature T: the soft labels are softmax(mean of the clients' "
                                          "probabilities / T) (DS-FL: 0.1)", check=POSITIVE)
    dsfl_distill_epochs: int = option(1, "epochs toward the soft labels on the public set, each round",
                                      check=NON_NEGATIVE)


@register_method
class DSFL(PublicKDMethod):
    name = "dsfl"
    summary = "DS-FL (Itahara et al. 2021; MH-pFLID's DS-pFL): sharpened mean of softmax outputs on public data"
    Options = DSFLOptions
    reply_key = "public-probabilities"

    def aggregate(self, round_index: int, global_state: Arrays, replies: list[ClientReply],
                  server_state: dict[str, Any]) -> tuple[Arrays, dict[str, Any]]:
        soft_labels = entropy_reduction_average(stacked(replies, self.reply_key), self.cfg.dsfl_temperature)
        return {"soft-labels": soft_labels}, {"weights": uniform_weights(replies)}

    def learn_from_server(self, ws: Workspace, client: ClientData, message: ServerMessage, state: dict[str, Any],
                          generator: torch.Generator, local) -> dict[str, float]:
        if "soft-labels" not in message.arrays:  # round 1: nothing aggregated yet
            return {"distill-steps": 0.0, "distill-loss": 0.0}
        soft_labels = message.arrays["soft-labels"].to(ws.device)
        return self.fit_public(ws, local, state, "distill", None,
                               lambda logits, positions: soft_target_kl(logits, soft_labels[positions]),
                               epochs=self.cfg.dsfl_distill_epochs, generator=generator)

    def upload(self, ws: Workspace, local, message: ServerMessage) -> Arrays:
        return {self.reply_key: F.softmax(self.public_logits(ws, local), dim=1)}
