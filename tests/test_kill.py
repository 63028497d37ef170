"""kill -9 at points a seeded draw picks (while clients train, while a checkpoint or a client state
is being written, while the final model and report are written): ``--resume`` then ends with the
uninterrupted run's rows and models."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time

import pytest
import torch

from fedward.cli import main

FLAGS = ["--method", "ditto", "--adam", "true", "--clients_per_round", "3", "--validate_client", "true",
         "--model", "smallcnn", "--image_size", "16", "--data_scale", "0.03", "--progress", "false", "--threads", "1",
         "--comm_round", "6", "--lr", "0.01"]  # ditto: a personalised model and Adam moments per client


def _rows(out) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def _rounds_logged(out) -> int:
    path = out / "metrics.jsonl"
    if not path.is_file():
        return 0
    return max((json.loads(line)["round"] for line in path.read_text().splitlines() if line.endswith("}")), default=0)


@pytest.mark.slow
def test_a_run_killed_anywhere_resumes_to_the_uninterrupted_result(tmp_path):
    full = tmp_path / "full"
    assert main(["run", "--output", str(full), *FLAGS]) == 0
    draw = random.Random(17)
    # after round 1 and after round 3: a random moment of the next round or of the checkpoint write;
    # after round 6 (the last): while the final models, results and report are written
    for trial, after_round in enumerate((1, 3, 6)):
        out = tmp_path / f"killed-{trial}"
        process = subprocess.Popen([sys.executable, "-m", "fedward", "run", "--output", str(out), *FLAGS],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while _rounds_logged(out) < after_round and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(draw.uniform(0.0, 0.3) if after_round < 6 else 0.0)
        process.kill()  # SIGKILL: no handler, no cleanup
        process.wait()
        assert process.returncode == -9, f"trial {trial}: the run ended (rc {process.returncode}) before the kill"
        assert main(["run", "--resume", str(out)]) == 0
        assert _rows(out) == _rows(full), f"trial {trial}"
        for k in range(6):
            name = f"final_model_client_{k}.pt"
            a = torch.load(full / name, weights_only=False)["state_dict"]
            b = torch.load(out / name, weights_only=False)["state_dict"]
            assert all(torch.equal(a[key], b[key]) for key in a), (trial, name)
        assert json.loads((out / "results.json").read_text())["final"] == json.loads((full / "results.json").read_text())["final"]
        assert (out / "report.html").is_file()
