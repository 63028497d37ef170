"""The SuperExec's fork server: each ClientApp launch becomes its own forked process running the
entry point with Flower's arguments; other launches, and launches after the server is gone, start
cold as Flower does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedward.flower.superexec import CLIENTAPP_COMMAND, ForkServer, executor_subprocess, supernode_subprocess

OUT_ENV = "FEDWARD_TEST_FORK_OUT"


def _recording_main():
    """A stand-in for flwr-clientapp: writes its argv, pid and parent pid, then exits with code 3."""
    out = Path(os.environ[OUT_ENV]) / f"{os.getpid()}.json"
    out.write_text(json.dumps({"argv": sys.argv, "pid": os.getpid(), "ppid": os.getppid()}))
    sys.exit(3)


def _load():
    return _recording_main


def _wait_for(folder: Path, count: int, timeout: float = 20.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = sorted(folder.glob("*.json"))
        if len(found) >= count:
            time.sleep(0.1)
            return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]
        time.sleep(0.05)
    raise AssertionError(f"{count} launches expected in {folder}, found {len(list(folder.glob('*.json')))}")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="the fork server needs os.fork")
def test_each_clientapp_launch_is_a_forked_process_with_flowers_arguments(tmp_path, monkeypatch):
    monkeypatch.setenv(OUT_ENV, str(tmp_path))
    server = ForkServer(load=_load)
    popen = executor_subprocess(server).Popen
    args = [CLIENTAPP_COMMAND, "--runtime-api-address", "127.0.0.1:9094", "--token", "t1", "--insecure"]
    assert popen(args) is None
    assert popen([*args[:4], "t2", "--insecure"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) is None
    runs = _wait_for(tmp_path, 2)
    assert sorted(r["argv"][4] for r in runs) == ["t1", "t2"]
    assert all(r["argv"][:4] == args[:4] for r in runs)
    assert all(r["ppid"] == server.pid for r in runs)  # children of the server, not of this process
    assert len({r["pid"] for r in runs}) == 2  # one process per message
    # Anything that is not a ClientApp starts cold, as Flower does.
    started = popen([sys.executable, "-c", "print('cold')"], stdout=subprocess.PIPE, text=True)
    assert started.communicate()[0] == "cold\n"
    # Closing the request pipe ends the server; a launch then reports that it was not taken.
    os.close(server._requests)
    os.waitpid(server.pid, 0)
    read_fd, write_fd = os.pipe()
    os.close(read_fd)
    server._requests = write_fd
    assert server.launch(args, quiet=True) is False


def test_the_supernode_starts_fedwards_superexec_in_place_of_flowers():
    calls = []

    class Recorder:
        def __init__(self, args, **kwargs):
            calls.append(args)

    module = supernode_subprocess()
    real = subprocess.Popen
    subprocess.Popen = Recorder
    try:
        module.Popen(["flower-superexec", "--insecure", "--runtime-api-address", "0.0.0.0:9094"])
        module.Popen(["something-else", "--x"])
    finally:
        subprocess.Popen = real
    assert calls[0] == [sys.executable, "-m", "fedward.flower.superexec", "--insecure", "--runtime-api-address",
                        "0.0.0.0:9094"]
    assert calls[1] == ["something-else", "--x"]
