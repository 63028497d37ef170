"""FedMD (Li & Wang 2019, "FedMD: Heterogenous Federated Learning via Model Distillation"), with
each client's own local model as its deliverable (the client steps are in ``publickd``).

- Transfer learning, before a client's first communication round: ``--fedmd_public_epochs`` of
  cross-entropy on the labelled public set D_0, then its private data (that round's ``--epochs``).
- Communicate: in round t the server draws a fresh seeded subset d_t of ``--fedmd_public_subset``
  public images (at most ``--public_size``) and sends its indices; each client k sends its class
  scores f_k(x) on d_t: the raw logits of its local model, (|d_t|, K).
- Aggregate: the consensus f~(x) = (1/m) sum_k f_k(x), the plain mean over the m replies.
- Digest (next round, on d_t): ``--fedmd_digest_epochs`` of  mean_x,j |f_k(x)_j - f~(x)_j|,  the L1
  loss (mean absolute error) between the logits and the consensus.
- Revisit: ``--epochs`` on the private data; then the client sends its logits on d_{t+1}.

Sources: the paper (arXiv 1910.03581) names the steps and the averaged consensus; the loss, the
logits and the schedule are those of the authors' code (``diogenes0319/FedMD_clean``: the softmax
removed, Keras ``mean_absolute_error``, a new ``N_alignment`` 5000 subset of the public set each
round, 1 digest epoch at batch 256, 4 private epochs at batch 5 for CIFAR, Adam 1e-3). That the
paper's digest loss is this L1 is our reading of that code, which is the authors' as far as we
know; the paper's text was not checked for it.

Departures: the public subset is a uniform seeded draw (FedMD_clean's is stratified by label);
transfer learning is ``--fedmd_public_epochs`` epochs (FedMD_clean: up to 20 on the public set and
25 on the private set, early-stopped on the test set, which fedward never looks at) followed by
the first round's ``--epochs``; Adam at ``--local_lr`` for every stage, the digest and the private
stage each keeping its own optimizer across rounds (as FedMD_clean's two compiled Keras models
do); public batches of ``--public_batch_size``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from fedward.algorithms.base import Arrays, ClientReply, ServerMessage, Workspace
from fedward.algorithms.publickd import PublicKDMethod, PublicKDOptions, stacked, uniform_weights
from fedward.algorithms.registry import register_method
from fedward.data.types import ClientData
from fedward.options import NON_NEGATIVE, at_least, option
from fedward.seeding import torch_generator


@dataclass
class FedMDOptions(PublicKDOptions):
    fedmd_public_epochs: int = option(1, "transfer learning: epochs of cross-entropy on the labelled public set before "
                                         "a client's first private training (FedMD_clean: up to 20, early-stopped)",
                                      check=NON_NEGATIVE)
    fedmd_public_subset: int = option(500, "public images each round, a fresh seeded subset (at most --public_size; "
                                           "FedMD: 5000 of CIFAR-10's 50000)", check=at_least(1))
    fedmd_digest_epochs: int = option(1, "digest: epochs of L1 between the logits and the consensus on the previous "
                                         "round's subset (FedMD_clean: 1)", check=NON_NEGATIVE)


@register_method
class FedMD(PublicKDMethod):
    name = "fedmd"
    summary = "FedMD (Li & Wang 2019): transfer learning, then digest the mean of the clients' logits on public data"
    Options = FedMDOptions
    needs_labels = True
    reply_key = "public-logits"

    def reply_rows(self) -> int:
        return min(self.cfg.fedmd_public_subset, self.cfg.public_size)

    def round_subset(self, round_index: int) -> torch.Tensor:
        """d_t: the public images of round ``round_index``, a seeded draw without replacement."""
        generator = torch_generator(self.cfg.seed, "fedmd-subset", round_index)
        return torch.randperm(self.cfg.public_size, generator=generator)[:self.reply_rows()]

    # -- server -------------------------------------------------------------------------------
    def server_message(self, round_index: int, global_state: Arrays, server_state: dict[str, Any]) -> ServerMessage:
        # The last consensus and its subset (from round 2), and this round's subset.
        return ServerMessage(round=round_index, arrays={**global_state, "public-index": self.round_subset(round_index)},
                             config={"total-rounds": self.cfg.comm_round})

    def aggregate(self, round_index: int, global_state: Arrays, replies: list[ClientReply],
                  server_state: dict[str, Any]) -> tuple[Arrays, dict[str, Any]]:
        aggregate = {"consensus": stacked(replies, self.reply_key).mean(0),
                     "consensus-index": self.round_subset(round_index)}
        return aggregate, {"weights": uniform_weights(replies)}

    # -- client -------------------------------------------------------------------------------
    def learn_from_server(self, ws: Workspace, client: ClientData, message: ServerMessage, state: dict[str, Any],
                          generator: torch.Generator, local) -> dict[str, float]:
        metrics = {"transfer-steps": 0.0, "transfer-loss": 0.0, "digest-steps": 0.0, "digest-loss": 0.0}
        if "local" not in state:  # the client's first round: transfer learning
            labels = self.public.labels.to(ws.device)
            metrics.update(self.fit_public(ws, local, state, "transfer", None,
                                           lambda logits, positions: F.cross_entropy(logits.float(), labels[positions]),
                                           epochs=self.cfg.fedmd_public_epochs, generator=generator, keep=False))
        if "consensus" in message.arrays:
            consensus = message.arrays["consensus"].to(ws.device)
            metrics.update(self.fit_public(ws, local, state, "digest", message.arrays["consensus-index"],
                                           lambda logits, positions: F.l1_loss(logits.float(), consensus[positions]),
                                           epochs=self.cfg.fedmd_digest_epochs, generator=generator))
        return metrics

    def upload(self, ws: Workspace, local, message: ServerMessage) -> Arrays:
        return {self.reply_key: self.public_logits(ws, local, message.arrays["public-index"])}
