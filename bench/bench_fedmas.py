"""Fed-MAS cost: a Fed-MAS round against a FedAvg round, and the prior's share, in the same run.

For the same clients, batches and model (the README results setting: ResNet-18, 32 px, batch 32):
- FedAvg round; Fed-MAS round with ``avg`` aggregation (prior forward on every training batch,
  projector and auxiliary head); Fed-MAS round with ``mas`` (plus the pre-pass that measures w_k);
- the prior's own forward on exactly the images it sees in those rounds (the same augmented
  batches), timed alone.
Target: Fed-MAS(avg) - FedAvg <= the prior's forward on the training batches (the heads are
small). Also: Fed-MAS(avg) with --cache_prior_features (features computed in the warm-up round),
Fed-MAS(mas) with --share_prior_forward (the first epoch reuses the pre-pass's prior features),
and the prior's forward in channels_last vs the default layout, at 32 and 224 px.
Rounds are timed without the checkpoint (bench_engine measures that). Medians of ``repeats``.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from fedward.algorithms.base import training_batches
from fedward.config import build_config
from fedward.engine.setup import configure_threads, initial_global_state, load_data
from fedward.engine.simulation import ClientTask, Simulation
from fedward.priors import load_prior
from fedward.seeding import torch_generator


def _round(sim: Simulation, global_state, states, round_index: int) -> float:
    start = time.perf_counter()
    message = sim.algorithm.server_message(round_index, global_state, {})
    results = [sim.run_client(ClientTask(round_index, k, message, states[k]), False) for k in range(len(sim.training_clients))]
    sim.algorithm.aggregate(round_index, global_state, [r.reply for r in results], {})
    for k, result in enumerate(results):
        states[k] = result.state
    return time.perf_counter() - start


def _prior_batches(sim: Simulation, round_index: int, prepass: bool) -> list[torch.Tensor]:
    """The augmented batches the prior sees in a Fed-MAS round (training, and the MAS pre-pass)."""
    cfg, batches = sim.cfg, []
    for k, client in enumerate(sim.training_clients):
        streams = [torch_generator(cfg.seed, "client-train", round_index, k)]
        if prepass:
            streams.append(torch_generator(cfg.seed, "mas-prepass", round_index, k))
        for generator in streams:
            for _, index in training_batches(client.train, cfg.batch_size, cfg.epochs, generator):
                batches.append(sim.workspace.augment(client.train.images[index], generator))
    return batches


def _forward_time(prior, batches: list[torch.Tensor], channels_last: bool | None = None) -> float:
    """Seconds for the prior's forward on ``batches``; ``channels_last`` forces the layout (None:
    the prior's own choice)."""
    if channels_last is not None:
        prior.channels_last = channels_last
        prior.encoder.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    start = time.perf_counter()
    with torch.no_grad():
        for images in batches:
            prior(images)
    return time.perf_counter() - start


