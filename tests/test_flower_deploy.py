"""A real Flower deployment on 127.0.0.1: one SuperLink and three SuperNodes as separate processes
(started with `fedward flower superlink|supernode`), runs submitted with `fedward flower run`.

Slow (each Flower message starts a ClientApp process), so the runs are few and small; the same
guarantees are checked in one process, quickly, in test_flower.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("flwr")

from conftest import TINY  # noqa: E402
from fedward.algorithms import get_algorithm  # noqa: E402
from fedward.config import build_config  # noqa: E402
from fedward.config import applicable_settings as applicable  # noqa: E402
from fedward.engine.setup import model_builder  # noqa: E402
from fedward.engine.simulation import prepare, run  # noqa: E402
from fedward.flower.launch import flower_env, free_port  # noqa: E402
from fedward.flower.tls import generate_certificates  # noqa: E402
from fedward.tracking import RunDirectory  # noqa: E402

pytestmark = pytest.mark.slow
FEDWARD = [sys.executable, "-m", "fedward"]
BASE = {**TINY, "client_number": 3, "partition_method": "iid", "eval_every": 0}
HETERO = dict(client_models="smallcnn,resnet5,smallcnn", stem="small", messenger_dim=16, injection_epochs=1,
              distillation_epochs=1)


class Processes:
    """Background processes, each in its own session so that Flower's children die with it."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.running: dict[str, subprocess.Popen] = {}

    def start(self, name: str, command: list[str], env: dict | None = None) -> subprocess.Popen:
        log = (self.folder / f"{name}.log").open("ab")
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                   cwd=self.folder, env=env)
        self.running[name] = process
        return process

    def kill(self, name: str, sig=signal.SIGKILL) -> None:
        process = self.running.pop(name)
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            pass
        process.wait(timeout=30)

    def log(self, name: str) -> str:
        return (self.folder / f"{name}.log").read_text(errors="replace")

    def stop_all(self) -> None:
        for name in list(self.running):
            self.kill(name, signal.SIGTERM)


def node_command(port: int, client_id: int, state_dir: Path, tls: list[str]) -> list[str]:
    return [*FEDWARD, "flower", "supernode", "--superlink", f"127.0.0.1:{port}", "--client-id", str(client_id),
            "--state-dir", str(state_dir), "--port", str(free_port()), *tls]


def flags(values: dict) -> list[str]:
    out = []
    for key, value in values.items():
        out += [f"--{key}", str(value).lower() if isinstance(value, bool) else str(value)]
    return out


