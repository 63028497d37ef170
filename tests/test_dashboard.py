"""``fedward dashboard``: TensorBoard over run directories, following runs that are still writing."""

from __future__ import annotations

import json
import socket
import time
import urllib.parse
import urllib.request

import pytest

from fedward.errors import ConfigError
from fedward.tracking import RunDirectory
from fedward.tracking.dashboard import launch, logdir_spec


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _get(url: str):
    with urllib.request.urlopen(url, timeout=10) as answer:
        return json.load(answer)


def _rows(round_: int) -> list[dict]:
    return [{"round": round_, "scope": "participation", "client": 0, "status": "ok"},
            {"round": round_, "scope": "participation", "client": 1, "status": "dropped", "reason": "no reply"},
            {"round": round_, "scope": "aggregation", "clients": [0], "weights": [1.0]},
            {"round": round_, "scope": "server", "client": None, "model": "global", "data": "pooled", "split": "test",
             "balanced_accuracy": 0.25 * round_, "accuracy": 0.5, "macro_f1": 0.4, "loss": 1.0, "n": 10}]


@pytest.mark.slow
def test_the_dashboard_serves_the_runs_and_follows_new_rounds(tmp_path):
    run = RunDirectory.create(tmp_path / "live")
    run.write_config({"method": "fedavg", "client_names": ["BCN", "MSK"]})
    run.log_rows(_rows(1))
    url = launch([tmp_path / "live"], port=_free_port())

    def scalars(tag: str) -> list:
        query = urllib.parse.urlencode({"run": name, "tag": tag})
        return _get(f"{url}data/plugin/scalars/scalars?{query}")

    deadline = time.monotonic() + 60
    while not (names := _get(f"{url}data/runs")) and time.monotonic() < deadline:
        time.sleep(0.2)
    [name] = names
    tags = _get(f"{url}data/plugin/scalars/tags")[name]
    assert {"participation/client_0_BCN", "participation/client_1_MSK", "aggregation/weight/client_0_BCN",
            "server/pooled/test/balanced_accuracy"} <= set(tags)
    assert [point[2] for point in scalars("participation/client_1_MSK")] == [0.0]  # dropped
    run.log_rows(_rows(2))  # the run goes on: the page picks the new round up on its next reload
    while len(points := scalars("server/pooled/test/balanced_accuracy")) < 2 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert [(step, value) for _, step, value in points] == [(1, 0.25), (2, 0.5)]


def test_the_dashboard_names_a_bad_folder(tmp_path):
    with pytest.raises(ConfigError, match="nope is not a folder"):
        logdir_spec([tmp_path / "nope"])
    (tmp_path / "a" / "x").mkdir(parents=True)
    (tmp_path / "b" / "x").mkdir(parents=True)
    with pytest.raises(ConfigError, match=r"two folders share a name \(x\)"):
        logdir_spec([tmp_path / "a" / "x", tmp_path / "b" / "x"])
    (tmp_path / "a" / "x" / "tensorboard").mkdir()
    assert logdir_spec([tmp_path / "a" / "x"]) == f"x:{(tmp_path / 'a' / 'x' / 'tensorboard').resolve()}"
