"""Fed-MAS cost at the seed's resolution: one Fed-MAS + MAS round at 224 px against its compute floor.

The setting of issue 15: 6 clients x 64 training images, batch 16, one local epoch, ResNet-18 with
the Fed-MAS heads, a ResNet-50 prior (untrained weights cost the same to run as MoCo-v2's), Adam.
A round is what the engine does for every client (load the global model, the MAS pre-pass, local
training with the prior's forward on every batch, the divergences, aggregation), timed without
evaluation and checkpoint. Its floor is the same arithmetic on the same number of batches already
augmented and normalised in memory, with no FL machinery: per client, the pre-pass's forwards of
the model and the prior, then per training batch the prior's forward (skipped where
--share_prior_forward reuses the pre-pass's features), the model's forward, the loss, backward,
clipping and the Adam step. Both variants, with and without --share_prior_forward, are measured
against their own floor, interleaved repeat by repeat in one process (``--quick``: one repeat; a
round takes minutes). Peak memory is measured separately, in a fresh process running the real
``fedward run`` path (data, one round, evaluation, checkpoint). Targets: round / floor <= 1.10; peak < 2 GiB.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from bench_fedmas import _round  # one round of every client, without evaluation or checkpoint

IMAGES_PER_CLIENT = 64
SETTINGS = dict(method="fedmas", model="resnet18", image_size=224, batch_size=16, epochs=1, adam=True, lr=3e-4,
                loss_fn_name="BSM", free_u=3.0, aggregate_method="mas", pre_trained_models="random",
                # an IID split of a small built-in set gives every client at least 64 training images
                partition_method="iid", client_number=6, data_scale=0.03, comm_round=10, progress=False, threads=2)


def small_clients(data, images: int = IMAGES_PER_CLIENT):
    """Every client's train split cut to its first ``images`` images (the split order is already random)."""
    for client in data.clients:
        if len(client.train) < images:
            raise ValueError(f"client {client.client_id} has {len(client.train)} training images, the bench needs {images}")
        client.train = client.train.subset(torch.arange(images))
    return data


def _floor_batches(sim, round_index: int):
    """Per client: (pre-pass images, [(train images, labels)]), augmented and normalised beforehand."""
    from fedward.algorithms.base import training_batches
    from fedward.seeding import torch_generator

    cfg, ws, out = sim.cfg, sim.workspace, []
    for k, client in enumerate(sim.training_clients):
        split = client.train
        prepass = torch_generator(cfg.seed, "mas-prepass", round_index, k)
        train = torch_generator(cfg.seed, "client-train", round_index, k)
        out.append(([ws.augment(split.images[i], prepass) for _, i in training_batches(split, cfg.batch_size, 1, prepass)],
                    [(ws.augment(split.images[i], train), split.labels[i])
                     for _, i in training_batches(split, cfg.batch_size, cfg.epochs, train)]))
    return out


def _floor(sim, global_state, batches, shared: bool) -> float:
    """The compute of one round on ready batches: see the module docstring."""
    from fedward.algorithms.base import make_optimizer
    from fedward.algorithms.fedmas import CLIP_NORM
    from fedward.algorithms.mas import alignment_loss
    from fedward.losses import build_loss

    cfg, ws, algorithm = sim.cfg, sim.workspace, sim.algorithm
    model = ws.model
    start = time.perf_counter()
    for k, (prepass, train) in enumerate(batches):
        client = sim.training_clients[k]
        counts = client.train.class_counts(sim.spec.num_classes).tolist()
        task, aux = build_loss(cfg.loss_fn_name, counts), build_loss(cfg.loss_fn_name, counts)
        prior = algorithm.prior(ws, client.client_id)
        model.load_state_dict(global_state, strict=False)
        model.eval()
        with torch.no_grad():
            features = []
            for images in prepass:
                model.forward_all(images)
                features.append(prior(images))
        model.train()
        optimizer = make_optimizer(cfg, model.parameters())
        for i, (images, labels) in enumerate(train):
            if shared:
                feature = features[i]
            else:
                with torch.no_grad():
                    feature = prior(images)
            z, p, z2 = model.forward_all(images)
            loss = task(z, labels) + aux(z2, labels) + cfg.free_u * alignment_loss(p, feature).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP_NORM)
            optimizer.step()
    return time.perf_counter() - start


def timings(repeats: int) -> dict:
    from fedward.config import build_config
    from fedward.engine.setup import configure_threads, initial_global_state, load_data
    from fedward.engine.simulation import ClientTask, Simulation

    runs = {}
    for label, shared in (("mas", False), ("mas_shared", True)):
        cfg = build_config({**SETTINGS, "share_prior_forward": shared})
        threads = configure_threads(1, cfg.threads)
        sim = Simulation(cfg, small_clients(load_data(cfg)), "cpu")
        state, _ = initial_global_state(cfg, sim.build_model)
        states = [{} for _ in sim.training_clients]
        # Warm-up on one client (at 224 px a round takes minutes): the prior loads, the allocator grows.
        sim.run_client(ClientTask(1, 0, sim.algorithm.server_message(1, state, {}), states[0]), False)
        runs[label] = (sim, state, states, shared)
    batches = _floor_batches(runs["mas"][0], 2)
    times: dict[str, list[float]] = {}
    for r in range(repeats):
        for label, (sim, state, states, shared) in runs.items():
            times.setdefault(f"round_{label}", []).append(_round(sim, state, states, r + 2))
            times.setdefault(f"floor_{label}", []).append(_floor(sim, state, batches, shared))
    median = {k: statistics.median(v) for k, v in times.items()}
    return {**{f"{k}_s_median": round(v, 2) for k, v in median.items()},
            "round_over_floor_mas": round(median["round_mas"] / median["floor_mas"], 3),
            "round_over_floor_mas_shared": round(median["round_mas_shared"] / median["floor_mas_shared"], 3),
            "shared_over_unshared_round": round(median["round_mas_shared"] / median["round_mas"], 3),
            "threads": threads, "repeats": repeats}


def peak_memory(shared: bool) -> float:
    """Peak resident memory (MiB) of this process after one real round, from data to checkpoint."""
    import resource

    from fedward.config import build_config
    from fedward.engine.simulation import prepare
    from fedward.engine.simulation import run as run_rounds

    with tempfile.TemporaryDirectory() as out:
        cfg = build_config({**SETTINGS, "share_prior_forward": shared, "comm_round": 1, "output": f"{out}/run"})
        run_dir, data = prepare(cfg)
        run_rounds(cfg, run_dir, data=small_clients(data))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _child(what: str) -> dict:
    done = subprocess.run([sys.executable, __file__, what], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"bench_fedmas224 {what} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(quick: bool = False) -> list[dict]:
    row = {"bench": "fedmas_round_224", "clients": SETTINGS["client_number"], "images_per_client": IMAGES_PER_CLIENT,
           "batch_size": SETTINGS["batch_size"], "prior": "resnet50 (random weights)",
           **_child(f"timings:{1 if quick else 3}")}
    # Peak memory of the default (without --share_prior_forward; the shared variant only adds the
    # pre-pass's features, 16 x 2048 floats a batch).
    row["peak_rss_mib"] = round(_child("memory:0")["peak_rss_mib"])
    print(json.dumps(row), flush=True)
    return [row]


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1].startswith("timings:"):
        print(json.dumps(timings(int(sys.argv[1].split(":")[1]))))
    elif len(sys.argv) > 1 and sys.argv[1].startswith("memory:"):
        print(json.dumps({"peak_rss_mib": peak_memory(bool(int(sys.argv[1].split(":")[1])))}))
    else:
        run(quick="--quick" in sys.argv)
