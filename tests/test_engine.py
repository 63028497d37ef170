"""The simulation engine: reproducibility, order independence, resume, privacy, aggregation."""

from __future__ import annotations

import json

import pytest
import torch

from fedward.config import build_config
from fedward.engine.setup import initial_global_state, load_data
from fedward.engine.simulation import ClientTask, Simulation, prepare, run
from fedward.tracking import RunDirectory

TIMING_KEYS = {"seconds"}


def _rows(run_dir: RunDirectory):
    return [{k: v for k, v in row.items() if k not in TIMING_KEYS} for row in run_dir.read_rows()]


def _run(tmp_path, name, values, **kwargs):
    cfg = build_config(values)
    run_dir = RunDirectory.create(tmp_path / name)
    run_dir.write_config(cfg.to_dict())
    summary = run(cfg, run_dir, **kwargs)
    return cfg, run_dir, summary


def test_same_seed_same_metrics_bit_for_bit(tmp_path, tiny_values):
    _, a, _ = _run(tmp_path, "a", tiny_values)
    _, b, _ = _run(tmp_path, "b", tiny_values)
    assert _rows(a) == _rows(b)
    final_a = torch.load(a.final_model_path)["state_dict"]
    final_b = torch.load(b.final_model_path)["state_dict"]
    assert all(torch.equal(final_a[k], final_b[k]) for k in final_a)
    _, c, _ = _run(tmp_path, "c", {**tiny_values, "seed": 1})
    assert _rows(a) != _rows(c)


def test_client_order_does_not_change_replies(tiny_values):
    cfg = build_config(tiny_values)
    data = load_data(cfg)
    replies = {}
    for order in (range(data.num_clients), reversed(range(data.num_clients))):
        sim = Simulation(cfg, data, "cpu")
        state, _ = initial_global_state(cfg, sim.build_model)
        message = sim.algorithm.server_message(1, state, {})
        for k in order:
            reply = sim.run_client(ClientTask(1, k, message, {}), evaluate_local=False).reply
            replies.setdefault(k, []).append(reply)
    for k, (first, second) in replies.items():
        assert all(torch.equal(first.arrays[n], second.arrays[n]) for n in first.arrays), f"client {k}"
        assert first.metrics == second.metrics


class _Crash(Exception):
    pass


def _crashed_after(tmp_path, values, round_index):
    """A run in tmp_path/crashed stopped by an exception after round ``round_index``'s checkpoint."""

    def crash(finished):
        if finished == round_index:
            raise _Crash

    cfg = build_config(values)
    run_dir = RunDirectory.create(tmp_path / "crashed")
    run_dir.write_config(cfg.to_dict())
    with pytest.raises(_Crash):
        run(cfg, run_dir, on_round_end=crash)
    return cfg, run_dir


@pytest.mark.parametrize("method, extra", [(m, {}) for m in ["fedavg", "moon", "fedadam", "fedyogi", "fedadagrad",
                                                                "fedavgm", "scaffold", "cyclic"]]
                         + [("fedavgm", {"secure_aggregation": True})])  # its rounding is seeded per round and client
def test_resume_after_crash_gives_identical_metrics(tmp_path, tiny_values, method, extra):
    """Server state (optimizer moments, momentum, control variates) is in the checkpoint, so a run
    resumed after round 2 ends exactly where the uninterrupted run ends."""
    values = {**tiny_values, "comm_round": 3, "method": method, "adam": method != "scaffold", "validate_client": True,
              **extra}
    _, full, _ = _run(tmp_path, "full", values)

    cfg, run_dir = _crashed_after(tmp_path, values, 2)
    assert max(r["round"] for r in run_dir.read_rows()) == 2
    saved = torch.load(run_dir.checkpoints_dir / "last.pt", weights_only=False)
    assert saved["round"] == 2 and (bool(saved["server_state"]) == (method not in ("fedavg", "moon", "cyclic")))
    run(cfg, RunDirectory.open_existing(tmp_path / "crashed"), resume=True)
    assert _rows(run_dir) == _rows(full)
    final_full = torch.load(full.final_model_path)["state_dict"]
    final_resumed = torch.load(run_dir.final_model_path)["state_dict"]
    assert all(torch.equal(final_full[k], final_resumed[k]) for k in final_full)


