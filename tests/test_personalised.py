"""The personalised baselines FedRep, LG-FedAvg, APFL and Ditto.

Server rules by hand on a tiny model; each client update checked against its paper's update on the
tiny synthetic data (or against FedAvg's client on the same batches); short runs that must be
reproducible bit for bit."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fedward.algorithms import ClientReply, ServerMessage, TaskSpec, Workspace, get_algorithm
from fedward.algorithms.apfl import apfl_step
from fedward.config import build_config
from fedward.engine.setup import initial_global_state, load_data
from fedward.engine.simulation import ClientTask, Simulation, run
from fedward.errors import ConfigError
from fedward.seeding import torch_generator
from fedward.tracking import RunDirectory

METHODS = ("fedrep", "lgfedavg", "apfl", "ditto")
HEAD = {"fc.weight", "fc.bias"}


class Tiny(nn.Module):
    """A body (BatchNorm) and a head (``fc``)."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm1d(2)
        self.fc = nn.Linear(2, 1)


SPEC = TaskSpec(num_classes=2, image_size=8, class_names=["a", "b"], mean=(0.5,) * 3, std=(0.25,) * 3,
                train_class_counts=[[5, 5], [5, 5]], global_class_counts=[10, 10])


def tiny_algorithm(method: str, **options):
    algorithm = get_algorithm(method)(build_config({"method": method, **options}), SPEC, Tiny)
    torch.manual_seed(0)
    return algorithm, {k: v.clone() for k, v in Tiny().state_dict().items()}


def client_sim(method: str, values: dict, **options):
    cfg = build_config({**values, "method": method, **options})
    sim = Simulation(cfg, load_data(cfg), "cpu")
    x, _ = initial_global_state(cfg, sim.build_model)
    return cfg, sim, x


def update(sim: Simulation, round_index: int, client: int, arrays, state) -> ClientReply:
    return sim.run_client(ClientTask(round_index, client, ServerMessage(round_index, arrays), state), False).reply


def equal(a, b, keys=None) -> bool:
    return all(torch.equal(a[k], b[k]) for k in (a if keys is None else keys))


# -- server rules ------------------------------------------------------------------------------------
SHARED = {"fedrep": {"bn.weight", "bn.bias", "bn.running_mean", "bn.running_var", "bn.num_batches_tracked"},
          "lgfedavg": HEAD, "apfl": None, "ditto": None}  # None: the whole state dict


@pytest.mark.parametrize("method", METHODS)
def test_aggregate_averages_the_shared_part_by_examples_and_keeps_the_rest(method):
    algorithm, x = tiny_algorithm(method)
    shared = SHARED[method] or set(x)
    assert algorithm.declared_reply_keys(x) == shared
    replies = [ClientReply(k, {name: x[name] + shift if x[name].is_floating_point() else x[name] + k + 1
                               for name in x if name in shared}, {"num-examples": n})
               for k, (shift, n) in enumerate([(1.0, 10.0), (3.0, 30.0)])]
    new, info = algorithm.aggregate(1, x, replies, {})
    assert info["weights"] == [0.25, 0.75] and list(new) == list(x)
    for name in x:
        if name not in shared:
            assert torch.equal(new[name], x[name]), name  # the personal part of the global model is untouched
        elif x[name].is_floating_point():
            assert torch.allclose(new[name], x[name] + 2.5), name  # 0.25 * 1 + 0.75 * 3
        else:
            assert int(new[name]) == int(x[name]) + 1, name  # 0.25 * 1 + 0.75 * 2 = 1.75, truncated


@pytest.mark.parametrize("method", ["fedrep", "lgfedavg"])
def test_a_model_without_fc_cannot_be_split(method, monkeypatch):
    cls = get_algorithm(method)
    monkeypatch.setattr(cls, "model_builder", classmethod(lambda _cls, cfg, spec: lambda: nn.Linear(2, 2)))
    with pytest.raises(ConfigError, match="has no `fc`"):
        cls.prepare_run(build_config({"method": method}), SPEC, 2)


