"""LG-FedAvg (Liang et al. 2020): local representations, a global head.

The opposite split of FedRep: the body (every state-dict key not starting with ``fc.``, BatchNorm
statistics included) is client i's own local representation, the head (the final classifier
``fc``) is global. Each round client i loads the global head h^t onto its own body (in its first
round: the seeded initial body, the same for every client), trains the whole model for
``--epochs`` epochs, keeps its body and sends its head; the server sets
h^{t+1} = sum_i w_i h_i with FedAvg's weights w_i = n_i / sum_j n_j (n_i = floor(N_i/B) B). The
global state dict keeps the initial body, so it stays a whole model; no body ever leaves its
client. Client i's deliverable is its body with the head it has just trained.

No options of its own: local training is FedAvg's (``--epochs``, ``--lr`` ...). Departures from the
paper: the global part is ``fc`` alone (fedward's models have one classifier layer; the paper's
global model may be several top layers), and there is no FedAvg warm start: local bodies start
from the seeded initial model. Departure from PFLlib, which evaluates the client's body with the
newly averaged head: the deliverable is the body with the head the client has just trained.
"""

from __future__ import annotations

from fedward.algorithms.base import LocalTraining
from fedward.algorithms.fedrep import SplitModel
from fedward.algorithms.registry import register_method


@register_method
class LGFedAvg(SplitModel):
    name = "lgfedavg"
    summary = "LG-FedAvg (Liang et al. 2020): each client's body stays with it, the head fc is averaged"
    Options = LocalTraining
    shares = "head"