def submit(port: int, output: Path, values: dict, *extra: str, tls=()) -> subprocess.CompletedProcess:
    command = [*FEDWARD, "flower", "run", "--superlink", f"127.0.0.1:{port}", *tls, "--output", str(output),
               "--round-timeout", "60", "--join-timeout", "90", *extra, *flags(values)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def simulation_state(values: dict, output: Path):
    cfg = build_config({**values, "output": str(output)})
    run_dir, data = prepare(cfg)
    run(cfg, run_dir, data=data)
    return torch.load(run_dir.checkpoints_dir / "last.pt", weights_only=False)["global_state"]


def max_abs_difference(a, b) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    """A SuperLink serving TLS with certificates made here, and three SuperNodes that trust its CA."""
    folder = tmp_path_factory.mktemp("deployment")
    certs = generate_certificates(folder / "certs")
    processes = Processes(folder)
    port = free_port()
    processes.start("superlink", [*FEDWARD, "flower", "superlink", "--certs", str(folder / "certs"),
                                  "--host", "127.0.0.1", "--port", str(port)])
    time.sleep(2)
    tls = ["--ca-cert", str(certs["ca.crt"])]
    for k in range(3):
        processes.start(f"node{k}", node_command(port, k, folder / "nodes", tls))
    yield processes, port, folder, tls
    processes.stop_all()


def test_a_node_without_the_ca_certificate_is_refused(deployment):
    processes, port, folder, _ = deployment
    deadline = time.monotonic() + 60
    while processes.log("superlink").count("Activated node_id") < 3 and time.monotonic() < deadline:
        time.sleep(0.5)
    # this node trusts only the system's CAs, not the federation's
    processes.start("untrusted", [str(Path(sys.executable).parent / "flower-supernode"), "--superlink",
                                  f"127.0.0.1:{port}", "--port", str(free_port()), "--node-config", "client-id=2",
                                  "--max-retries", "2"], env=flower_env(folder / "untrusted-home"))
    while time.monotonic() < deadline and "verify failed" not in processes.log("untrusted").lower():
        time.sleep(0.5)
    assert "certificate verify failed" in processes.log("untrusted").lower(), processes.log("untrusted")[-2000:]
    assert processes.log("superlink").count("Activated node_id") == 3  # it never got in
    processes.kill("untrusted")


# FedAvg itself is the base of fedmas's path here, and is checked against the simulation in Flower's
# simulation runtime below (same ServerApp and ClientApp): a third deployed run would add 90 s.
# fedmas under SecAgg+ (its MAS weights from the clear robust factors): the secure protocol on real
# SuperNodes, whose ClientApp processes keep the protocol's state in the node's context between stages
SAME_RESULT_RUNS = {"fedmas": {"free_u": 1, "aggregate_method": "mas", "secure_aggregation": True, "comm_round": 1},
                    "mhpflid": {**HETERO, "comm_round": 1}}


def test_deployment_gives_the_simulations_model(deployment, tmp_path, small_prior):
    """A 1-round fedmas run under secure aggregation and a 1-round mhpflid run, one after the other on
    the same three SuperNodes: each ends with the global model (the messenger for mhpflid) of the
    in-process simulation."""
    processes, port, folder, tls = deployment
    for method, extra in SAME_RESULT_RUNS.items():
        prior = {"pre_trained_models": small_prior} if method == "fedmas" else {}  # a file every node reads
        values = applicable({**BASE, "method": method, **extra, **prior})
        submit(port, tmp_path / method, values, tls=tls)
        flower = torch.load(tmp_path / method / "checkpoints" / "last.pt", weights_only=False)["global_state"]
        assert max_abs_difference(flower, simulation_state(values, tmp_path / f"sim-{method}")) <= 1e-6, method
        check_privacy(method, values, RunDirectory.open_existing(tmp_path / method))
    # personalised models stayed on the nodes
    assert not list((tmp_path / "mhpflid").glob("final_model*.pt"))
    assert len(list((folder / "nodes").glob("mhpflid-*/client-*/final_model.pt"))) == 3


def check_privacy(method: str, values: dict, run_dir: RunDirectory) -> None:
    """Read on the server side: every record a node sent is one the method declares."""
    from fedward.algorithms import TaskSpec

    cfg = build_config(values)
    spec = TaskSpec(**json.loads((run_dir.path / "flower.json").read_text())["spec"])
    algorithm = get_algorithm(method)(cfg, spec, model_builder(cfg, spec))
    declared = algorithm.declared_reply_keys(algorithm.build_model().state_dict())
    audit = [json.loads(line) for line in (run_dir.path / "messages.jsonl").read_text().splitlines()]
    secure = cfg.has("secure_aggregation") and cfg.secure_aggregation
    stages = {"secagg-setup", "secagg-share-keys", "secagg-unmask"} if secure else set()
    assert {line["type"] for line in audit} <= {"train", "evaluate"} | stages and len(audit) >= 3
    for line in audit:
        if line["type"] in stages or (secure and line["type"] == "train"):  # keys, shares, masked vectors
            assert "arrays" not in line["records"]
            assert all(value == {} for value in line["records"].values() if isinstance(value, dict))
            continue
        assert set(line["records"]) <= {"arrays", "metrics", "report"}
        assert set(line["records"].get("arrays", {})) <= declared


def test_dropout_rejoin_and_a_rejected_reply(deployment, tmp_path):
    """Client 1 sends a NaN in round 1 (rejected); client 2's SuperNode is killed after its round-1
    update and so misses round 2 (dropped); restarted, it takes part again later; the run completes."""
    processes, port, folder, tls = deployment
    # Timeouts with room for three ClientApp processes starting at once on two busy cores, and two
    # rounds after the restart for the new SuperNode to register (it takes part from the next round).
    values = {**BASE, "method": "fedavg", "comm_round": 5}
    command = [*FEDWARD, "flower", "run", "--superlink", f"127.0.0.1:{port}", *tls, "--output",
               str(tmp_path / "dropout"), "--round-timeout", "30", "--join-timeout", "90", "--min-clients", "2",
               "--drill-bad-reply", "1:1:nan", *flags(values)]
    submitted = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 200
    metrics = tmp_path / "dropout" / "metrics.jsonl"

    def logged(round_index: int) -> bool:
        return metrics.is_file() and f'"round": {round_index},' in metrics.read_text()

    while not logged(1) and time.monotonic() < deadline:  # round 1 aggregated; round 2 starts now
        time.sleep(0.1)
    processes.kill("node2")  # SIGKILL: the SuperLink still lists the node until its heartbeat expires
    while not logged(2) and time.monotonic() < deadline:
        time.sleep(0.5)
    processes.start("node2", node_command(port, 2, folder / "nodes", tls))
    output, _ = submitted.communicate(timeout=400)
    assert submitted.returncode == 0, output[-4000:]
    rows = RunDirectory.open_existing(tmp_path / "dropout").read_rows()
    status = {(r["round"], r["client"]): r for r in rows if r["scope"] == "participation"}
    assert status[(1, 1)]["status"] == "rejected" and "non-finite" in status[(1, 1)]["reason"]
    assert status[(2, 2)]["status"] == "dropped"
    assert status[(5, 2)]["status"] == "ok"  # back again
    assert "round 2: client 2" in output and "dropped" in output
    aggregated = {r["round"]: r["clients"] for r in rows if r["scope"] == "aggregation"}
    assert aggregated[1] == [0, 2] and aggregated[2] == [0, 1] and aggregated[5] == [0, 1, 2]
    assert (tmp_path / "dropout" / "final_model.pt").is_file()


def test_flower_simulation_runtime_with_three_virtual_nodes(tmp_path):
    values = {**BASE, "method": "fedavg"}
    command = [*FEDWARD, "flower", "run", "--simulation", "3", "--output", str(tmp_path / "run"), *flags(values)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    flower = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=False)["global_state"]
    assert max_abs_difference(flower, simulation_state(values, tmp_path / "sim")) <= 1e-6


def test_supernode_authentication_lets_in_only_registered_nodes(tmp_path):
    """A SuperLink started with --auth: node 0's public key is registered and it is activated;
    node 1, with a key pair of its own that was never registered, is refused and gives up."""
    certs = tmp_path / "certs"
    assert subprocess.run([*FEDWARD, "flower", "certs", str(certs), "--nodes", "2"], capture_output=True).returncode == 0
    processes, port = Processes(tmp_path), free_port()
    processes.start("superlink", [*FEDWARD, "flower", "superlink", "--certs", str(certs), "--host", "127.0.0.1",
                                  "--port", str(port), "--auth"])
    try:
        tls = ["--ca-cert", str(certs / "ca.crt")]
        register = [*FEDWARD, "flower", "register-node", str(certs / "node-0.pub"), "--superlink", f"127.0.0.1:{port}", *tls]
        deadline = time.monotonic() + 60
        while (result := subprocess.run(register, capture_output=True, text=True)).returncode != 0:
            assert time.monotonic() < deadline, result.stdout + result.stderr  # the SuperLink is still starting
            time.sleep(1)
        node_id = result.stdout.split("SuperNode ")[1].split()[0]
        for k in (0, 1):
            processes.start(f"node{k}", [*node_command(port, k, tmp_path / "nodes", tls),
                                         "--auth-key", str(certs / f"node-{k}.key")], env=flower_env(tmp_path / f"home{k}"))
        while time.monotonic() < deadline and not (f"Activated node_id={node_id}" in processes.log("superlink")
                                                   and "Failed to activate SuperNode" in processes.log("node1")):
            time.sleep(0.5)
        assert f"Activated node_id={node_id}" in processes.log("superlink"), processes.log("superlink")[-2000:]
        assert "Failed to activate SuperNode" in processes.log("node1"), processes.log("node1")[-2000:]
        assert processes.log("superlink").count("Activated node_id") == 1
    finally:
        processes.stop_all()
