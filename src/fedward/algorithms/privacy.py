"""Client-level differential privacy for the FedAvg family (DP-FedAvg, McMahan et al. 2018, with
fixed clipping on the client as Flower's ``DifferentialPrivacyClientSideFixedClipping``).

- **Client**: its model update Δ_k = w_k - w (every floating-point entry of the state dict it
  sends, BatchNorm statistics included: they are computed from its images too) is scaled to
  L2 norm at most C: Δ_k · min(1, C / ||Δ_k||). Integer entries (BatchNorm's batch counter) are
  sent as trained.
- **Server**: the m clipped updates are averaged with equal weights (so that one client moves the
  average by at most C/m, whatever its size) and Gaussian noise N(0, (σ C / m)²) is added to every
  floating-point entry: the sensitivity-calibrated Gaussian mechanism. A server optimizer
  (FedAvgM, FedAdam, ...) then steps on the noisy average: post-processing, no further cost.
- **Accounting**: ε for δ from Opacus's RDP accountant for the subsampled Gaussian mechanism, with
  sampling rate q = m / N per round over the run's rounds. fedward draws exactly m clients per
  round (sampling without replacement), where the accountant assumes each client is taken
  independently with probability q: the usual approximation; with every client every round
  (q = 1) it is exact.

The guarantee is per hospital (adding or removing one client's whole data set), not per image.
Both engines run this code: the simulation and the Flower nodes and server.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from fedward.algorithms.aggregate import weighted_average
from fedward.errors import ConfigError
from fedward.options import NON_NEGATIVE, option
from fedward.seeding import torch_generator

Arrays = dict[str, torch.Tensor]


@dataclass
class ClientLevelDP:
    dp_clip: float | None = option(None, "differential privacy: the L2 bound C on each client's model update (clipped "
                                         "on the client); the server then averages the updates with equal weights",
                                   check=(lambda v: v is None or v > 0, "positive"))
    dp_noise_multiplier: float = option(0.0, "differential privacy: Gaussian noise of std sigma C / m added to the "
                                             "average of the m clipped updates (needs --dp_clip); 0: clipping only, "
                                             "no privacy guarantee", check=NON_NEGATIVE)
    dp_delta: float = option(1e-5, "differential privacy: the delta of the (epsilon, delta) the run reports",
                             check=(lambda v: 0 < v < 1, "in (0, 1)"))


def check_dp_config(cfg, method: str, reason: str | None) -> None:
    """``reason``: why ``method`` cannot run under DP (None: it can)."""
    if cfg.dp_noise_multiplier > 0 and cfg.dp_clip is None:
        raise ConfigError("--dp_noise_multiplier needs --dp_clip: the noise is calibrated to the clipping bound")
    if cfg.dp_clip is not None and reason is not None:
        raise ConfigError(f"--dp_clip does not apply to --method {method}: {reason}")
    if cfg.dp_delta != 1e-5 and cfg.dp_clip is None:
        raise ConfigError("--dp_delta applies with --dp_clip and --dp_noise_multiplier only")


def update_norm(trained: Arrays, start: Arrays) -> float:
    """||w_k - w|| over the floating-point entries, accumulated in float64."""
    total = 0.0
    for key, value in trained.items():
        if value.is_floating_point():
            total += float((value.double() - start[key].double()).pow(2).sum())
    return math.sqrt(total)


def clip_update(trained: Arrays, start: Arrays, bound: float) -> Arrays:
    """The trained state with its update from ``start`` scaled to L2 norm at most ``bound``."""
    norm = update_norm(trained, start)
    factor = min(1.0, bound / norm) if norm > 0 else 1.0
    if factor == 1.0:
        return dict(trained)
    return {key: ((start[key].float() + (value.float() - start[key].float()) * factor).to(value.dtype)
                  if value.is_floating_point() else value) for key, value in trained.items()}


def noise_std(noise_multiplier: float, bound: float, num_clients: int) -> float:
    """σ C / m: the Gaussian mechanism's std for the average of m updates of norm at most C."""
    return noise_multiplier * bound / num_clients


def private_average(states: Sequence[Arrays], *, bound: float, noise_multiplier: float, seed: int,
                    round_index: int) -> tuple[Arrays, list[float]]:
    """The equal-weight average of the clipped states with the round's Gaussian noise (drawn from
    its own seeded stream, entry by entry in the state's order), and the weights used."""
    weights = [1.0 / len(states)] * len(states)
    average = weighted_average(states, weights)
    if noise_multiplier > 0:
        std = noise_std(noise_multiplier, bound, len(states))
        generator = torch_generator(seed, "dp-noise", round_index)
        for key, value in average.items():
            if value.is_floating_point():
                noise = torch.randn(value.shape, generator=generator, dtype=torch.float32) * std
                average[key] = (value.float() + noise).to(value.dtype)
    return average, weights


def epsilon(noise_multiplier: float, sample_rate: float, rounds: int, delta: float) -> float:
    """ε of ``rounds`` steps of the subsampled Gaussian mechanism (Opacus's RDP accountant);
    infinite without noise."""
    if noise_multiplier <= 0:
        return math.inf
    try:
        from opacus.accountants import RDPAccountant
    except ImportError:
        raise ConfigError("--dp_noise_multiplier reports epsilon with Opacus's privacy accountant: "
                          "pip install opacus (or pip install 'fedward[dp]')") from None
    accountant = RDPAccountant()
    accountant.history.append((noise_multiplier, sample_rate, rounds))
    return float(accountant.get_epsilon(delta))


def privacy_summary(settings: dict, num_clients: int) -> dict | None:
    """What results.json and the report say about a run's privacy (None without --dp_clip): the
    mechanism's parameters and its (ε, δ); ε is None (no guarantee) without noise."""
    from fedward.algorithms.base import participants

    if settings.get("dp_clip") is None or num_clients < 1:
        return None
    clip, sigma = float(settings["dp_clip"]), float(settings.get("dp_noise_multiplier", 0.0))
    delta, rounds = float(settings.get("dp_delta", 1e-5)), int(settings["comm_round"])
    per_round = participants(float(settings.get("clients_per_round", 0) or 0), num_clients)
    rate = per_round / num_clients
    eps = epsilon(sigma, rate, rounds, delta)
    return {"mechanism": "client-level DP-FedAvg: updates clipped on the client, equal-weight average, Gaussian noise",
            "clip": clip, "noise_multiplier": sigma, "noise_std": noise_std(sigma, clip, per_round),
            "clients_per_round": per_round, "sample_rate": rate, "rounds": rounds, "delta": delta,
            "epsilon": None if math.isinf(eps) else eps, "accountant": "RDP (Opacus), Poisson-sampling approximation"}


def describe(summary: dict) -> str:
    """One line for the log and the report."""
    eps = "no guarantee (no noise)" if summary["epsilon"] is None else f"epsilon {summary['epsilon']:.3g}"
    return (f"client-level DP: clip {summary['clip']:g}, noise multiplier {summary['noise_multiplier']:g} "
            f"(std {summary['noise_std']:.3g}), {summary['clients_per_round']} clients a round for "
            f"{summary['rounds']} rounds: {eps} at delta {summary['delta']:g}")
