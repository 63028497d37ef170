"""Client states on disk with a small cache: the store's rules by hand, and runs that give the
same numbers whatever is kept in memory, across a crash between checkpoints."""

from __future__ import annotations

import pytest
import torch

from fedward.config import build_config
from fedward.engine.client_states import ClientStateStore
from fedward.engine.simulation import run
from fedward.tracking import RunDirectory


def test_the_store_keeps_what_a_checkpoint_stands_for(tmp_path):
    store = ClientStateStore(tmp_path, [0, 1], in_memory=1)
    assert store.get(0) == {}  # before its first round
    for round_index in (1, 2, 5):  # client 0 trains in rounds 1, 2 and 5 (partial participation)
        store.put(0, round_index, {"w": torch.full((2,), float(round_index))})
    store.put(1, 2, {"w": torch.zeros(2)})
    store.put(1, 3, {})  # a state that became empty is still written: it replaces round 2's
    assert store.rounds(0) == [1, 2, 5] and store.rounds(1) == [2, 3]
    store.commit(3)  # the checkpoint of round 3 stands for client 0's round-2 file and client 1's round-3 one
    assert store.rounds(0) == [2, 5] and store.rounds(1) == [3]
    store.rewind(3)  # resumed after round 3: round 5 was an interrupted run's
    assert store.rounds(0) == [2] and torch.equal(store.get(0)["w"], torch.full((2,), 2.0))
    assert store.get(1) == {}
    nothing = ClientStateStore(tmp_path / "none", [0], in_memory=4)
    nothing.put(0, 1, {})
    assert nothing.rounds(0) == []  # a client that keeps nothing writes nothing


def test_the_cache_holds_at_most_in_memory_states(tmp_path):
    store = ClientStateStore(tmp_path, [0, 1, 2], in_memory=2)
    states = {k: {"w": torch.tensor([float(k)])} for k in range(3)}
    for k in range(3):
        store.put(k, 1, states[k])
    assert store.get(2) is states[2] and store.get(1) is states[1]  # cached
    assert store.get(0) is not states[0] and torch.equal(store.get(0)["w"], states[0]["w"])  # read back
    disk_only = ClientStateStore(tmp_path, [0, 1, 2], in_memory=0)
    assert disk_only.get(1) is not disk_only.get(1)  # every get reads its file


def _run(path, values, **kwargs):
    cfg = build_config(values)
    run_dir = RunDirectory.create(path)
    run_dir.write_config(cfg.to_dict())
    run(cfg, run_dir, **kwargs)
    return run_dir


class _Crash(Exception):
    pass


@pytest.mark.parametrize("method", ["fedavg", "ditto"])  # Adam moments; a personalised model
def test_states_on_disk_give_the_same_run_across_a_crash_between_checkpoints(tmp_path, tiny_values, method):
    """Partial participation, checkpoints every 2 rounds, a crash after round 3 (whose client states
    are on disk, newer than the checkpoint): the resumed run, keeping no state in memory, ends with
    the uninterrupted run's numbers and models."""
    values = {**tiny_values, "method": method, "comm_round": 4, "adam": True, "clients_per_round": 3,
              "checkpoint_every": 2, "validate_client": True}
    full = _run(tmp_path / "full", values)
    crashed_values = {**values, "states_in_memory": 0}

    def crash_after_three(round_index):
        if round_index == 3:
            raise _Crash

    with pytest.raises(_Crash):
        _run(tmp_path / "crashed", crashed_values, on_round_end=crash_after_three)
    crashed = RunDirectory.open_existing(tmp_path / "crashed")
    assert torch.load(crashed.checkpoints_dir / "last.pt", weights_only=False)["round"] == 2
    assert any(3 in ClientStateStore(crashed.checkpoints_dir / "clients", [k], 0).rounds(k) for k in range(6))
    run(build_config(crashed_values), crashed, resume=True)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(crashed.read_rows()) == strip(full.read_rows())
    for name in sorted(p.name for p in full.path.glob("final_model*.pt")):
        a = torch.load(full.path / name, weights_only=False)["state_dict"]
        b = torch.load(crashed.path / name, weights_only=False)["state_dict"]
        assert all(torch.equal(a[k], b[k]) for k in a), name
    # what stays on disk: each client's newest state only, and none of it in the checkpoint file
    assert "client_states" not in torch.load(full.checkpoints_dir / "last.pt", weights_only=False)
    for k in range(6):
        assert len(ClientStateStore(full.checkpoints_dir / "clients", [k], 0).rounds(k)) <= 1