# -- FedRep ------------------------------------------------------------------------------------------
def test_fedrep_trains_the_head_on_the_frozen_body_then_the_body_under_the_frozen_head(tiny_values):
    cfg, sim, x = client_sim("fedrep", tiny_values, head_epochs=2)
    algorithm, client = sim.algorithm, sim.client(1)
    body = set(x) - HEAD
    # The head stage alone, with the generator the update will get.
    alone: dict = {}
    generator = torch_generator(cfg.seed, "client-train", 1, 1)
    algorithm.train_head(sim.workspace, client, ServerMessage(1, x), alone, generator)
    for name, param in sim.workspace.model.named_parameters():
        assert torch.equal(param.detach(), x[name]) == (name not in HEAD), name  # only the head moved
    state: dict = {}
    reply = update(sim, 1, 1, x, state)
    assert set(reply.arrays) == body == algorithm.declared_reply_keys(x)
    assert equal(state["head"], alone["head"])  # the body stage left the head as the head stage made it
    assert not torch.equal(reply.arrays["conv1.weight"], x["conv1.weight"])
    # The body stage starts from the received body: its BatchNorm counters count the body's steps only.
    assert int(reply.arrays["bn1.num_batches_tracked"]) == int(x["bn1.num_batches_tracked"]) + reply.metrics["steps"]
    assert reply.metrics["head-train-loss"] > 0
    local = algorithm.local_model_state(reply, state)
    assert set(local) == set(x) and equal(local, reply.arrays, body) and equal(local, state["head"], HEAD)
    # From round 2 the client's own head is used: whatever head the global model holds is ignored.
    global_2 = {**x, **reply.arrays}
    other_head = {**global_2, **{k: torch.zeros_like(x[k]) for k in HEAD}}
    first = update(sim, 2, 1, global_2, copy.deepcopy(state))
    second = update(sim, 2, 1, other_head, copy.deepcopy(state))
    assert equal(first.arrays, second.arrays)


# -- LG-FedAvg ---------------------------------------------------------------------------------------
def test_lgfedavg_sends_the_head_and_keeps_its_body(tiny_values):
    _, sim, x = client_sim("lgfedavg", tiny_values)
    state: dict = {}
    reply = update(sim, 1, 1, x, state)
    assert set(reply.arrays) == HEAD == sim.algorithm.declared_reply_keys(x)
    # Round 1 is FedAvg's update of the whole model (same generator), split in two.
    _, fedavg, _ = client_sim("fedavg", tiny_values)
    plain = update(fedavg, 1, 1, x, {}).arrays
    assert equal(reply.arrays, plain, HEAD) and equal(state["body"], plain, set(x) - HEAD)
    assert equal(sim.algorithm.local_model_state(reply, state), plain)
    # From round 2 the body comes from the client's state: the global model's body is ignored.
    global_2 = {**x, **reply.arrays}
    other_body = {k: v if k in HEAD else torch.zeros_like(v) for k, v in global_2.items()}
    first = update(sim, 2, 1, global_2, copy.deepcopy(state))
    second = update(sim, 2, 1, other_body, copy.deepcopy(state))
    assert equal(first.arrays, second.arrays)


# -- APFL --------------------------------------------------------------------------------------------
def linear(weight: float) -> nn.Linear:
    model = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(weight)
    return model


def step(w: float, v: float, alpha: float, target: float, alpha_lr: float | None):
    w_model, v_model = linear(w), linear(v)
    alpha_t = torch.tensor(alpha, requires_grad=alpha_lr is not None)
    optimizer = torch.optim.SGD([*w_model.parameters(), *v_model.parameters()], lr=0.01)
    losses = apfl_step(w_model, v_model, alpha_t, torch.tensor([[2.0]]), torch.tensor([[target]]), nn.MSELoss(),
                       optimizer, alpha_lr=alpha_lr)
    return w_model.weight.item(), v_model.weight.item(), alpha_t.item(), [float(loss) for loss in losses]


def test_apfl_step_by_hand_on_a_linear_model():
    # w = 1, v = 3, alpha = 0.5, x = 2, y = 1, squared error, SGD at lr 0.01:
    # w x = 2: loss 1, dL/dw = 2 (2 - 1) 2 = 4                        -> w = 1 - 0.01 * 4 = 0.96
    # vbar = 0.5 * 3 + 0.5 * 1 = 2, vbar x = 4: loss 9, dL/dvbar = 2 (4 - 1) 2 = 12
    # dL/dv = alpha * 12 = 6                                            -> v = 3 - 0.01 * 6 = 2.94
    # dL/dalpha = <v - w, 12> = 2 * 12 = 24                             -> alpha = 0.5 - 0.01 * 24 = 0.26
    w, v, alpha, losses = step(1.0, 3.0, 0.5, 1.0, alpha_lr=0.01)
    assert losses == [1.0, 9.0]
    assert (w, v, alpha) == pytest.approx((0.96, 2.94, 0.26), abs=1e-6)
    # a fixed alpha does not move; v's step is the same
    assert step(1.0, 3.0, 0.5, 1.0, alpha_lr=None)[1:3] == pytest.approx((2.94, 0.5), abs=1e-6)
    # alpha stays in [0, 1]: 0.5 - 0.1 * 24 < 0, and with y = 10, dL/dalpha = 2 * 2 (4 - 10) 2 = -48: 0.5 + 4.8 > 1
    assert step(1.0, 3.0, 0.5, 1.0, alpha_lr=0.1)[2] == 0.0
    assert step(1.0, 3.0, 0.5, 10.0, alpha_lr=0.1)[2] == 1.0


