"""The public-data baselines fedmd, dsfl and ktpfl: each server aggregate and KT-pFL's coefficient
step by hand, what a reply carries, the public set a client uses, and whole runs (local rows,
bit-for-bit reproducible, KT-pFL resumed with its coefficients)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from fedward.algorithms import ClientReply, TaskSpec, get_algorithm
from fedward.algorithms.dsfl import entropy_reduction_average
from fedward.algorithms.ktpfl import COEFFICIENTS, coefficient_step, personalised_targets, project_rows_onto_simplex
from fedward.config import applicable_settings as applicable
from fedward.config import build_config
from fedward.data.augment import normalize
from fedward.data.public import load_public
from fedward.engine.replies import reply_problem
from fedward.engine.setup import load_data
from fedward.engine.simulation import ClientTask, Simulation, run
from fedward.errors import ConfigError, FedwardError
from fedward.tracking import RunDirectory

HETERO = dict(dataset="synthetic_multires", image_size=16, patients_scale=1.0,
              client_models="smallcnn,resnet5,smallcnn,resnet5", stem="small", comm_round=2, batch_size=16, epochs=1,
              progress=False, eval_batch_size=128, threads=1, public_size=64, public_batch_size=32,
              fedmd_public_subset=32)
METHODS = ("fedmd", "dsfl", "ktpfl")
SPEC = TaskSpec(num_classes=2, image_size=16, class_names=["benign", "malignant"], mean=(0.5, 0.5, 0.5),
                std=(0.25, 0.25, 0.25), train_class_counts=[[3, 1], [2, 2]], global_class_counts=[5, 3])


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread, as ``threads: 1`` gives a run: tiny models only lose from more."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def server(method, **values):
    """The method as the server holds it (two clients, no data)."""
    cfg = build_config(applicable({**HETERO, "method": method, **values}))
    return get_algorithm(method)(cfg, SPEC, lambda: None)


def reply(client_id, key, rows):
    return ClientReply(client_id, {key: torch.tensor(rows, dtype=torch.float32)}, {"num-examples": 10.0})


def simulation(method, **values):
    cfg = build_config(applicable({**HETERO, "method": method, **values}))
    data = load_data(cfg)
    return cfg, data, Simulation(cfg, data, "cpu")


# ---------------------------------------------------------------- server aggregates by hand

def test_fedmd_consensus_is_the_plain_mean_of_the_logits_on_the_rounds_subset():
    fedmd = server("fedmd", public_size=100, fedmd_public_subset=10)
    replies = [ClientReply(0, {"public-logits": torch.tensor([[1.0, 2.0], [3.0, 4.0]])}, {"num-examples": 5.0}),
               ClientReply(1, {"public-logits": torch.tensor([[3.0, -6.0], [5.0, 0.0]])}, {"num-examples": 50.0})]
    state, info = fedmd.aggregate(3, {}, replies, {})
    assert torch.equal(state["consensus"], torch.tensor([[2.0, -2.0], [4.0, 2.0]]))  # (1/m) sum, not by examples
    assert info["weights"] == [0.5, 0.5]
    sent = fedmd.server_message(3, {}, {}).arrays["public-index"]
    assert torch.equal(state["consensus-index"], sent)  # the subset the clients answered on
    assert len(set(sent.tolist())) == 10 and 0 <= int(sent.min()) and int(sent.max()) < 100
    # Next round: the consensus and its subset to digest, and a fresh subset to answer on.
    message = fedmd.server_message(4, state, {})
    assert set(message.arrays) == {"consensus", "consensus-index", "public-index"}
    assert not torch.equal(message.arrays["public-index"], sent)
    assert fedmd.reply_reference({}, {})["public-logits"].shape == (10, 2)
    assert server("fedmd", public_size=8, fedmd_public_subset=10).reply_rows() == 8  # at most the public set


def test_dsfl_sharpens_the_mean_probabilities_at_its_temperature():
    dsfl = server("dsfl", dsfl_temperature=0.25)
    replies = [reply(0, "public-probabilities", [[0.9, 0.1], [0.2, 0.8]]),
               reply(1, "public-probabilities", [[0.5, 0.5], [0.4, 0.6]])]
    state, info = dsfl.aggregate(1, {}, replies, {})
    # mean (0.7, 0.3) and (0.3, 0.7); softmax((0.7, 0.3) / 0.25) = softmax(2.8, 1.2)
    a = 1 / (1 + math.exp(-1.6))
    torch.testing.assert_close(state["soft-labels"], torch.tensor([[a, 1 - a], [1 - a, a]]))
    assert info["weights"] == [0.5, 0.5] and a > 0.7  # sharper than the mean
    # Probabilities lie in [0, 1], so only a low T sharpens: at T = 1 the mean is flattened.
    flat = 1 / (1 + math.exp(-0.4))
    torch.testing.assert_close(entropy_reduction_average(torch.tensor([[[0.7, 0.3]]]), 1.0),
                               torch.tensor([[flat, 1 - flat]]))
    assert flat < 0.7 and server("dsfl").cfg.dsfl_temperature == 0.1


def test_simplex_projection_by_hand():
    rows = torch.tensor([[0.2, 0.3, 0.5], [0.5, 0.5, 0.5], [1.5, 0.2, -0.4], [0.8, 0.6, -1.0]], dtype=torch.float64)
    expected = torch.tensor([[0.2, 0.3, 0.5], [1 / 3, 1 / 3, 1 / 3], [1.0, 0.0, 0.0], [0.6, 0.4, 0.0]],
                            dtype=torch.float64)
    torch.testing.assert_close(project_rows_onto_simplex(rows), expected)


def test_ktpfl_sends_each_client_its_own_target_only():
    algorithm = server("ktpfl")
    targets = torch.arange(2 * 3 * 2, dtype=torch.float32).reshape(2, 3, 2)
    message = algorithm.server_message(2, {"targets": targets}, {})
    for k in (0, 1):
        assert set(algorithm.client_message(message, k).arrays) == {"targets"}
        assert torch.equal(algorithm.client_message(message, k).arrays["targets"], targets[k])
    assert algorithm.client_message(algorithm.server_message(1, {}, {}), 0).arrays == {}


def test_ktpfl_personalised_targets_and_one_coefficient_step_by_hand():
    s = [[0.8, 0.2], [0.4, 0.6]]  # one public image, two clients' soft predictions
    soft = torch.tensor(s, dtype=torch.float64).reshape(2, 1, 2)
    c = [[0.75, 0.25], [0.5, 0.5]]
    coefficients = torch.tensor(c, dtype=torch.float64)
    # t_0 = 0.75 s_0 + 0.25 s_1 = (0.7, 0.3); t_1 = (0.6, 0.4)
    torch.testing.assert_close(personalised_targets(coefficients, soft).reshape(2, 2),
                               torch.tensor([[0.7, 0.3], [0.6, 0.4]], dtype=torch.float64))
    rho, lr = 0.7, 0.1
    t = [[0.7, 0.3], [0.6, 0.4]]
    expected = []
    for n in range(2):
        # dJ/dc_nm = sum_k s_m,k (log(t_n,k / s_n,k) + 1) + 2 rho (c_nm - 1/2); then back onto the simplex
        step = [c[n][m] - lr * (sum(s[m][k] * (math.log(t[n][k] / s[n][k]) + 1) for k in range(2))
                                + 2 * rho * (c[n][m] - 0.5)) for m in range(2)]
        shift = (sum(step) - 1) / 2
        expected.append([v - shift for v in step])
    new = coefficient_step(coefficients, soft, rho, lr)
    torch.testing.assert_close(new, torch.tensor(expected, dtype=torch.float64))
    # From uniform C (no penalty yet) each client's weight on its own predictions grows.
    uniform = coefficient_step(torch.full((2, 2), 0.5, dtype=torch.float64), soft, rho, lr)
    assert uniform[0, 0] > 0.5 and uniform[1, 1] > 0.5

    ktpfl = server("ktpfl", ktpfl_rho=rho, ktpfl_coef_lr=lr)
    server_state = ktpfl.initial_server_state({})
    assert torch.equal(server_state[COEFFICIENTS], torch.full((2, 2), 0.5, dtype=torch.float64))
    server_state[COEFFICIENTS] = coefficients
    replies = [reply(0, "public-soft-predictions", [s[0]]), reply(1, "public-soft-predictions", [s[1]])]
    state, info = ktpfl.aggregate(2, {}, replies, server_state)
    torch.testing.assert_close(server_state[COEFFICIENTS], new)
    torch.testing.assert_close(state["targets"], personalised_targets(new, soft).float())  # with the new C
    assert info["weights"] == pytest.approx(new.mean(0).tolist()) and sum(info["weights"]) == pytest.approx(1.0)
    with pytest.raises(FedwardError, match=r"only clients \[1\] of 2 replied"):
        ktpfl.aggregate(3, {}, replies[1:], server_state)


# ---------------------------------------------------------------- the client

@pytest.mark.parametrize("method", METHODS)
def test_a_reply_is_the_local_models_outputs_on_the_public_set_and_nothing_else(method):
    cfg, data, sim = simulation(method)
    algorithm = sim.algorithm
    public = load_public(cfg, data.class_names, labelled=method == "fedmd")
    assert torch.equal(algorithm.public.images, public.images) and torch.equal(algorithm.public.labels, public.labels)
    state: dict = {}
    message = algorithm.server_message(1, {}, {})
    reply_ = sim.run_client(ClientTask(1, 1, message, state), evaluate_local=False).reply
    assert set(reply_.arrays) == algorithm.declared_reply_keys({}) == {algorithm.reply_key}
    assert reply_problem(algorithm, reply_, {}, algorithm.reply_reference({}, {})) is None
    assert all(isinstance(v, float) for v in reply_.metrics.values())
    sent = reply_.arrays[algorithm.reply_key]
    # (P, K) floats: no image, no label; not any tensor of the local model
    assert sent.dtype == torch.float32 and tuple(sent.shape) == (algorithm.reply_rows(), 2)
    assert not any(sent.shape == t.shape and torch.equal(sent, t) for t in state["local"].values())
    # ... and exactly the local model's outputs on load_public's images (eval mode, normalised)
    model = algorithm.local_model(sim.workspace, 1)
    model.load_state_dict(state["local"])
    index = message.arrays.get("public-index", torch.arange(cfg.public_size))
    with torch.no_grad():
        logits = model.eval()(normalize(public.images[index], data.mean, data.std))
    expected = {"fedmd": logits, "dsfl": F.softmax(logits, 1), "ktpfl": F.softmax(logits / 10, 1)}[method]
    torch.testing.assert_close(sent, expected)


def test_round_one_is_private_training_and_fedmd_transfer_learns_first():
    def local_after_round_one(method, **values):
        _, _, sim = simulation(method, **values)
        state: dict = {}
        sim.run_client(ClientTask(1, 0, sim.algorithm.server_message(1, {}, {}), state), evaluate_local=False)
        return state["local"]

    dsfl = local_after_round_one("dsfl")
    for other in (local_after_round_one("ktpfl"), local_after_round_one("fedmd", fedmd_public_epochs=0)):
        assert all(torch.equal(dsfl[k], other[k]) for k in dsfl)
    transferred = local_after_round_one("fedmd")
    assert any(not torch.equal(dsfl[k], transferred[k]) for k in dsfl if dsfl[k].is_floating_point())


@pytest.mark.parametrize("method", METHODS)
def test_learning_from_the_aggregate_moves_the_outputs_towards_it(method):
    """An aggregate saying "class 1" for every public image: the client's class-1 probability on the
    public set ends higher with the distillation (digest) stage than without it."""
    epochs = {"fedmd": "fedmd_digest_epochs", "dsfl": "dsfl_distill_epochs", "ktpfl": "ktpfl_distill_epochs"}[method]

    def class_one_after(distill_epochs):
        _, _, sim = simulation(method, local_lr=3e-3, public_batch_size=16, **{epochs: distill_epochs})
        algorithm = sim.algorithm
        rows, class_one = algorithm.reply_rows(), torch.tensor([[0.0, 1.0]])
        if method == "fedmd":
            aggregate = {"consensus": (10 * class_one - 5).repeat(rows, 1),
                         "consensus-index": algorithm.round_subset(1)}
        elif method == "dsfl":
            aggregate = {"soft-labels": class_one.repeat(rows, 1)}
        else:
            aggregate = {"targets": class_one.repeat(4, rows, 1)}
        state = {"local": algorithm.initial_local_state(0)}  # past its first round: no transfer learning
        message = algorithm.client_message(algorithm.server_message(2, aggregate, {}), 0)
        sim.run_client(ClientTask(2, 0, message, state), evaluate_local=False)
        model = algorithm.local_model(sim.workspace, 0)
        model.load_state_dict(state["local"])
        return float(F.softmax(algorithm.public_logits(sim.workspace, model), 1)[:, 1].mean())

    assert class_one_after(6) > class_one_after(0) + 0.1


def _png(path, value):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((12, 12, 3), value, dtype=np.uint8)).save(path)


def test_fedmd_needs_labelled_public_data_and_the_others_do_not(tmp_path):
    for i in range(3):
        _png(tmp_path / "slides" / f"{i}.png", 40 * i)
    values = {"public_data": str(tmp_path), "public_size": 3}
    for method in METHODS:
        cfg = build_config(applicable({**HETERO, "method": method, **values}))
        if method == "fedmd":
            with pytest.raises(ConfigError, match="--method fedmd needs labelled public data"):
                get_algorithm(method).prepare_run(cfg, SPEC, 4)
            with pytest.raises(ConfigError, match="needs labelled public data"):
                get_algorithm(method)(cfg, SPEC, lambda: None).public
        else:
            get_algorithm(method).prepare_run(cfg, SPEC, 4)


def test_the_public_set_must_have_public_size_images(tmp_path):
    for i in range(3):
        _png(tmp_path / "slides" / f"{i}.png", 40 * i)
    cfg = build_config(applicable({**HETERO, "method": "dsfl", "public_data": str(tmp_path), "public_size": 5}))
    with pytest.raises(ConfigError, match="holds 3 images, not --public_size 5.*set --public_size 3"):
        get_algorithm("dsfl").prepare_run(cfg, SPEC, 4)
    # The built-in splits give exactly --public_size images (the synthetic one draws 48 at a time).
    cfg = build_config(applicable({**HETERO, "dataset": "synthetic", "method": "dsfl", "public_size": 64}))
    get_algorithm("dsfl").prepare_run(cfg, SPEC, 4)


# ---------------------------------------------------------------- whole runs

def _run(tmp_path, name, method, **kwargs):
    cfg = build_config(applicable({**HETERO, "method": method}))
    run_dir = RunDirectory.create(tmp_path / name)
    run_dir.write_config(cfg.to_dict())
    return run_dir, run(cfg, run_dir, **kwargs)


def _rows(run_dir):
    return [{k: v for k, v in row.items() if k != "seconds"} for row in run_dir.read_rows()]


class _Crash(Exception):
    pass


@pytest.mark.parametrize("method", METHODS)
def test_a_run_scores_each_local_model_and_repeats_bit_for_bit(tmp_path, monkeypatch, method):
    from fedward.engine import simulation as sim_module

    seen = []
    original = sim_module.Simulation.run_client

    def spy(self, task, evaluate_local):
        result = original(self, task, evaluate_local)
        seen.append((self.algorithm, result))
        return result

    monkeypatch.setattr(sim_module.Simulation, "run_client", spy)
    first, summary = _run(tmp_path, "first", method)
    monkeypatch.undo()
    assert len(seen) == 2 * 4
    for algorithm, result in seen:  # both rounds: the outputs on the public set, nothing else
        (name, sent), = result.reply.arrays.items()
        assert name == algorithm.reply_key and tuple(sent.shape) == (algorithm.reply_rows(), 2)
        assert not any(sent.shape == t.shape and torch.equal(sent, t) for t in result.state["local"].values())
    if method == "ktpfl":  # the second run is interrupted after round 1 and resumed: C is in the checkpoint
        def crash(round_index):
            if round_index == 1:
                raise _Crash

        with pytest.raises(_Crash):
            _run(tmp_path, "second", method, on_round_end=crash)
        saved = torch.load(tmp_path / "second" / "checkpoints" / "last.pt", weights_only=False)
        assert saved["round"] == 1 and saved["server_state"][COEFFICIENTS].shape == (4, 4)
        cfg = build_config(applicable({**HETERO, "method": method}))
        run(cfg, RunDirectory.open_existing(tmp_path / "second"), resume=True)
        second = RunDirectory.open_existing(tmp_path / "second")
    else:
        second, _ = _run(tmp_path, "second", method)
    assert summary["mode"] == "local"
    rows = first.read_rows()
    local = {(r["round"], r["client"]) for r in rows
             if r["scope"] == "client" and r.get("model") == "local" and r["split"] == "test" and r["data"] == "client"}
    assert local == {(r, k) for r in (1, 2) for k in range(4)}
    assert not [r for r in rows if r["scope"] == "server"]  # no global model is scored
    assert _rows(first) == _rows(second)
    for k in range(4):
        a = torch.load(first.client_model_path(k), weights_only=False)
        b = torch.load(second.client_model_path(k), weights_only=False)
        assert a["model"] == HETERO["client_models"].split(",")[k]
        assert all(torch.equal(a["state_dict"][key], b["state_dict"][key]) for key in a["state_dict"])
