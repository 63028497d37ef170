"""+FT (``--finetune_epochs``): the final global model fine-tuned at each client on its own train
split, evaluated on its own splits; one option for every global method."""

from __future__ import annotations

import pytest
import torch

from fedward.algorithms import METHOD_REGISTRY
from fedward.algorithms.base import GlobalTraining, make_optimizer
from fedward.algorithms.fedavg import train_local
from fedward.config import build_config
from fedward.engine.setup import initial_global_state, load_data
from fedward.engine.simulation import Simulation, prepare, run
from fedward.errors import ConfigError
from fedward.losses import build_loss
from fedward.seeding import torch_generator


def test_every_global_method_and_no_personalised_one_takes_the_option():
    takes = {name for name, cls in METHOD_REGISTRY.items() if issubclass(cls.Options, GlobalTraining)}
    assert {"fedavg", "fedprox", "scaffold", "moon", "fedmas", "fedadam", "fedavgm", "cyclic"} <= takes
    assert not any(METHOD_REGISTRY[name].personalised or METHOD_REGISTRY[name].centralized for name in takes)
    with pytest.raises(ConfigError, match="--finetune_epochs applies to"):
        build_config({"method": "local", "finetune_epochs": 1})


def test_finetuning_is_plain_task_loss_training_of_the_global_model(tiny_values):
    cfg = build_config({**tiny_values, "method": "fedprox", "mu": 5.0, "finetune_epochs": 2})
    data = load_data(cfg)
    sim = Simulation(cfg, data, "cpu")
    global_state, _ = initial_global_state(cfg, sim.build_model)
    client = data.clients[1]
    tuned = {k: v.clone() for k, v in sim.algorithm.finetune(sim.workspace, client, global_state,
                                                              torch_generator(0, "ft", 1)).state_dict().items()}
    # By hand: the same batches and optimizer, CE alone (FedProx's proximal term is not part of +FT).
    model = sim.build_model()
    model.load_state_dict(global_state)
    loss_fn = build_loss(cfg.loss_fn_name, client.train.class_counts(data.num_classes).tolist(),
                         global_class_counts=sim.spec.global_class_counts)
    train_local(sim.workspace, model, client, epochs=2, batch_size=cfg.batch_size, loss_fn=loss_fn,
                optimizer=make_optimizer(cfg, model.parameters()), generator=torch_generator(0, "ft", 1))
    assert all(torch.equal(tuned[k], v) for k, v in model.state_dict().items())
    assert any(not torch.equal(tuned[k], global_state[k]) for k in global_state)


def test_a_run_writes_finetuned_rows_at_the_last_round_only(tiny_values, tmp_path):
    cfg = build_config({**tiny_values, "finetune_epochs": 1, "output": str(tmp_path / "ft")})
    run_dir, data = prepare(cfg)
    summary = run(cfg, run_dir, data=data)
    rows = [r for r in run_dir.read_rows() if r.get("model") == "finetuned"]
    assert {r["round"] for r in rows} == {cfg.comm_round}
    per_client = [r for r in rows if r["data"] == "client" and r["split"] == "test"]
    assert sorted(r["client"] for r in per_client) == [c.client_id for c in data.clients]
    pooled = [r for r in rows if r["data"] == "pooled" and r["split"] == "test"]
    assert len(pooled) == 1 and pooled[0]["n"] == sum(r["n"] for r in per_client)
    assert summary["per_client_finetuned_final"] == {r["client"]: r["balanced_accuracy"] for r in per_client}
    # The global model's own rows and the final summary are those of a run without +FT.
    plain = build_config({**tiny_values, "output": str(tmp_path / "plain")})
    plain_dir, _ = prepare(plain)
    plain_summary = run(plain, plain_dir, data=data)
    assert plain_summary["final"] == summary["final"]
    assert [r for r in plain_dir.read_rows() if r.get("model") == "global"] == \
           [r for r in run_dir.read_rows() if r.get("model") == "global"]
