"""``fedward flower superlink | supernode | run``: thin wrappers that start Flower's own commands
with the options a fedward deployment needs (runtime dependency installation off, telemetry off,
TLS files in the right places, the node config a fedward node reads).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Sequence

from fedward.config import RunConfig
from fedward.errors import ConfigError
from fedward.flower import DEFAULT_NODE_PORT, DEFAULT_PORT  # noqa: F401  (re-exported for the CLI)
from fedward.flower.app import write_app
from fedward.flower.tls import CA_CERT, SERVER_CERT, SERVER_KEY
from fedward.flower.worker import WORKER_KEY

CONNECTION = "fedward"


SUPEREXEC_POLL = 0.1  # seconds


def flower_env(home: Path | None = None) -> dict[str, str]:
    """The environment for Flower's commands: this Python's scripts first on PATH (Flower starts
    ``flower-superexec`` by name), no telemetry, no update check, no run-time ``uv sync`` (it would
    install a CUDA torch next to the one fedward runs on)."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.update(FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1", FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1")
    # Flower's SuperExec looks for a new task every 1 s by default (its documented setting): each
    # message waited 0.5 s on average for it.
    env.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", str(SUPEREXEC_POLL))
    if home is not None:
        home.mkdir(parents=True, exist_ok=True)
        env["FLWR_HOME"] = str(home)
    return env


def executable(name: str) -> str:
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if found is None:
        raise ConfigError(f"`{name}` is not installed: pip install \"fedward[flower]\"")
    return found


def _tls_pair(insecure: bool, tls_file: str | None, what: str) -> None:
    if insecure == bool(tls_file):
        raise ConfigError(f"give either --insecure (plain HTTP, for a trial on one machine) or {what}, not both or neither")


def superlink_command(*, host: str, port: int, certs: str | None, insecure: bool, database: str | None,
                      simulation: bool = False, auth: bool = False) -> list[str]:
    _tls_pair(insecure, certs, "--certs DIR (ca.crt, server.pem, server.key from `fedward flower certs`)")
    if auth and insecure:
        raise ConfigError("--auth needs TLS (Flower refuses SuperNode authentication without it): give --certs DIR")
    command = [executable("flower-superlink"), "--host", host, "--port", str(port), "--disable-runtime-dependency-installation"]
    if certs:
        folder = Path(certs)
        for name in (CA_CERT, SERVER_CERT, SERVER_KEY):
            if not (folder / name).is_file():
                raise ConfigError(f"--certs {folder}: {name} is missing (write all three with `fedward flower certs {folder}`)")
        command += ["--ssl-ca-certfile", str(folder / CA_CERT), "--ssl-certfile", str(folder / SERVER_CERT),
                    "--ssl-keyfile", str(folder / SERVER_KEY)]
    else:
        command.append("--insecure")
    if database:
        command += ["--database", database]
    if simulation:
        command.append("--simulation")
    if auth:
        command.append("--enable-supernode-auth")
    return command


def _toml_string(value: str) -> str:
    if "'" in value or "\n" in value:
        raise ConfigError(f"{value!r}: a node-config path may not contain a single quote or a newline")
    return f"'{value}'"


def node_config(*, client_id: int, data: str | None, state_dir: str | None, device: str | None,
                prior_path: str | None, worker_socket: str | None = None) -> str:
    """The ``--node-config`` string a fedward node reads (see :mod:`fedward.flower.node`)."""
    items = [f"client-id={int(client_id)}"]
    for key, value in (("data-dir", data), ("state-dir", state_dir), ("device", device), ("prior-path", prior_path),
                       (WORKER_KEY, worker_socket)):
        if value:
            path_like = key != "device"
            items.append(f"{key}={_toml_string(str(Path(value).resolve()) if path_like else value)}")
    return " ".join(items)


def supernode_command(*, superlink: str, client_id: int, data: str | None, state_dir: str | None, port: int,
                      ca_cert: str | None, insecure: bool, device: str | None = None,
                      prior_path: str | None = None, auth_key: str | None = None,
                      worker_socket: str | None = None) -> list[str]:
    _tls_pair(insecure, ca_cert, "--ca-cert FILE (the ca.crt the SuperLink's certificate is signed with)")
    if data and not Path(data).exists():
        raise ConfigError(f"--data {data} does not exist on this machine")
    executable("flower-supernode")  # installed with Flower; the node runs its CLI through fedward.flower.supernode
    command = [sys.executable, "-m", "fedward.flower.supernode", "--superlink", superlink, "--port", str(port),
               "--node-config", node_config(client_id=client_id, data=data, state_dir=state_dir, device=device,
                                            prior_path=prior_path, worker_socket=worker_socket)]
    if ca_cert:
        if not Path(ca_cert).is_file():
            raise ConfigError(f"--ca-cert {ca_cert} is not a file")
        command += ["--root-certificates", str(Path(ca_cert).resolve())]
    else:
        command.append("--insecure")
    if auth_key:
        if not Path(auth_key).is_file():
            raise ConfigError(f"--auth-key {auth_key} is not a file (write node key pairs with "
                              "`fedward flower certs DIR --nodes N`)")
        command += ["--auth-supernode-private-key", str(Path(auth_key).resolve())]
    return command


def start_worker(path: str, env: dict[str, str]) -> None:
    """Start the warm message worker of the SuperNode this process is about to become (``exec``
    keeps the pid, which the worker watches, and the process group, so a group kill ends both)."""
    subprocess.Popen([sys.executable, "-m", "fedward.flower.worker", "--socket", path,
                      "--parent-pid", str(os.getpid())], env=env)


