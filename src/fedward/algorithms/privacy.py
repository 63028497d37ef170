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

Per-sample DP-SGD (Abadi et al. 2016; ``--dp_sgd_clip``), with Opacus: each image's gradient is
clipped to L2 norm at most C and Gaussian noise N(0, (σ C)²) is added to their sum before every
optimizer step of a client's local training, so what the client sends is private with respect to
each of its images. Opacus cannot clip a per-image gradient through BatchNorm (it mixes the
batch's images), so the model's BatchNorm layers become GroupNorm (Opacus's
``ModuleValidator.fix``) for every client and the server alike. Each client accounts for its own
steps (RDP at sampling rate B / n over every step it has taken) and sends its ε as a metric.
fedward's batches are a shuffled partition of fixed size B, where the accountant assumes each
image is drawn independently with probability B / n (Poisson sampling): the usual approximation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Sequence

import torch

from fedward.algorithms.aggregate import weighted_average
from fedward.errors import ConfigError
from fedward.options import NON_NEGATIVE, OPEN_UNIT, POSITIVE, option
from fedward.secure_aggregation import QUANTIZATION_RANGE
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


@dataclass
class PerSampleDP:
    dp_sgd_clip: float | None = option(None, "per-sample DP-SGD (Opacus): the L2 bound on each training image's "
                                             "gradient in every local step; the model's BatchNorm layers become "
                                             "GroupNorm", check=(lambda v: v is None or v > 0, "positive"))
    dp_sgd_noise_multiplier: float = option(0.0, "per-sample DP-SGD: Gaussian noise of std sigma times --dp_sgd_clip "
                                                 "added to each step's sum of clipped gradients (needs --dp_sgd_clip); "
                                                 "0: clipping only, no privacy guarantee", check=NON_NEGATIVE)


@dataclass
class SecureAggregation:
    secure_aggregation: bool = option(False, "SecAgg+ (Flower's secure aggregation): each client's model update is "
                                             "quantised and masked, so the server learns only the weighted sum of the "
                                             "updates (and the replies' scalar metrics); the simulation computes the "
                                             "same sum (fedward.secure_aggregation)")
    secagg_clipping_range: float = option(8.0, "SecAgg+: each weighted update entry is clipped to +- this before it is "
                                               "quantised to 2^22 levels (Flower's clipping_range)", check=POSITIVE)
    secagg_shares: float = option(1.0, "SecAgg+: the fraction of a round's clients each client shares its keys with "
                                       "(Flower's num_shares)", check=OPEN_UNIT)
    secagg_threshold: float = option(0.5, "SecAgg+: the fraction of those shares needed to remove a dropped client's "
                                          "masks (Flower's reconstruction_threshold): higher is more private and less "
                                          "tolerant of dropouts", check=OPEN_UNIT)


def check_secure_config(cfg, method: str, reason: str | None) -> None:
    """``reason``: why ``method`` cannot aggregate securely (None: it can)."""
    if not cfg.secure_aggregation:
        for f in fields(SecureAggregation):
            if f.name != "secure_aggregation" and getattr(cfg, f.name) != f.default:
                raise ConfigError(f"--{f.name} applies with --secure_aggregation true only")
        return
    if reason is not None:
        raise ConfigError(f"--secure_aggregation does not apply to --method {method}: {reason}")
    if cfg.clients_per_round == 1:
        raise ConfigError("--secure_aggregation with --clients_per_round 1: a sum of one update is that update; "
                          "SecAgg+ needs at least 2 clients a round")
    import importlib.util

    if importlib.util.find_spec("flwr") is None:  # its SecAgg+ arithmetic serves both engines
        raise ConfigError("--secure_aggregation uses Flower's SecAgg+: install it with "
                          "`pip install 'fedward[flower]'`")


def check_dp_config(cfg, method: str, reason: str | None, per_sample_reason: str | None) -> None:
    """``reason``: why ``method`` cannot run under client-level DP; ``per_sample_reason``: why not
    under per-sample DP-SGD (None: it can)."""
    if cfg.dp_noise_multiplier > 0 and cfg.dp_clip is None:
        raise ConfigError("--dp_noise_multiplier needs --dp_clip: the noise is calibrated to the clipping bound")
    if cfg.dp_clip is not None and reason is not None:
        raise ConfigError(f"--dp_clip does not apply to --method {method}: {reason}")
    if cfg.dp_sgd_noise_multiplier > 0 and cfg.dp_sgd_clip is None:
        raise ConfigError("--dp_sgd_noise_multiplier needs --dp_sgd_clip: the noise is calibrated to the clipping bound")
    if cfg.dp_sgd_clip is not None:
        if per_sample_reason is not None:
            raise ConfigError(f"--dp_sgd_clip does not apply to --method {method}: {per_sample_reason}")
        if cfg.grad_clip is not None:
            raise ConfigError("--grad_clip with --dp_sgd_clip: DP-SGD clips each image's gradient and replaces the "
                              "batch gradient, so a clip of the batch gradient would not act; give one of them")
        if cfg.dp_clip is not None:
            raise ConfigError("--dp_clip with --dp_sgd_clip: choose client-level or per-sample differential privacy")
        if cfg.instance_sampling:
            raise ConfigError("--instance_sampling with --dp_sgd_clip: class-balanced draws with replacement are not "
                              "the sampling the privacy accountant assumes")
        if cfg.has("pre_trained_tv") and cfg.pre_trained_tv is not None:
            raise ConfigError("--pre_trained_tv with --dp_sgd_clip: torchvision's weights go with BatchNorm layers, "
                              "which DP-SGD's model replaces by GroupNorm")
    if cfg.dp_delta != 1e-5 and cfg.dp_clip is None and cfg.dp_sgd_clip is None:
        raise ConfigError("--dp_delta applies with --dp_clip or --dp_sgd_clip only")


def per_sample_model(model: torch.nn.Module) -> torch.nn.Module:
    """The model as per-sample DP-SGD trains it: Opacus's fixes (BatchNorm -> GroupNorm) and no
    in-place ReLU (Opacus's backward hooks cannot see through one)."""
    from opacus.validators import ModuleValidator

    model = ModuleValidator.fix(model)
    for module in model.modules():
        if isinstance(module, torch.nn.ReLU):
            module.inplace = False
    return model


class PerSampleStep:
    """One client's local training under per-sample DP-SGD: ``model`` records per-image gradients
    (Opacus's ``GradSampleModule``) and ``optimizer`` clips and noises them (``DPOptimizer``, noise
    from ``generator``) while the block runs; the hooks are removed afterwards, so the workspace's
    model is a plain module again."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, *, clip: float,
                 noise_multiplier: float, batch_size: int, generator: torch.Generator) -> None:
        import warnings

        from opacus import GradSampleModule
        from opacus.optimizers import DPOptimizer

        # The first layer's input needs no gradient; Opacus's hooks work as they should there.
        warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed with "
                                "respect to module outputs since no inputs require gradients")
        self.model = GradSampleModule(model)
        self.optimizer = DPOptimizer(optimizer, noise_multiplier=noise_multiplier, max_grad_norm=clip,
                                     expected_batch_size=batch_size, generator=generator)

    def close(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.model._close()


def per_sample_epsilon(noise_multiplier: float, batch_size: int, train_size: int, steps: int,
                       delta: float) -> float:
    """ε after ``steps`` DP-SGD steps of batch ``batch_size`` over ``train_size`` images."""
    return epsilon(noise_multiplier, min(1.0, batch_size / train_size), steps, delta)


def per_sample_summary(settings: dict, rows: list[dict]) -> dict | None:
    """What results.json and the report say about per-sample DP-SGD (None without it): the
    parameters and each client's last reported ε (from the aggregation rows); ε None without noise."""
    if settings.get("dp_sgd_clip") is None:
        return None
    latest: dict[int, float] = {}
    for row in rows:
        if row.get("scope") == "aggregation" and "dp_sgd_epsilon" in row:
            latest.update(zip(row["clients"], row["dp_sgd_epsilon"]))
    sigma = float(settings.get("dp_sgd_noise_multiplier", 0.0))
    finite = sigma > 0 and bool(latest)
    return {"mechanism": "per-sample DP-SGD (Opacus): each image's gradient clipped, Gaussian noise on their sum",
            "clip": float(settings["dp_sgd_clip"]), "noise_multiplier": sigma,
            "delta": float(settings.get("dp_delta", 1e-5)),
            "epsilon_per_client": {k: (v if finite else None) for k, v in sorted(latest.items())},
            "epsilon": max(latest.values()) if finite else None,
            "accountant": "RDP (Opacus), per client over its own steps, Poisson-sampling approximation"}


def secure_summary(config: dict, rows: list[dict]) -> dict | None:
    """``results.json["secure_aggregation"]``: the SecAgg+ settings of a run and the weighted update
    entries its clipping range cut, summed over rounds and clients (None without it)."""
    if not config.get("secure_aggregation"):
        return None
    clipped = sum(sum(row.get("secure_clipped") or []) for row in rows if row.get("scope") == "aggregation")
    return {"protocol": "SecAgg+", "clipping_range": config["secagg_clipping_range"],
            "quantization_levels": QUANTIZATION_RANGE, "shares": config["secagg_shares"],
            "threshold": config["secagg_threshold"], "clipped_entries": int(clipped)}


def describe_secure(summary: dict) -> str:
    return (f"secure aggregation (Flower's {summary['protocol']}): the server saw only the weighted sum of the clients' "
            f"updates, quantised to {summary['quantization_levels']} levels in +-{summary['clipping_range']:g} "
            f"({summary['clipped_entries']} entries clipped); metrics and integer buffers in the clear")


def describe_per_sample(summary: dict) -> str:
    eps = ("no guarantee (no noise)" if summary["epsilon"] is None
           else f"epsilon {summary['epsilon']:.3g} (the largest over clients)")
    return (f"per-sample DP-SGD: clip {summary['clip']:g}, noise multiplier {summary['noise_multiplier']:g}: "
            f"{eps} at delta {summary['delta']:g}, per image of each hospital")


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
    """The equal-weight average of the clipped states with the round's Gaussian noise, and the weights used."""
    weights = [1.0 / len(states)] * len(states)
    return add_round_noise(weighted_average(states, weights), bound=bound, noise_multiplier=noise_multiplier,
                           num_clients=len(states), seed=seed, round_index=round_index), weights


def add_round_noise(average: Arrays, *, bound: float, noise_multiplier: float, num_clients: int, seed: int,
                    round_index: int) -> Arrays:
    """The equal-weight average of ``num_clients`` clipped states (however it was summed: in the clear
    or by secure aggregation) with the round's Gaussian noise, drawn from its own seeded stream,
    entry by entry in the state's order."""
    if noise_multiplier > 0:
        std = noise_std(noise_multiplier, bound, num_clients)
        generator = torch_generator(seed, "dp-noise", round_index)
        for key, value in average.items():
            if value.is_floating_point():
                noise = torch.randn(value.shape, generator=generator, dtype=torch.float32) * std
                average[key] = (value.float() + noise).to(value.dtype)
    return average


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
