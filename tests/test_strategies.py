"""FLamby's strategy set as plugins: FedAdam, FedYogi, FedAdagrad, FedAvgM, SCAFFOLD, Cyclic.

Server rules are checked by hand on a tiny model whose every parameter moves by the same known
amount; the client side of SCAFFOLD against FedAvg's client on the same batch."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fedward.algorithms import ClientReply, ServerMessage, TaskSpec, get_algorithm
from fedward.config import build_config
from fedward.engine.setup import initial_global_state, load_data
from fedward.engine.simulation import ClientTask, Simulation

NEW_METHODS = ("fedadam", "fedyogi", "fedadagrad", "fedavgm", "scaffold", "cyclic")


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(2, 1)
        self.bn = nn.BatchNorm1d(1)


SPEC = TaskSpec(num_classes=2, image_size=8, class_names=["a", "b"], mean=(0.5,) * 3, std=(0.25,) * 3,
                train_class_counts=[[5, 5], [5, 5], [5, 5], [5, 5]], global_class_counts=[20, 20])


def server(method: str, **options):
    cfg = build_config({"method": method, **options})
    algorithm = get_algorithm(method)(cfg, SPEC, Tiny)
    torch.manual_seed(0)
    global_state = {k: v.clone() for k, v in Tiny().state_dict().items()}
    return algorithm, global_state, algorithm.initial_server_state(global_state)


def replies_moving_by(global_state, shifts, counts=None):
    """Client k's reply: every float array of the global model + shifts[k]; BN's counter + k + 1."""
    counts = counts or [10.0] * len(shifts)
    out = []
    for k, (shift, n) in enumerate(zip(shifts, counts)):
        arrays = {name: (t + shift if t.is_floating_point() else t + k + 1) for name, t in global_state.items()}
        out.append(ClientReply(client_id=k, arrays=arrays, metrics={"num-examples": n}))
    return out


PARAMS = ("fc.weight", "fc.bias", "bn.weight", "bn.bias")


def moved(new, old):
    """The one amount every parameter moved by (asserting it is the same for all)."""
    amounts = torch.cat([(new[k].double() - old[k].double()).flatten() for k in PARAMS])
    assert float(amounts.max() - amounts.min()) < 1e-6, amounts  # float32 rounding only
    return float(amounts.mean())


def test_buffers_take_the_plain_average_under_every_server_optimizer():
    for method in ("fedadam", "fedyogi", "fedadagrad", "fedavgm", "scaffold"):
        algorithm, x, state = server(method)
        replies = replies_moving_by(x, [1.0, 3.0])
        if method == "scaffold":
            for r in replies:
                r.arrays.update({f"control/{k}": torch.zeros_like(x[k]) for k in PARAMS})
        new, info = algorithm.aggregate(1, x, replies, state)
        assert info["weights"] == [0.5, 0.5]
        assert torch.allclose(new["bn.running_mean"], x["bn.running_mean"] + 2.0)  # mean of +1 and +3
        assert int(new["bn.num_batches_tracked"]) == int(x["bn.num_batches_tracked"]) + 1  # 1.5, truncated


def test_fedadam_two_rounds_by_hand():
    algorithm, x0, state = server("fedadam")
    # Round 1: Delta = 2; m = 0.1 * 2 = 0.2; v = 0.01 * 4 = 0.04;
    # eta_1 = 0.1 * sqrt(1 - 0.99) / (1 - 0.9) = 0.1; step = 0.1 * 0.2 / (0.2 + 0.001) = 0.0995025
    x1, _ = algorithm.aggregate(1, x0, replies_moving_by(x0, [1.0, 3.0]), state)
    assert moved(x1, x0) == pytest.approx(0.0995025, abs=1e-6)
    assert state["t"] == 1 and float(state["m"]["fc.bias"]) == pytest.approx(0.2)
    # Round 2, Delta = 2 again: m = 0.18 + 0.2 = 0.38; v = 0.0396 + 0.04 = 0.0796;
    # eta_2 = 0.1 * sqrt(1 - 0.9801) / (1 - 0.81)
    x2, _ = algorithm.aggregate(2, x1, replies_moving_by(x1, [1.0, 3.0]), state)
    assert moved(x2, x1) == pytest.approx(0.1 * math.sqrt(0.0199) / 0.19 * 0.38 / (math.sqrt(0.0796) + 1e-3), abs=1e-6)
    # Without bias correction (FLamby): eta = 0.1 -> 0.1 * 0.2 / (0.2 + 0.001), the same first step
    plain, y0, plain_state = server("fedadam", bias_correction=False)
    y1, _ = plain.aggregate(1, y0, replies_moving_by(y0, [1.0, 3.0]), plain_state)
    assert moved(y1, y0) == pytest.approx(0.1 * 0.2 / 0.201, abs=1e-6)


def test_fedyogi_and_fedadagrad_by_hand():
    yogi, x0, state = server("fedyogi")
    x1, _ = yogi.aggregate(1, x0, replies_moving_by(x0, [1.0, 3.0]), state)
    # v = 0 - 0.01 * 4 * sign(0 - 4) = 0.04; m = 0.2; eta 0.01
    assert moved(x1, x0) == pytest.approx(0.01 * 0.2 / (0.2 + 1e-3), abs=1e-7)
    x2, _ = yogi.aggregate(2, x1, replies_moving_by(x1, [1.0, 3.0]), state)
    # v = 0.04 - 0.04 * sign(0.04 - 4) = 0.08; m = 0.38
    assert float(state["v"]["fc.bias"]) == pytest.approx(0.08)
    assert moved(x2, x1) == pytest.approx(0.01 * 0.38 / (math.sqrt(0.08) + 1e-3), abs=1e-7)
    adagrad, z0, state = server("fedadagrad")
    z1, _ = adagrad.aggregate(1, z0, replies_moving_by(z0, [1.0, 3.0]), state)
    assert moved(z1, z0) == pytest.approx(0.1 * 2 / (2 + 1e-3), abs=1e-6)  # beta1 0: m = Delta = 2; v = 4
    z2, _ = adagrad.aggregate(2, z1, replies_moving_by(z1, [-1.0, -1.0]), state)
    assert moved(z2, z1) == pytest.approx(0.1 * -1 / (math.sqrt(5) + 1e-3), abs=1e-6)  # v = 4 + 1


def test_fedavgm_by_hand_and_weighted_by_examples():
    algorithm, x0, state = server("fedavgm")
    # weights 1/4, 3/4: average shift 0.25 * 1 + 0.75 * 3 = 2.5; u = -2.5; x + 2.5 (FedAvg's step)
    x1, info = algorithm.aggregate(1, x0, replies_moving_by(x0, [1.0, 3.0], counts=[10.0, 30.0]), state)
    assert info["weights"] == [0.25, 0.75] and moved(x1, x0) == pytest.approx(2.5)
    x2, _ = algorithm.aggregate(2, x1, replies_moving_by(x1, [2.0, 2.0]), state)
    assert moved(x2, x1) == pytest.approx(0.9 * 2.5 + 2.0)  # u = 0.9 * (-2.5) - 2


def test_scaffold_server_update_by_hand():
    algorithm, x0, state = server("scaffold", server_lr=0.5)
    replies = replies_moving_by(x0, [1.0, 3.0])
    for r, delta in zip(replies, (0.2, 0.6)):
        r.arrays.update({f"control/{k}": torch.full_like(x0[k], delta) for k in PARAMS})
    message = algorithm.server_message(1, x0, state)
    assert set(message.arrays) == set(x0) | {f"control/{k}" for k in PARAMS}
    x1, _ = algorithm.aggregate(1, x0, replies, state)
    assert moved(x1, x0) == pytest.approx(0.5 * 2.0)  # x + eta_g * mean shift
    # c <- 0 + (|S| / N) * mean(Delta c) = (2 / 4) * 0.4
    assert torch.allclose(state["control"]["fc.weight"], torch.full((1, 2), 0.2))


def _one_batch_client(method, **extra):
    values = dict(model="smallcnn", image_size=8, data_scale=0.03, batch_size=10_000, epochs=1, lr=0.05, adam=False,
                  augment=False, progress=False, threads=1, momentum=0.0, nesterov=False, method=method, **extra)
    cfg = build_config(values)
    sim = Simulation(cfg, load_data(cfg), "cpu")
    x, _ = initial_global_state(cfg, sim.build_model)
    return cfg, sim, x


def test_scaffold_client_corrects_every_step_and_updates_its_control_by_option_ii():
    cfg, sim, x = _one_batch_client("scaffold")
    names = sim.algorithm.parameter_names
    c = {k: torch.full_like(x[k], 0.01) for k in names}
    message = ServerMessage(1, {**x, **{f"control/{k}": v for k, v in c.items()}})
    state = {}
    reply = sim.run_client(ClientTask(1, 0, message, state), False).reply
    # FedAvg's client, same batch, same plain SGD: its only difference is the correction -lr * (c - c_i)
    fcfg, fsim, fx = _one_batch_client("fedavg")
    assert all(torch.equal(x[k], fx[k]) for k in x)
    plain = fsim.run_client(ClientTask(1, 0, ServerMessage(1, fx), {}), False).reply
    for k in names:
        assert torch.allclose(reply.arrays[k] - plain.arrays[k], -cfg.lr * c[k], atol=1e-6), k
    # one step (K = 1): c_i+ = 0 - c + (x - y) / lr, sent as Delta c_i = c_i+ - 0, kept on the client
    for k in names:
        expected = -c[k] + (x[k] - reply.arrays[k]) / cfg.lr
        assert torch.allclose(reply.arrays[f"control/{k}"], expected, atol=1e-4), k
        assert torch.equal(state["control"][k], reply.arrays[f"control/{k}"])


def test_cyclic_visits_every_client_once_per_cycle_in_a_seeded_order():
    algorithm, x0, state = server("cyclic", seed=3)
    order = [algorithm.select_clients(r, [0, 1, 2, 3], state)[0] for r in range(1, 13)]
    cycles = [order[i:i + 4] for i in range(0, 12, 4)]
    assert all(sorted(cycle) == [0, 1, 2, 3] for cycle in cycles)
    assert len({tuple(c) for c in cycles}) > 1  # a new permutation per cycle
    again, _, _ = server("cyclic", seed=3)
    assert [again.select_clients(r, [0, 1, 2, 3], {})[0] for r in range(1, 13)] == order
    fixed, _, _ = server("cyclic", deterministic_cycle=True)
    assert [fixed.select_clients(r, [0, 1, 2, 3], {})[0] for r in range(1, 9)] == [0, 1, 2, 3] * 2
    (reply,) = replies_moving_by(x0, [1.0])
    new, info = algorithm.aggregate(1, x0, [reply], state)
    assert info["weights"] == [1.0] and all(torch.equal(new[k], reply.arrays[k]) for k in x0)


def test_new_methods_are_modules_of_at_most_150_lines():
    from pathlib import Path

    import fedward.algorithms as package

    for module in ("fedopt", "fedavgm", "scaffold", "cyclic"):
        lines = (Path(package.__file__).parent / f"{module}.py").read_text().count("\n")
        assert lines <= 150, (module, lines)