def exec_command(command: Sequence[str], env: dict[str, str]) -> None:
    """Replace this process with ``command`` (signals then reach Flower directly)."""
    print("fedward: " + " ".join(command), file=sys.stderr, flush=True)
    os.execvpe(command[0], list(command), env)


# -- submitting a run ---------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_superlink(port: int, process: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ConfigError(f"the local SuperLink exited with code {process.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1):
                return
        except OSError:
            time.sleep(0.3)
    raise ConfigError(f"the local SuperLink did not answer on 127.0.0.1:{port} within {timeout:g} s")


def run_config_overrides(cfg: RunConfig, *, run_dir: Path, resume: bool, min_clients: int, round_timeout: float,
                         join_timeout: float, drill_bad_reply: str = "") -> dict:
    values = {"fedward-config": json.dumps({**cfg.to_dict(), "output": str(run_dir)}), "run-dir": str(run_dir),
              "resume": resume, "min-clients": min_clients, "round-timeout": float(round_timeout),
              "join-timeout": float(join_timeout), "drill-bad-reply": drill_bad_reply}
    return values


def stream(command: list[str], env: dict[str, str]) -> int | None:
    """Run ``flwr run --stream``, echoing its output; the id of the run it started, or None."""
    import re

    run_id = None
    with subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1) as process:
        for line in process.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            found = re.search(r"Successfully started run (\d+)", line)
            if found:
                run_id = int(found.group(1))
    return run_id if process.returncode == 0 else None


def run_status(run_id: int, env: dict[str, str]) -> dict:
    """The SuperLink's record of a run: status, details, traffic and compute seconds."""
    result = subprocess.run([executable("flwr"), "list", CONNECTION, "--run-id", str(run_id), "--format", "json"],
                            env=env, capture_output=True, text=True)
    try:
        runs = json.loads(result.stdout)["runs"]
    except (ValueError, KeyError):
        return {"status-details": (result.stdout + result.stderr).strip()[-500:]}
    return runs[0] if runs else {}


def cli_home(folder: Path, connection: dict) -> dict[str, str]:
    """The environment for the ``flwr`` CLI with ``connection`` as its default SuperLink."""
    import tomli_w

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.toml").write_bytes(tomli_w.dumps({"superlink": {"default": CONNECTION, CONNECTION: connection}}).encode())
    return flower_env(folder)


def connection_to(superlink: str, ca_cert: str | None, insecure: bool) -> dict:
    _tls_pair(insecure, ca_cert, "--ca-cert FILE (the CA that signed the SuperLink's certificate)")
    if ca_cert:
        return {"address": superlink, "root-certificates": str(Path(ca_cert).resolve())}
    return {"address": superlink, "insecure": True}


def register_node(public_key: str, *, superlink: str, ca_cert: str | None, insecure: bool) -> int:
    """Register a SuperNode's public key on a SuperLink started with ``--auth`` (Flower's
    ``flwr supernode register``); only registered nodes may connect. Returns flwr's exit code."""
    if not Path(public_key).is_file():
        raise ConfigError(f"public key {public_key} is not a file (write node key pairs with "
                          "`fedward flower certs DIR --nodes N`)")
    env = cli_home(Path(tempfile.mkdtemp(prefix="fedward-flwr-cli-")), connection_to(superlink, ca_cert, insecure))
    return subprocess.run([executable("flwr"), "supernode", "register", str(Path(public_key).resolve()), CONNECTION],
                          env=env).returncode


def submit(overrides: dict, *, superlink: str | None, ca_cert: str | None, insecure: bool,
           simulation: int = 0, workdir: str | Path | None = None) -> int:
    """Write the App and a connection, then ``flwr run --stream`` until the run ends; with
    ``simulation`` N, first start a private SuperLink in simulation mode (Flower's Ray runtime,
    N virtual nodes) and stop it afterwards. Returns flwr's exit code."""
    import tomli_w

    home = Path(workdir or tempfile.mkdtemp(prefix="fedward-flower-"))
    app = write_app(home / "app")
    (home / "run-config.toml").write_bytes(tomli_w.dumps(overrides).encode())
    link = None
    try:
        if simulation:
            port = free_port()
            link = subprocess.Popen(superlink_command(host="127.0.0.1", port=port, certs=None, insecure=True,
                                                      database=None, simulation=True),
                                    env=flower_env(home / "superlink"), stdout=(home / "superlink.log").open("wb"),
                                    stderr=subprocess.STDOUT, start_new_session=True)
            wait_for_superlink(port, link)
            connection = {"address": f"127.0.0.1:{port}", "insecure": True}
        else:
            connection = connection_to(superlink, ca_cert, insecure)
        env = cli_home(home / "cli", connection)
        command = [executable("flwr"), "run", str(app), CONNECTION, "--run-config", str(home / "run-config.toml"), "--stream"]
        if simulation:
            command += ["--federation-config", f"num-supernodes={int(simulation)}"]
        run_id = stream(command, env)
        if run_id is None:
            return 1
        status = run_status(run_id, env)
        if status.get("status") != "finished:completed":
            print(f"fedward: the run ended {status.get('status', 'in an unknown state')}: "
                  f"{status.get('status-details', '')}", file=sys.stderr, flush=True)
            return 1
        return 0
    finally:
        if link is not None:
            try:
                os.killpg(link.pid, signal.SIGTERM)
                link.wait(timeout=20)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                os.killpg(link.pid, signal.SIGKILL)