def test_fedavg_weights_are_example_counts(tmp_path, tiny_values):
    cfg, run_dir, _ = _run(tmp_path, "w", {**tiny_values, "comm_round": 1})
    data = load_data(cfg)
    (agg,) = [r for r in run_dir.read_rows() if r["scope"] == "aggregation"]
    # floor(n_k / B) * B for each client, as the reference's num_samples
    seen = [(len(c.train) // 16) * 16 if len(c.train) >= 16 else len(c.train) for c in data.clients]
    assert agg["num_examples"] == [float(s) for s in seen]
    assert agg["weights"] == pytest.approx([s / sum(seen) for s in seen])


def test_rows_follow_the_contract(tmp_path, tiny_values):
    _, run_dir, summary = _run(tmp_path, "rows", {**tiny_values, "validate_client": True})
    rows = run_dir.read_rows()
    evaluation = [r for r in rows if r["scope"] in ("server", "client")]
    for row in evaluation:
        for key in ("round", "scope", "client", "split", "balanced_accuracy", "accuracy", "macro_f1", "loss", "n"):
            assert key in row
        assert row["split"] in ("val", "test")
    pooled_test = [r for r in rows if r["scope"] == "server" and r["client"] is None and r["split"] == "test"]
    per_client = [r for r in rows if r["scope"] == "server" and r["client"] is not None and r["split"] == "test"
                  and r["round"] == 2]
    # The pooled row is the union of the per-client rows.
    assert pooled_test[-1]["n"] == sum(r["n"] for r in per_client)
    assert sum(map(sum, pooled_test[-1]["confusion_matrix"])) == pooled_test[-1]["n"]
    assert any(r["scope"] == "client" and r["model"] == "local" for r in rows)
    assert json.loads(run_dir.results_path.read_text())["final_round"] == 2
    for name in ("config.yaml", "metrics.jsonl", "final_model.pt", "report.html", "checkpoints/last.pt"):
        assert (run_dir.path / name).is_file(), name
    assert any(run_dir.tensorboard_dir.iterdir())


def test_predictions_files_round_trip_to_the_rows(tmp_path, tiny_values):
    """predictions_global.csv holds every final-round val and test image of every client; its argmax,
    confusion matrix and AUROC are those of the metrics rows."""
    import csv

    import numpy as np

    from fedward.metrics import confusion_matrix, macro_auroc

    cfg, run_dir, _ = _run(tmp_path, "predictions", tiny_values)
    with open(run_dir.path / "predictions_global.csv", newline="") as handle:
        lines = list(csv.DictReader(handle))
    class_names = [key[2:] for key in lines[0] if key.startswith("p_")]
    assert len(class_names) == 8  # the built-in set's classes, one score column each
    assert {line["round"] for line in lines} == {str(cfg.comm_round)}
    rows = [r for r in run_dir.read_rows() if r["scope"] == "server" and r["client"] is not None
            and r["round"] == cfg.comm_round]
    assert len(lines) == sum(r["n"] for r in rows)
    for row in rows:
        mine = [line for line in lines if line["client"] == str(row["client"]) and line["split"] == row["split"]]
        scores = np.array([[float(line[f"p_{name}"]) for name in class_names] for line in mine])
        labels = np.array([int(line["label"]) for line in mine])
        preds = np.array([int(line["prediction"]) for line in mine])
        assert [int(line["index"]) for line in mine] == list(range(row["n"]))
        assert np.allclose(scores.sum(1), 1.0, atol=1e-4) and (scores.argmax(1) == preds).all()
        assert confusion_matrix(labels, preds, len(class_names)).tolist() == row["confusion_matrix"]
        expected = macro_auroc(labels, scores)  # from 6-digit scores: equal to the row's up to ties they merge
        assert (row["auroc"] is None) == (expected is None)
        if expected is not None:
            assert row["auroc"] == pytest.approx(expected, abs=0.02)
    pooled = [r for r in run_dir.read_rows() if r["scope"] == "server" and r["client"] is None]
    assert pooled and all(r["auroc"] is None for r in pooled)  # needs every hospital's scores in one place


def _homogeneous_methods():
    from fedward.algorithms import METHOD_REGISTRY
    from fedward.algorithms.heterogeneous import LocalModelMethod

    return [name for name, cls in METHOD_REGISTRY.items() if not issubclass(cls, LocalModelMethod)]


@pytest.mark.parametrize("method", _homogeneous_methods())
def test_every_method_runs_and_sends_only_declared_arrays(tmp_path, tiny_values, method, monkeypatch, small_prior):
    """Privacy: what a client returns holds only the arrays its method declares (never images,
    labels, optimizer state or a personalised model) and scalar metrics. The model-heterogeneous
    methods have the same check, plus value checks, in test_mhpflid.py."""
    from fedward.engine import simulation as sim_module

    seen = []
    original = sim_module.Simulation.run_client

    def spy(self, task, evaluate_local):
        result = original(self, task, evaluate_local)
        seen.append((self.algorithm, task.message.arrays, result.reply))
        return result

    monkeypatch.setattr(sim_module.Simulation, "run_client", spy)
    extra = {"pre_trained_models": small_prior, "free_u": 1, "aggregate_method": "mas"} if method == "fedmas" else {}
    _run(tmp_path, method, {**tiny_values, "method": method, "loss_fn_name": "BSM", **extra})
    assert seen
    for algorithm, global_arrays, reply in seen:
        declared = algorithm.declared_reply_keys(global_arrays) if global_arrays else set()
        assert set(reply.arrays) <= declared
        assert all(isinstance(v, float) for v in reply.metrics.values())
        if algorithm.personalised and not declared:  # local; FedRep, LG-FedAvg, APFL, Ditto share a declared part
            assert reply.arrays == {}


def test_bn_policy_local_keeps_client_statistics(tiny_values):
    cfg = build_config({**tiny_values, "bn_policy": "local"})
    data = load_data(cfg)
    sim = Simulation(cfg, data, "cpu")
    state0, _ = initial_global_state(cfg, sim.build_model)
    client_state = {}
    reply = sim.run_client(ClientTask(1, 0, sim.algorithm.server_message(1, state0, {}), client_state), False).reply
    kept = client_state["bn-statistics"]
    assert kept and all(k.endswith(("running_mean", "running_var", "num_batches_tracked")) for k in kept)
    # Next round the client starts from the global weights but its own BN statistics.
    sim.algorithm.load_start_model(sim.workspace, sim.algorithm.server_message(2, state0, {}), client_state, data.clients[0])
    current = sim.workspace.model.state_dict()
    for key, value in kept.items():
        assert torch.equal(current[key], value)
    some_weight = next(k for k in state0 if k.endswith("weight"))
    assert torch.equal(current[some_weight], state0[some_weight])
    assert not torch.equal(reply.arrays[some_weight], state0[some_weight])


@pytest.mark.slow
def test_worker_pool_matches_sequential(tmp_path, tiny_values):
    # One torch thread everywhere, so both runs do the same arithmetic.
    _, seq, _ = _run(tmp_path, "seq", {**tiny_values, "threads": 1})
    torch.set_num_threads(2)
    _, pool, _ = _run(tmp_path, "pool", {**tiny_values, "devices": ["cpu", "cpu"], "threads": 1})
    assert _rows(seq) == _rows(pool)


def test_keep_checkpoint_false_removes_the_finished_runs_checkpoint(tiny_values, tmp_path):
    for keep in (True, False):
        cfg = build_config({**tiny_values, "comm_round": 1, "keep_checkpoint": keep, "output": str(tmp_path / str(keep))})
        run_dir, data = prepare(cfg)
        run(cfg, run_dir, data=data)
        assert (run_dir.checkpoints_dir / "last.pt").is_file() == keep
        assert run_dir.final_model_path.is_file() and run_dir.results_path.is_file()


def test_selected_round_predictions_are_that_rounds_and_survive_a_resume(tmp_path, tiny_values):
    """predictions_global_selected.csv is the global model's per-image predictions at the summary's
    validation-selected round (not the final one here), also in a run resumed after that round."""
    import csv

    from fedward.metrics import confusion_matrix

    values = {**tiny_values, "comm_round": 4, "eval_every": 1, "lr": 0.05}
    _, full, summary = _run(tmp_path, "full", values)
    selected = summary["selected_round"]
    assert selected is not None and selected < values["comm_round"]
    with open(full.path / "predictions_global_selected.csv", newline="") as handle:
        lines = list(csv.DictReader(handle))
    assert {line["round"] for line in lines} == {str(selected)}
    rows = [r for r in full.read_rows() if r["scope"] == "server" and r["client"] is not None
            and r["round"] == selected]
    for row in rows:
        mine = [line for line in lines if line["client"] == str(row["client"]) and line["split"] == row["split"]]
        labels = [int(line["label"]) for line in mine]
        preds = [int(line["prediction"]) for line in mine]
        assert confusion_matrix(labels, preds, 8).tolist() == row["confusion_matrix"]

    cfg, run_dir = _crashed_after(tmp_path, values, selected)
    run(cfg, RunDirectory.open_existing(tmp_path / "crashed"), resume=True)
    for name in ("predictions_global_selected.csv", "predictions_global.csv"):
        assert (run_dir.path / name).read_text() == (full.path / name).read_text()