def test_apfl_mixture_by_hand():
    algorithm, x = tiny_algorithm("apfl")
    personal = {k: torch.full_like(t, 3.0) if t.is_floating_point() else t + 5 for k, t in x.items()}
    shared = {k: torch.full_like(t, 1.0) if t.is_floating_point() else t + 2 for k, t in x.items()}
    buffers = {"bn.running_mean", "bn.running_var", "bn.num_batches_tracked"}
    for alpha, expected in ((0.0, 1.0), (1.0, 3.0), (0.25, 1.5)):  # 0.25 * 3 + 0.75 * 1 = 1.5
        mixed = algorithm.mixture(personal, shared, alpha)
        assert list(mixed) == list(x)
        assert all(torch.equal(mixed[k], torch.full_like(x[k], expected)) for k in set(x) - buffers), alpha
        assert equal(mixed, personal, buffers)  # v's BatchNorm statistics are vbar's


def test_apfl_client_mixture_is_w_at_alpha_0_and_v_at_alpha_1(tiny_values):
    _, sim, x = client_sim("apfl", tiny_values, apfl_alpha=0.0)
    state: dict = {}
    reply = update(sim, 1, 1, x, state)
    assert set(reply.arrays) == set(x) and state["alpha"] == 0.0
    # vbar = w; in round 1 v starts at w, so even its statistics (of vbar = w's activations) are w's
    assert equal(state["mixed"], reply.arrays)
    # vbar = v, whose gradient is then plain grad f(v): from v = w it takes w's very steps
    _, sim, x = client_sim("apfl", tiny_values, apfl_alpha=1.0)
    state = {}
    reply = update(sim, 1, 1, x, state)
    assert equal(state["mixed"], state["personal"]) and equal(state["personal"], reply.arrays)
    names = sim.algorithm.parameter_names
    state = {"personal": {k: v + 0.01 if k in names else v.clone() for k, v in x.items()}}
    reply = update(sim, 1, 1, x, state)
    assert equal(state["mixed"], state["personal"]) and not equal(state["mixed"], reply.arrays, names)
    assert sim.algorithm.local_model_state(reply, state) is state["mixed"]


def test_apfl_adaptive_alpha_moves_and_stays_in_the_unit_interval(tiny_values):
    _, sim, x = client_sim("apfl", tiny_values, apfl_adaptive_alpha=True, lr=0.05)
    state: dict = {}
    reply = update(sim, 1, 1, x, state)
    assert 0.0 <= state["alpha"] <= 1.0 and state["alpha"] != 0.5 and reply.metrics["alpha"] == state["alpha"]
    update(sim, 2, 1, reply.arrays, state)  # the next round starts from the client's own alpha
    assert 0.0 <= state["alpha"] <= 1.0 and state["alpha"] != reply.metrics["alpha"]


# -- Ditto -------------------------------------------------------------------------------------------
def test_ditto_penalty_and_its_gradient_by_hand():
    algorithm, w = tiny_algorithm("ditto", ditto_lambda=0.5)
    model = Tiny()
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(w[name] + 0.2)
    penalty = algorithm.personal_penalty(Workspace(Tiny, torch.device("cpu"), None), model, ServerMessage(1, w))
    value = penalty(None, None)
    value.backward()
    # 7 numbers (bn.weight 2, bn.bias 2, fc.weight 2, fc.bias 1), each 0.2 from w:
    # (0.5 / 2) * 7 * 0.2^2 = 0.07; its gradient lambda (v - w) = 0.5 * 0.2 = 0.1 everywhere
    assert float(value.detach()) == pytest.approx(0.07)
    assert all(torch.allclose(p.grad, torch.full_like(p, 0.1)) for p in model.parameters())
    assert tiny_algorithm("ditto", ditto_lambda=0.0)[0].personal_penalty(None, model, ServerMessage(1, w)) is None


ONE_BATCH = dict(batch_size=10_000, lr=0.05, augment=False, momentum=0.0, nesterov=False, wd=0.0)


