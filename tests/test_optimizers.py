"""The local optimizer's defaults, and the reference's optimizer flags: --adamw and
--adjust_learning_rate's cosine schedule."""

from __future__ import annotations

import math

import pytest
import torch

from fedward.algorithms.base import make_optimizer, round_lr
from fedward.config import build_config
from fedward.engine.setup import initial_global_state, load_data
from fedward.engine.simulation import ClientTask, Simulation


def test_the_cosine_schedule_by_hand(tiny_values):
    cfg = build_config({**tiny_values, "lr": 3e-4, "comm_round": 100, "adjust_learning_rate": True})
    # 1e-4 + (3e-4 - 1e-4)(1 + cos(pi (r + 1) / 100)) / 2 at 0-based r = round - 1
    assert round_lr(cfg, 1) == pytest.approx(1e-4 + 1e-4 * (1 + math.cos(math.pi / 100)))  # 2.99951e-4
    assert round_lr(cfg, 50) == pytest.approx(2e-4)  # r = 49: cos(pi / 2) = 0
    assert round_lr(cfg, 100) == pytest.approx(1e-4)  # r = 99: the floor
    plain = build_config({**tiny_values, "lr": 3e-4, "comm_round": 100})
    assert round_lr(plain, 50) == 3e-4 and round_lr(cfg, None) == 3e-4


def test_the_default_is_adam_and_the_flags_choose_sgd_or_adamw():
    weight = torch.nn.Parameter(torch.tensor([2.0]))
    default = make_optimizer(build_config({}), [weight])
    assert type(default) is torch.optim.Adam and default.param_groups[0]["weight_decay"] == 0
    assert default.param_groups[0]["lr"] == build_config({}).lr
    sgd = make_optimizer(build_config({"adam": False, "lr": 3e-4}), [weight])  # the reference's argparse defaults
    assert type(sgd) is torch.optim.SGD
    assert {k: sgd.param_groups[0][k] for k in ("lr", "momentum", "nesterov", "weight_decay")} == {
        "lr": 3e-4, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-4}
    assert type(make_optimizer(build_config({"adamw": True}), [weight])) is torch.optim.AdamW  # over the default Adam
    scaffold = build_config({"method": "scaffold"})  # option II assumes SGD steps
    assert (scaffold.adam, scaffold.lr) == (False, 0.05)
    assert type(make_optimizer(scaffold, [weight])) is torch.optim.SGD


def test_adamw_decays_the_weights_at_wd(tiny_values):
    cfg = build_config({**tiny_values, "adamw": True, "lr": 0.1, "wd": 0.5})
    weight = torch.nn.Parameter(torch.tensor([2.0]))
    optimizer = make_optimizer(cfg, [weight])
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.param_groups[0]["weight_decay"] == 0.5
    weight.grad = torch.zeros(1)  # no gradient: only the decoupled decay moves it, w (1 - lr wd)
    optimizer.step()
    assert float(weight.detach()) == pytest.approx(2.0 * (1 - 0.1 * 0.5))


def test_a_client_trains_at_its_rounds_lr_also_after_loading_its_saved_optimizer(tiny_values):
    cfg = build_config({**tiny_values, "adam": True, "lr": 1e-3, "comm_round": 4, "adjust_learning_rate": True})
    sim = Simulation(cfg, load_data(cfg), "cpu")
    state, _ = initial_global_state(cfg, sim.build_model)
    client_state = {}
    for round_index in (1, 2):
        sim.run_client(ClientTask(round_index, 0, sim.algorithm.server_message(round_index, state, {}), client_state),
                       False)
        assert client_state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(round_lr(cfg, round_index))
    assert round_lr(cfg, 2) < round_lr(cfg, 1)
