"""Engine overhead: one full FedAvg round against the pure compute floor, in the same run.

Round: what ``fedward run`` does in a round without evaluation: server message, each client's
update (load global weights, build its loss and optimizer, restore its optimizer state, batched
augmentation, forward/backward/step, copy its weights out), aggregation, and the checkpoint
(written in the background while the next round trains, as in a run). Measured again without
the checkpoint, to separate the engine's own overhead from the cost of saving every round.
Floor: the same forward/backward/step on the same batches (same sizes, same count) already
normalised in memory, one model, no FL machinery. Ratio = median round / median floor.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

from fedward.algorithms.base import make_optimizer, training_batches
from fedward.config import build_config
from fedward.data.augment import normalize
from fedward.engine import checkpoint as ckpt
from fedward.engine.setup import configure_threads, initial_global_state, load_data
from fedward.engine.simulation import ClientTask, Simulation
from fedward.losses import build_loss
from fedward.seeding import torch_generator
from fedward.tracking import RunDirectory


def _round(sim: Simulation, global_state, client_states, round_index: int, run_dir: RunDirectory,
           saver: ckpt.BackgroundSaver | None) -> float:
    start = time.perf_counter()
    message = sim.algorithm.server_message(round_index, global_state, {})
    results = [sim.run_client(ClientTask(round_index, k, message, client_states[k]), False)
               for k in range(len(sim.training_clients))]
    new_state, _ = sim.algorithm.aggregate(round_index, global_state, [r.reply for r in results], {})
    for k, result in enumerate(results):
        client_states[k] = result.state
    # As in a run: the checkpoint is written in the background while the next round trains; the
    # previous write must have finished before this one starts, which this timing includes.
    if saver is not None:
        saver.submit(run_dir, round=round_index, global_state=new_state, client_states=list(client_states),
                     server_state={}, num_classes=sim.spec.num_classes)
    return time.perf_counter() - start


def _floor(sim: Simulation, global_state, round_index: int) -> float:
    cfg, model = sim.cfg, sim.workspace.model
    model.load_state_dict(global_state)
    model.train()
    batches = []
    for k, client in enumerate(sim.training_clients):
        gen = torch_generator(cfg.seed, "client-train", round_index, k)
        loss_fn = build_loss(cfg.loss_fn_name, client.train.class_counts(sim.spec.num_classes).tolist())
        for _, index in training_batches(client.train, cfg.batch_size, cfg.epochs, gen):
            batches.append((normalize(client.train.images[index], sim.spec.mean, sim.spec.std),
                            client.train.labels[index], loss_fn))
    optimizer = make_optimizer(cfg, model.parameters())
    start = time.perf_counter()
    for images, labels, loss_fn in batches:
        loss = loss_fn(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return time.perf_counter() - start


def run(quick: bool = False) -> list[dict]:
    values = dict(method="fedavg", model="resnet18", image_size=64, batch_size=64, adam=True, lr=3e-4,
                  data_scale=0.05 if quick else 0.1, loss_fn_name="BSM", progress=False, comm_round=10)
    cfg = build_config(values)
    threads = configure_threads(1)
    data = load_data(cfg)
    sim = Simulation(cfg, data, "cpu")
    global_state, _ = initial_global_state(cfg, sim.build_model)
    client_states = [{} for _ in sim.training_clients]
    repeats = 2 if quick else 3
    rounds, bare_rounds, floors = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = RunDirectory.create(Path(tmp) / "bench")
        saver = ckpt.BackgroundSaver()
        _round(sim, global_state, client_states, 1, run_dir, saver)  # warm-up (first optimizer states, allocator)
        for r in range(repeats):  # consecutive rounds, as in a run (each overlaps the previous checkpoint)
            rounds.append(_round(sim, global_state, client_states, r + 2, run_dir, saver))
        saver.wait()
        checkpoint_mb = round(ckpt.path_of(run_dir).stat().st_size / 2**20)
        for r in range(repeats):
            bare_rounds.append(_round(sim, global_state, client_states, r + 2, run_dir, None))
        for r in range(repeats):
            floors.append(_floor(sim, global_state, r + 2))
    n_batches = sum(max(len(c.train) // cfg.batch_size, 1) for c in sim.training_clients)
    row = {"bench": "engine_round", "method": "fedavg", "model": "resnet18", "image_size": 64, "batch_size": 64,
           "clients": data.num_clients, "train_images": sum(len(c.train) for c in data.clients), "batches": n_batches,
           "round_s_median": statistics.median(rounds), "round_without_checkpoint_s_median": statistics.median(bare_rounds),
           "floor_s_median": statistics.median(floors),
           "ratio": statistics.median(rounds) / statistics.median(floors),
           "ratio_without_checkpoint": statistics.median(bare_rounds) / statistics.median(floors),
           "checkpoint_mb": checkpoint_mb,
           "repeats": repeats, "threads": threads}
    print(json.dumps(row), flush=True)
    return [row]


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    run(parser.parse_args().quick)
