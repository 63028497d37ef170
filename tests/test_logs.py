"""Log lines: timestamped on stderr whatever the terminal, the same lines in log.txt, --quiet and
--verbose."""

from __future__ import annotations

import re

import pytest

from fedward.config import build_config
from fedward.engine.simulation import prepare, run

LINE = re.compile(r"^\d\d:\d\d:\d\d fedward: ")


@pytest.mark.parametrize("quiet, verbose", [(False, False), (True, False), (False, True)])
def test_a_run_logs_its_setting_and_a_line_per_round(tiny_values, tmp_path, capsys, quiet, verbose):
    cfg = build_config({**tiny_values, "comm_round": 2, "quiet": quiet, "verbose": verbose,
                        "output": str(tmp_path / "run")})
    run_dir, data = prepare(cfg)
    capsys.readouterr()
    run(cfg, run_dir, data=data)
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    saved = (run_dir.path / "log.txt").read_text().splitlines()
    # log.txt keeps every line, whatever stderr shows: the set-up, a line per client (verbose's) and per round
    assert any(f"output: {run_dir.path}" in line for line in saved)
    assert any("6 clients (train/val/test): BCN " in line for line in saved)
    rounds = [line for line in saved if " round 2/2: clients 6/6, train loss " in line]
    assert len(rounds) == 1 and "val BA" in rounds[0] and "test BA" in rounds[0]
    assert sum(" round 1: client " in line for line in saved) == 6
    if quiet:
        assert err == []
    else:
        assert all(LINE.match(line) for line in err[:5])  # timestamped, no bar escapes on a captured stderr
        assert "\r" not in "".join(err) and "\x1b[" not in "".join(err)
        assert any(line.endswith(rounds[0].split(" ", 2)[2]) for line in err)
        assert any(" round 1: client 0: " in line for line in err) == verbose
