"""FedDF and pFedDF: the per-architecture average and the ensemble target by hand, one
distillation step, the prototypes a client receives and loads, what a reply carries, and whole
runs (finished, scored per client, bit-for-bit reproducible)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fedward.algorithms.base import ClientReply
from fedward.algorithms.feddf import mean_logits, prefixed, prototype
from fedward.config import applicable_settings as applicable
from fedward.config import build_config
from fedward.engine.replies import reply_problem
from fedward.engine.setup import configure_threads, initial_global_state, load_data
from fedward.engine.simulation import SELECTED_LOCAL, ClientTask, Simulation, run
from fedward.losses import distillation_kl
from fedward.models import get_model
from fedward.tracking import RunDirectory

ARCHS = ["smallcnn", "resnet5", "smallcnn", "resnet5"]
TINY = dict(dataset="synthetic_multires", image_size=16, patients_scale=1.0, client_models=",".join(ARCHS),
            stem="small", comm_round=2, batch_size=16, epochs=1, public_size=64, feddf_server_steps=5,
            feddf_server_batch=32, pfeddf_finetune_epochs=1, progress=False, eval_batch_size=128, threads=1)


def _simulation(method, **values):
    cfg = build_config(applicable({**TINY, "method": method, **values}))
    configure_threads(1, cfg.threads)  # as run() does: tiny models only lose from more threads
    sim = Simulation(cfg, load_data(cfg), "cpu")
    global_state, _ = initial_global_state(cfg, sim.build_model)
    return sim, global_state


def _model(arch):
    return get_model(arch, num_classes=2, image_size=16, **({"stem": "small"} if arch != "smallcnn" else {}))


def _filled(state, value):
    return {k: torch.full_like(v, value) if v.is_floating_point() else v.clone() for k, v in state.items()}


# ---------------------------------------------------------------- the server by hand

def test_each_prototype_starts_from_its_architectures_uploads_weighted_by_examples(monkeypatch):
    sim, global_state = _simulation("feddf")
    algorithm = sim.algorithm
    small, res = prototype(global_state, "smallcnn"), prototype(global_state, "resnet5")
    replies = [ClientReply(0, prefixed("smallcnn", _filled(small, 1.0)), {"num-examples": 30.0}),
               ClientReply(1, prefixed("resnet5", _filled(res, 3.0)), {"num-examples": 7.0}),
               ClientReply(2, prefixed("smallcnn", _filled(small, 5.0)), {"num-examples": 10.0})]
    starts = {}

    def keep_start(arch, start, target, round_index):
        starts[arch] = start
        return start, [0.0, 0.0]

    monkeypatch.setattr(algorithm, "distil", keep_start)
    monkeypatch.setattr(algorithm, "ensemble_logits", lambda replies: None)
    new_state, info = algorithm.aggregate(1, global_state, replies, {})
    assert info["weights"] == pytest.approx([0.75, 1.0, 0.25])  # within each architecture: 30/40, 7/7, 10/40
    weight = "conv1.weight"
    torch.testing.assert_close(starts["smallcnn"][weight], torch.full_like(small[weight], 0.75 * 1 + 0.25 * 5))
    torch.testing.assert_close(starts["resnet5"][weight], torch.full_like(res[weight], 3.0))
    assert all(torch.equal(new_state[f"smallcnn.{k}"], starts["smallcnn"][k]) for k in small)


def test_an_architecture_nobody_uploaded_keeps_its_prototype(monkeypatch):
    sim, global_state = _simulation("feddf")
    monkeypatch.setattr(sim.algorithm, "distil", lambda arch, start, target, r: (start, [0.0, 0.0]))
    monkeypatch.setattr(sim.algorithm, "ensemble_logits", lambda replies: None)
    upload = prefixed("resnet5", _filled(prototype(global_state, "resnet5"), 2.0))
    new_state, _ = sim.algorithm.aggregate(1, global_state, [ClientReply(1, upload, {"num-examples": 5.0})], {})
    assert all(torch.equal(new_state[k], global_state[k]) for k in global_state if k.startswith("smallcnn."))


def test_the_ensemble_target_is_the_mean_of_the_models_logits_by_hand():
    first, second = nn.Linear(2, 2), nn.Linear(2, 2)
    with torch.no_grad():
        first.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
        first.bias.copy_(torch.tensor([0.0, 1.0]))
        second.weight.copy_(torch.tensor([[2.0, 1.0], [0.0, -1.0]]))
        second.bias.zero_()
    x = torch.tensor([[1.0, 2.0], [3.0, -1.0]])
    # first: [[1, 3], [3, 0]]; second: [[4, -2], [5, 1]]; mean: [[2.5, 0.5], [4, 0.5]]
    target = mean_logits([first, second], lambda: (x[:1], x[1:]))
    torch.testing.assert_close(target, torch.tensor([[2.5, 0.5], [4.0, 0.5]]))


def test_the_methods_ensemble_averages_every_upload_of_every_architecture():
    sim, global_state = _simulation("feddf", public_size=8)
    algorithm = sim.algorithm
    torch.manual_seed(1)
    models = [_model(arch) for arch in ("smallcnn", "resnet5", "smallcnn")]
    replies = [ClientReply(k, prefixed(arch, m.state_dict()), {"num-examples": 1.0})
               for k, (arch, m) in enumerate(zip(("smallcnn", "resnet5", "smallcnn"), models))]
    inputs = algorithm.public_inputs(slice(None))
    with torch.no_grad():
        expected = sum(m.eval()(inputs) for m in models) / 3
    torch.testing.assert_close(algorithm.ensemble_logits(replies), expected)


def test_one_distillation_step_lowers_the_kl_to_the_ensemble():
    # public_size == batch: the one step sees every public image, so its KL is the whole set's
    sim, global_state = _simulation("feddf", public_size=32, feddf_server_batch=32, feddf_server_steps=1)
    algorithm = sim.algorithm
    inputs = algorithm.public_inputs(slice(None))
    target = 2.0 * torch.randn(32, 2, generator=torch.Generator().manual_seed(0))
    start = prototype(global_state, "resnet5")

    def kl(state):
        model = _model("resnet5")
        model.load_state_dict(state)
        with torch.no_grad():
            return distillation_kl(model.train()(inputs), target).item()  # train mode, as in the step

    after, (first, last) = algorithm.distil("resnet5", start, target, 1)
    assert first == pytest.approx(kl(start), rel=1e-5) and first == last
    assert kl(after) < kl(start)
    assert any(not torch.equal(after[k], start[k]) for k in start)


# ---------------------------------------------------------------- the prototypes and the clients

def test_prototypes_have_each_architectures_keys_and_shapes_and_stay_so_after_a_round():
    sim, global_state = _simulation("feddf")
    expected = {**prefixed("smallcnn", _model("smallcnn").state_dict()),
                **prefixed("resnet5", _model("resnet5").state_dict())}
    assert {k: v.shape for k, v in global_state.items()} == {k: v.shape for k, v in expected.items()}
    message = sim.algorithm.server_message(1, global_state, {})
    replies = [sim.run_client(ClientTask(1, k, message, {}), evaluate_local=False).reply for k in range(4)]
    new_state, info = sim.algorithm.aggregate(1, global_state, replies, {})
    shapes = lambda state: {k: (v.shape, v.dtype) for k, v in state.items()}  # noqa: E731
    assert shapes(new_state) == shapes(global_state)
    assert set(info["distillation_kl"]) == {"smallcnn", "resnet5"}
    assert all(math.isfinite(v) for pair in info["distillation_kl"].values() for v in pair)
    assert any(not torch.equal(new_state[k], global_state[k]) for k in global_state if k.startswith("smallcnn."))


def test_a_client_loads_exactly_its_architectures_prototype():
    sim, global_state = _simulation("feddf")
    message = sim.algorithm.server_message(1, global_state, {})
    state: dict = {}
    reply = sim.run_client(ClientTask(1, 1, message, state), evaluate_local=False).reply
    assert set(reply.arrays) == {k for k in global_state if k.startswith("resnet5.")}
    mine = prototype(global_state, "resnet5")
    assert set(state["prototype"]) == set(mine) and all(torch.equal(state["prototype"][k], mine[k]) for k in mine)
    # the other architecture's prototype is not read: breaking it changes nothing
    broken = {k: (torch.full_like(v, math.nan) if k.startswith("smallcnn.") and v.is_floating_point() else v)
              for k, v in global_state.items()}
    again = sim.run_client(ClientTask(1, 1, sim.algorithm.server_message(1, broken, {}), {}), False).reply
    assert all(torch.equal(again.arrays[k], reply.arrays[k]) for k in reply.arrays)


def test_replies_carry_one_whole_declared_prototype_and_broken_ones_are_rejected():
    sim, global_state = _simulation("feddf")
    algorithm = sim.algorithm
    reply = sim.run_client(ClientTask(1, 0, algorithm.server_message(1, global_state, {}), {}), False).reply
    assert set(reply.arrays) <= algorithm.declared_reply_keys(global_state)
    assert reply_problem(algorithm, reply, global_state) is None
    partial = ClientReply(0, dict(list(reply.arrays.items())[:3]), reply.metrics)
    mixed = ClientReply(0, {**reply.arrays, **{k: v for k, v in global_state.items() if k.startswith("resnet5.")}},
                        reply.metrics)
    for bad in (partial, mixed, ClientReply(0, {}, reply.metrics)):
        assert "exactly one architecture's whole state dict" in reply_problem(algorithm, bad, global_state)


def test_pfeddf_keeps_its_fine_tuned_copy_and_uploads_the_feddf_model():
    sim, global_state = _simulation("pfeddf")
    feddf_sim, _ = _simulation("feddf")
    message = sim.algorithm.server_message(1, global_state, {})
    state: dict = {}
    result = sim.run_client(ClientTask(1, 2, message, state), evaluate_local=True)
    feddf_reply = feddf_sim.run_client(ClientTask(1, 2, message, {}), evaluate_local=False).reply
    # the upload is FedDF's (the fine-tuning comes after it, on the same generator)
    assert result.reply.arrays.keys() == feddf_reply.arrays.keys()
    assert all(torch.equal(result.reply.arrays[k], feddf_reply.arrays[k]) for k in feddf_reply.arrays)
    personal = state["personal"]
    assert set(state) == {"personal", "optimizer-local", "optimizer-finetune", SELECTED_LOCAL}
    assert sim.algorithm.local_model_state(result.reply, state) is personal
    received = prototype(global_state, "smallcnn")
    assert any(not torch.equal(personal[k], received[k]) for k in received)  # fine-tuned
    for array in result.reply.arrays.values():  # the personalised copy never leaves the client
        assert not any(array.shape == t.shape and torch.equal(array, t) for t in personal.values() if t.numel() > 1)
    assert {r["model"] for r in result.rows} == {"local"} and result.reply.metrics["finetune-steps"] > 0


# ---------------------------------------------------------------- whole runs

def _run(tmp_path, name, method):
    cfg = build_config(applicable({**TINY, "method": method}))
    run_dir = RunDirectory.create(tmp_path / name)
    run_dir.write_config(cfg.to_dict())
    return run_dir, run(cfg, run_dir)


@pytest.mark.parametrize("method", ["feddf", "pfeddf"])
def test_a_run_finishes_scores_each_local_model_and_repeats_bit_for_bit(tmp_path, method):
    first, summary = _run(tmp_path, "first", method)
    second, _ = _run(tmp_path, "second", method)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(first.read_rows()) == strip(second.read_rows())
    local = [r for r in first.read_rows() if r["scope"] == "client" and r.get("model") == "local"
             and r["split"] == "test" and r.get("data") == "client"]
    assert {(r["round"], r["client"]) for r in local} == {(rd, k) for rd in (1, 2) for k in range(4)}
    aggregation = [r for r in first.read_rows() if r["scope"] == "aggregation"]
    assert [r["round"] for r in aggregation] == [1, 2] and all(set(r["distillation_kl"]) == {"smallcnn", "resnet5"}
                                                               for r in aggregation)
    assert summary["mode"] == "local" and set(summary["per_client_final"]) == {0, 1, 2, 3}
    for k, arch in enumerate(ARCHS):
        saved = torch.load(first.client_model_path(k), weights_only=False)
        assert saved["model"] == arch
        _model(arch).load_state_dict(saved["state_dict"])
        again = torch.load(second.client_model_path(k), weights_only=False)["state_dict"]
        assert all(torch.equal(saved["state_dict"][n], again[n]) for n in again)
    last = torch.load(first.checkpoints_dir / "last.pt", weights_only=False)["global_state"]
    again = torch.load(second.checkpoints_dir / "last.pt", weights_only=False)["global_state"]
    assert all(torch.equal(last[k], again[k]) for k in last)