def test_ditto_personal_step_adds_lambda_times_v_minus_w(tiny_values):
    """One plain SGD step on the whole train split from v = w + delta: lambda only adds -lr lambda delta."""
    moved = {}
    for lam in (0.0, 0.5):
        cfg, sim, x = client_sim("ditto", tiny_values, ditto_lambda=lam, **ONE_BATCH)
        names = sim.algorithm.parameter_names
        state = {"personal": {k: v + 0.01 if k in names else v.clone() for k, v in x.items()}}
        update(sim, 1, 1, x, state)
        moved[lam] = state["personal"]
    for k in names:
        assert torch.allclose(moved[0.5][k] - moved[0.0][k], torch.full_like(x[k], -0.05 * 0.5 * 0.01), atol=1e-6), k


def test_ditto_without_lambda_trains_the_personal_model_as_fedavg_trains_w(tiny_values):
    _, sim, x = client_sim("ditto", tiny_values, ditto_lambda=0.0)
    state: dict = {}
    reply = update(sim, 1, 1, x, state)
    assert set(reply.arrays) == set(x) and "personal-train-loss" in reply.metrics
    _, fedavg, _ = client_sim("fedavg", tiny_values)
    assert equal(state["personal"], update(fedavg, 1, 1, x, {}).arrays)  # same generator, same steps
    assert sim.algorithm.local_model_state(reply, state) is state["personal"]


# -- short runs --------------------------------------------------------------------------------------
def _run(tmp_path, name, values):
    cfg = build_config(values)
    run_dir = RunDirectory.create(tmp_path / name)
    run_dir.write_config(cfg.to_dict())
    run(cfg, run_dir)
    return run_dir


@pytest.mark.parametrize("method", METHODS)
def test_a_short_run_scores_every_local_model_and_is_reproducible(tmp_path, tiny_values, method):
    values = {**tiny_values, "method": method, "eval_every": 0, **({"head_epochs": 1} if method == "fedrep" else {})}
    a, b = _run(tmp_path, "a", values), _run(tmp_path, "b", values)
    rows = [{k: v for k, v in r.items() if k != "seconds"} for r in a.read_rows()]
    assert rows == [{k: v for k, v in r.items() if k != "seconds"} for r in b.read_rows()]
    clients = range(load_data(build_config(values)).num_clients)
    scored = {(r["client"], r["split"]) for r in rows
              if r["scope"] == "client" and r["model"] == "local" and r["data"] == "client" and r["round"] == 2}
    assert scored == {(k, split) for k in clients for split in ("val", "test")}
    assert not any(r.get("model") == "global" for r in rows)  # personalised: only the local models are scored
    _, _, x = client_sim(method, values)
    for k in clients:  # each client's deliverable: a whole state dict of the model, the same in both runs
        saved_a = torch.load(a.client_model_path(k), weights_only=False)["state_dict"]
        saved_b = torch.load(b.client_model_path(k), weights_only=False)["state_dict"]
        assert set(saved_a) == set(x) and equal(saved_a, saved_b)


def test_each_clients_selected_round_predictions_are_its_local_models_at_that_round(tmp_path, tiny_values):
    """predictions_local_selected.csv: per client, its local model's per-image predictions at the
    round the summary selects for it (its own validation balanced accuracy), also after a resume."""
    import csv
    import json

    from fedward.metrics import confusion_matrix

    values = {**tiny_values, "method": "ditto", "comm_round": 4, "eval_every": 1, "lr": 0.05}
    full = _run(tmp_path, "full", values)
    chosen = json.loads(full.results_path.read_text())["per_client_selected_round"]
    assert any(r < values["comm_round"] for r in chosen.values())  # not simply the final round
    with open(full.path / "predictions_local_selected.csv", newline="") as handle:
        lines = list(csv.DictReader(handle))
    rows = [r for r in full.read_rows() if r["scope"] == "client" and r["model"] == "local" and r["data"] == "client"]
    for client, selected in chosen.items():
        mine = [line for line in lines if line["client"] == str(client)]
        assert {line["round"] for line in mine} == {str(selected)}
        for split in ("val", "test"):
            (row,) = [r for r in rows if r["client"] == int(client) and r["round"] == selected and r["split"] == split]
            part = [line for line in mine if line["split"] == split]
            labels, preds = [int(line["label"]) for line in part], [int(line["prediction"]) for line in part]
            assert confusion_matrix(labels, preds, 8).tolist() == row["confusion_matrix"]

    from test_engine import _crashed_after

    cfg, crashed = _crashed_after(tmp_path, values, 2)
    run(cfg, RunDirectory.open_existing(tmp_path / "crashed"), resume=True)
    assert (crashed.path / "predictions_local_selected.csv").read_text() == \
        (full.path / "predictions_local_selected.csv").read_text()
