"""Per-round cost of running a method on Flower vs the in-process simulation, same run, same seed.

Three ways, side by side in one run (3 clients, fedavg, the small CNN at 32 px, 1 local epoch):
- ``simulation``: `fedward run`'s in-process engine (the compute itself);
- ``flower-simulation``: `fedward flower run --simulation 3` (Flower's Ray runtime, one machine);
- ``deployment``: a SuperLink and three SuperNodes on 127.0.0.1 (separate processes, plain HTTP),
  `fedward flower run`, each node's messages run by its warm worker, the SuperNode's waits capped at
  0.2 s and the SuperExec's task poll at 0.1 s (the defaults);
- ``deployment, no warm worker or fork server``: the same with ``--no-warm-worker
  --no-fork-server``: a fresh ClientApp process per message imports torch and fedward and loads
  the node's data;
- ``deployment, Flower's poll intervals``: the default deployment with Flower's own waits (a 3 s
  idle sleep in the SuperNode, a 1 s task poll in the SuperExec);
- ``deployment, secure aggregation``: the default deployment under SecAgg+ (three more exchanges a
  round).
Per-round times exclude round 1 (it includes the handshake and first data loading) and the final
round (it adds the evaluation); the median of the others is reported. Where the overhead goes is
estimated from its parts: the start of a ClientApp process (measured here: Python + torch +
fedward imports), the SuperNode's and SuperExec's polls, and the bytes moved (the model, both ways,
per client).
"""

from __future__ import annotations

import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FEDWARD = [sys.executable, "-m", "fedward"]
ROUND_LINE = re.compile(r"round (\d+)/(\d+): clients \d+/\d+,[^\n]*?, s ([\d.]+)\s*$", re.M)  # the round loop's line


def settings(rounds: int) -> dict:
    return dict(method="fedavg", model="smallcnn", image_size=32, data_scale=0.1, client_number=3,
                partition_method="iid", comm_round=rounds, epochs=1, batch_size=32, lr=0.01, eval_every=0,
                threads=1, progress=False)


def flags(values: dict) -> list[str]:
    return [item for key, value in values.items() for item in (f"--{key}", str(value).lower() if isinstance(value, bool) else str(value))]


def middle_rounds(times: dict[int, float], rounds: int) -> list[float]:
    return [times[r] for r in range(2, rounds) if r in times]


def simulation_rounds(values: dict, folder: Path) -> dict[int, float]:
    from fedward.config import build_config
    from fedward.engine.simulation import prepare, run

    cfg = build_config({**values, "output": str(folder / "simulation")})
    run_dir, data = prepare(cfg)
    marks = {0: time.perf_counter()}
    run(cfg, run_dir, data=data, on_round_end=lambda r: marks.__setitem__(r, time.perf_counter()))
    return {r: marks[r] - marks[r - 1] for r in range(1, cfg.comm_round + 1)}


def flower_rounds(command: list[str]) -> dict[int, float]:
    result = subprocess.run(command, capture_output=True, text=True, timeout=1200)
    if result.returncode != 0:
        raise RuntimeError(result.stdout[-3000:] + result.stderr[-3000:])
    return {int(m.group(1)): float(m.group(3)) for m in ROUND_LINE.finditer(result.stdout + result.stderr)}


def deployment_rounds(values: dict, folder: Path, name: str, *node_flags: str, env: dict | None = None) -> dict[int, float]:
    from fedward.flower.launch import free_port

    port = free_port()
    processes = []
    try:
        def start(command):
            processes.append(subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                              start_new_session=True, env={**os.environ, **(env or {})}))

        start([*FEDWARD, "flower", "superlink", "--insecure", "--host", "127.0.0.1", "--port", str(port)])
        time.sleep(2)
        for k in range(3):
            start([*FEDWARD, "flower", "supernode", "--superlink", f"127.0.0.1:{port}", "--client-id", str(k),
                   "--state-dir", str(folder / "nodes"), "--port", str(free_port()), "--insecure", *node_flags])
        return flower_rounds([*FEDWARD, "flower", "run", "--superlink", f"127.0.0.1:{port}", "--insecure",
                              "--output", str(folder / name), *flags(values)])
    finally:
        for process in processes:
            try:
                os.killpg(process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for process in processes:
            process.wait(timeout=30)


def clientapp_start_seconds(repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import fedward.flower.client_app"], check=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def model_bytes(values: dict) -> int:
    from fedward.models import get_model

    model = get_model(values["model"], num_classes=8, image_size=values["image_size"])
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def run(quick: bool = False) -> list[dict]:
    rounds = 3 if quick else 5
    values = settings(rounds)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        os.environ.setdefault("FEDWARD_CACHE", str(folder / "cache"))
        simulation = simulation_rounds(values, folder)
        flower_sim = flower_rounds([*FEDWARD, "flower", "run", "--simulation", "3", "--output",
                                    str(folder / "flower-simulation"), *flags(values)])
        deployment = deployment_rounds(values, folder, "deployment")
        no_fork = deployment_rounds(values, folder, "no-fork", "--no-fork-server")
        cold = deployment_rounds(values, folder, "cold", "--no-warm-worker", "--no-fork-server")
        # Flower's own waits: the SuperNode's 3 s idle sleep and the SuperExec's 1 s task poll
        flower_waits = deployment_rounds(values, folder, "flower-waits", "--idle-poll", "3",
                                         env={"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "1.0"})
        secure = deployment_rounds({**values, "secure_aggregation": True}, folder, "secure")
    start = clientapp_start_seconds()
    rows = []
    base = statistics.median(middle_rounds(simulation, rounds))
    for name, times in (("simulation", simulation), ("flower-simulation", flower_sim), ("deployment", deployment),
                        ("deployment, no fork server", no_fork), ("deployment, no warm worker or fork server", cold), ("deployment, Flower's poll intervals", flower_waits),
                        ("deployment, secure aggregation", secure)):
        per_round = statistics.median(middle_rounds(times, rounds))
        rows.append({"bench": "flower_round", "engine": name, "round_s": round(per_round, 2),
                     "overhead_s": round(per_round - base, 2), "ratio": round(per_round / base, 1),
                     "rounds": {str(k): round(v, 2) for k, v in sorted(times.items())}})
    rows.append({"bench": "flower_parts", "clientapp_start_s": round(start, 2),
                 "model_bytes": model_bytes(values), "bytes_per_round": 2 * 3 * model_bytes(values)})
    return rows


if __name__ == "__main__":
    for row in run(quick="--quick" in sys.argv):
        print(row)