def _setting(prior_name: str, prior_path: str | None, quick: bool, repeats: int) -> dict:
    base = dict(model="resnet18", image_size=32, batch_size=32, adam=True, lr=1e-3, data_scale=0.05 if quick else 0.1,
                loss_fn_name="BSM", progress=False, comm_round=10)
    variants = {"fedavg": {"method": "fedavg"},
                "fedmas_avg": {"method": "fedmas", "free_u": 3.0, "aggregate_method": "avg"},
                "fedmas_avg_cached": {"method": "fedmas", "free_u": 3.0, "aggregate_method": "avg",
                                      "cache_prior_features": True},
                "fedmas_mas": {"method": "fedmas", "free_u": 3.0, "aggregate_method": "mas"},
                "fedmas_mas_shared": {"method": "fedmas", "free_u": 3.0, "aggregate_method": "mas",
                                      "share_prior_forward": True}}
    runs = {}
    for label, extra in variants.items():
        if extra["method"] == "fedmas":
            extra = {**extra, "pre_trained_models": prior_name, "prior_path": prior_path}
        cfg = build_config({**base, **extra})
        sim = Simulation(cfg, load_data(cfg), "cpu")
        state, _ = initial_global_state(cfg, sim.build_model)
        states = [{} for _ in sim.training_clients]
        _round(sim, state, states, 1)  # warm-up: the prior loads, cached features and optimizer states appear
        runs[label] = (sim, state, states)
    prior = load_prior(prior_name, prior_path=prior_path, image_size=32)
    prior224 = load_prior(prior_name, prior_path=prior_path, image_size=224)
    sim = runs["fedmas_mas"][0]
    train_batches, all_batches = _prior_batches(sim, 2, prepass=False), _prior_batches(sim, 2, prepass=True)
    big = [torch.randn(32, 3, 224, 224) for _ in range(2 if quick else 4)]
    timings: dict[str, list[float]] = {}
    # Interleaved, one repeat of everything at a time, so a drift in the machine's speed (which
    # is large on this shared machine) hits every variant alike.
    for r in range(repeats):
        for label, (sim, state, states) in runs.items():
            timings.setdefault(label, []).append(_round(sim, state, states, r + 2))
        timings.setdefault("prior_train_batches", []).append(_forward_time(prior, train_batches))
        timings.setdefault("prior_all_batches", []).append(_forward_time(prior, all_batches))
        for layout, last in (("contiguous", False), ("channels_last", True)):
            timings.setdefault(f"prior_32px_{layout}", []).append(_forward_time(prior, train_batches, last))
            timings.setdefault(f"prior_224px_{layout}", []).append(_forward_time(prior224, big, last))
        prior.channels_last = False
        prior.encoder.to(memory_format=torch.contiguous_format)
    median = {k: statistics.median(v) for k, v in timings.items()}
    return {
        "bench": "fedmas_round", "prior": prior_name if prior_path is None else Path(prior_path).name,
        "prior_dim": load_prior(prior_name, prior_path=prior_path, image_size=32).num_features,
        **{f"{k}_s_median": round(v, 3) for k, v in median.items()},
        "fedmas_avg_over_fedavg": round(median["fedmas_avg"] / median["fedavg"], 2),
        "fedmas_mas_over_fedavg": round(median["fedmas_mas"] / median["fedavg"], 2),
        "fedmas_avg_cached_over_fedavg": round(median["fedmas_avg_cached"] / median["fedavg"], 2),
        # --share_prior_forward: one prior forward per sample instead of two under MAS
        "fedmas_mas_shared_over_fedmas_mas": round(median["fedmas_mas_shared"] / median["fedmas_mas"], 2),
        "prior_share_of_fedmas_avg": round(median["prior_train_batches"] / median["fedmas_avg"], 2),
        "prior_share_of_fedmas_mas": round(median["prior_all_batches"] / median["fedmas_mas"], 2),
        # <= 1: Fed-MAS adds no more than the prior's own forward (target)
        "added_over_prior_forward": round((median["fedmas_avg"] - median["fedavg"]) / median["prior_train_batches"], 2),
        "channels_last_speedup_32px": round(median["prior_32px_contiguous"] / median["prior_32px_channels_last"], 2),
        "channels_last_speedup_224px": round(median["prior_224px_contiguous"] / median["prior_224px_channels_last"], 2),
        "repeats": repeats,
    }


def run(quick: bool = False) -> list[dict]:
    from fedward.selfsup.moco import MocoSettings, train_moco

    threads = configure_threads(1)
    repeats = 2 if quick else 3
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        # A ResNet-18 prior in the MoCo format (untrained weights cost the same to run as trained ones).
        r18 = Path(tmp) / "r18.pth.tar"
        train_moco(torch.zeros(128, 3, 32, 32, dtype=torch.uint8), MocoSettings(arch="resnet18", epochs=0), r18,
                   progress=False, log=lambda m: None)
        for name, path in (("random", None), (str(r18), str(r18))):
            row = {**_setting(name, path, quick, repeats), "threads": threads}
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    run(parser.parse_args().quick)
