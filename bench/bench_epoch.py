"""One client's training epoch at 224 px against the pure compute floor.

Epoch: what ``train_local`` does (draw the batch order, index, augment with the reference's
transforms, forward/backward/step), one client of the built-in data at 224 px, ResNet-18, batch
32, Adam. Floor: the same forward/backward/step on the same augmented batches, made beforehand
and kept in memory. The two are interleaved repeat by repeat in one run; medians are reported.
(Preparing the next batch on a background thread was measured with this benchmark and dropped:
docs/results.md, "Data pipeline".)
"""

from __future__ import annotations

import json
import statistics
import sys
import time

from fedward.algorithms.base import make_optimizer, training_batches
from fedward.algorithms.fedavg import train_local
from fedward.config import build_config
from fedward.engine.setup import configure_threads, initial_global_state, load_data
from fedward.engine.simulation import Simulation
from fedward.losses import build_loss
from fedward.seeding import torch_generator


def run(quick: bool = False) -> list[dict]:
    cfg = build_config(dict(method="fedavg", model="resnet18", image_size=224, batch_size=32, adam=True, lr=3e-4,
                            data_scale=0.05 if quick else 0.1, progress=False))
    threads = configure_threads(1)
    sim = Simulation(cfg, load_data(cfg), "cpu")
    ws, client = sim.workspace, sim.training_clients[0]
    start_state, _ = initial_global_state(cfg, sim.build_model)
    loss_fn = build_loss(cfg.loss_fn_name, client.train.class_counts(sim.spec.num_classes).tolist())

    def epoch() -> float:
        ws.model.load_state_dict(start_state)
        optimizer = make_optimizer(cfg, ws.model.parameters())
        generator = torch_generator(cfg.seed, "client-train", 1, client.client_id)
        t0 = time.perf_counter()
        train_local(ws, ws.model, client, epochs=1, batch_size=cfg.batch_size, loss_fn=loss_fn, optimizer=optimizer,
                    generator=generator)
        return time.perf_counter() - t0

    def floor() -> float:
        generator = torch_generator(cfg.seed, "client-train", 1, client.client_id)
        batches = [(ws.augment(client.train.images[index], generator), client.train.labels[index])
                   for _, index in training_batches(client.train, cfg.batch_size, 1, generator)]
        ws.model.load_state_dict(start_state)
        ws.model.train()
        optimizer = make_optimizer(cfg, ws.model.parameters())
        t0 = time.perf_counter()
        for inputs, labels in batches:
            loss = loss_fn(ws.model(inputs), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return time.perf_counter() - t0

    epoch()  # warm-up: allocator, augmenter, first optimizer state
    epochs, floors = [], []
    for _ in range(2 if quick else 3):
        epochs.append(epoch())
        floors.append(floor())
    base = statistics.median(floors)
    row = {"bench": "epoch_224", "model": "resnet18", "image_size": 224, "batch_size": cfg.batch_size,
           "images": len(client.train), "augment_backend": sim.augment_backend, "threads": threads,
           "floor_s": round(base, 2), "epoch_s": round(statistics.median(epochs), 2),
           "ratio": round(statistics.median(epochs) / base, 3)}
    print(json.dumps(row), flush=True)
    return [row]


if __name__ == "__main__":
    run(quick="--quick" in sys.argv)
