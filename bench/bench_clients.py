"""Many clients in bounded memory: peak memory and round time of a FedAvg run with Adam (each
client keeps its optimizer moments between rounds) at 10, 50 and 200 clients, 10 of them training
each round, on the built-in data split by Dirichlet (alpha 1), at 32 px. The data grow with the
clients (``data_scale`` = clients / 200), so that a client holds about as many images (~90 train)
at every size and a round's work is the same: what may grow is only what the clients that do not
train cost.

Each run is a fresh process (its peak RSS is the run's). ``states_in_memory`` 0 is the default
(every state is read back from checkpoints/clients/ when its client trains); ``all`` keeps every
client's state in memory, as fedward did before the store, where it fits. Round time: the median of rounds 2..R-1 (round 1
builds the workspace, the last round evaluates every client). The target: memory within 10% from
10 to 200 clients, round time flat in the clients that exist.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, resource, sys
from fedward import train
settings = json.loads(sys.argv[1])
result = train(settings)
rows = [json.loads(line) for line in (result.path / "metrics.jsonl").read_text().splitlines()]
store = result.path / "checkpoints" / "clients"
print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "state_files_mb": sum(p.stat().st_size for p in store.rglob("*.pt")) / 2**20,
                  "checkpoint_mb": (result.path / "checkpoints" / "last.pt").stat().st_size / 2**20}))
"""


def one(model: str, clients: int, in_memory: int, rounds: int, folder: Path) -> dict:
    settings = dict(method="fedavg", model=model, image_size=32, data_scale=clients / 200, client_number=clients,
                    partition_method="hetero", partition_alpha=1.0, clients_per_round=10, comm_round=rounds,
                    epochs=1, batch_size=32, adam=True, lr=1e-3, eval_every=0, threads=0, progress=False, quiet=True,
                    states_in_memory=in_memory, output=str(folder / f"{model}-{clients}-{in_memory}"))
    done = subprocess.run([sys.executable, "-c", CHILD, json.dumps(settings)], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    lines = [line for line in (folder / f"{model}-{clients}-{in_memory}" / "log.txt").read_text().splitlines()
             if "round " in line and ", s " in line]
    seconds = [float(line.rsplit(", s ", 1)[1]) for line in lines]
    return {**measured, "round_s": statistics.median(seconds[1:-1]) if len(seconds) > 2 else seconds[-1]}


def run(*, quick: bool = False) -> list[dict]:
    rounds = 3 if quick else 4
    grid = [("smallcnn", n, m) for n in (10, 50, 200) for m in (0, n)] + \
           [("resnet18", n, 0) for n in (10, 50, 200)] + [("resnet18", 10, 10), ("resnet18", 50, 50)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model, clients, in_memory in grid:
            measured = one(model, clients, in_memory, rounds, Path(tmp))
            row = {"bench": "clients", "model": model, "clients": clients, "clients_per_round": 10,
                   "states_in_memory": "all" if in_memory == clients else in_memory, **measured}
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


if __name__ == "__main__":
    run(quick="--quick" in sys.argv)
