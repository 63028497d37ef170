"""Partial participation (--clients_per_round): which clients train, drawn per round from the seed,
the same in every engine (the round loop selects), and refused where a method needs every client."""

from __future__ import annotations

import pytest

from fedward.algorithms import get_algorithm
from fedward.algorithms.base import participants
from fedward.config import build_config
from fedward.engine.simulation import prepare, run
from fedward.errors import ConfigError
from fedward.tracking import RunDirectory


def test_the_number_of_participants_by_hand():
    assert [participants(x, 10) for x in (0, 3, 0.25, 0.01, 0.5, 12)] == [10, 3, 2, 1, 5, 10]  # round(2.5) = 2


def test_a_round_trains_the_drawn_clients_and_aggregates_their_replies_only(tiny_values, tmp_path):
    cfg = build_config({**tiny_values, "comm_round": 3, "clients_per_round": 2, "output": str(tmp_path / "run")})
    run_dir, data = prepare(cfg)
    run(cfg, run_dir, data=data)
    rows = RunDirectory.open_existing(tmp_path / "run").read_rows()
    algorithm = get_algorithm("fedavg")(cfg, None, None)
    for round_index in (1, 2, 3):
        expected = algorithm.select_clients(round_index, list(range(6)), {})
        taking_part = sorted(r["client"] for r in rows if r["scope"] == "participation" and r["round"] == round_index)
        (aggregation,) = [r for r in rows if r["scope"] == "aggregation" and r["round"] == round_index]
        assert len(expected) == 2 and taking_part == expected == aggregation["clients"]
        counts = aggregation["num_examples"]
        assert aggregation["weights"] == pytest.approx([n / sum(counts) for n in counts])
    drawn = {tuple(algorithm.select_clients(r, list(range(6)), {})) for r in range(1, 30)}
    assert len(drawn) > 5  # the draw changes with the round
    # the global model is still evaluated at every client
    assert {r["client"] for r in rows if r.get("model") == "global" and r.get("data") == "client"} == set(range(6))


@pytest.mark.parametrize("method, reason", [("ktpfl", "each round needs every client"), ("cyclic", "picks its own"),
                                            ("centralized", "picks its own"), ("local", "never communicate")])
def test_methods_that_need_every_client_refuse_it(method, reason):
    values = {"method": method, "clients_per_round": 2}
    with pytest.raises(ConfigError, match=f"--clients_per_round does not apply to --method {method}: .*{reason}"):
        build_config(values)


def test_bad_counts_are_refused(tiny_values, tmp_path):
    with pytest.raises(ConfigError, match="a count must be a whole number"):
        build_config({**tiny_values, "clients_per_round": 2.5})
    cfg = build_config({**tiny_values, "clients_per_round": 7, "output": str(tmp_path / "run")})
    with pytest.raises(ConfigError, match="--clients_per_round 7: the federation has 6 clients"):
        prepare(cfg)

