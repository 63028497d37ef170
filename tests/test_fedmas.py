"""Fed-MAS end to end on tiny data: aggregation variants, heads policy, privacy, and the seed's
three README commands run as written (tiny settings appended; weights files built by the test
with the real file names and key names, random values)."""

from __future__ import annotations

import math
import shlex

import pytest
import torch

from fedward.cli import main
from fedward.config import build_config
from fedward.engine.setup import initial_global_state, load_data
from fedward.engine.simulation import ClientTask, Simulation
from fedward.models import get_model
from fedward.priors import MOCO_FILE
from fedward.tracking import RunDirectory

TINY = ["--model", "smallcnn", "--image_size", "16", "--data_scale", "0.03", "--progress", "false", "--threads", "1",
        "--batch_size", "16"]


def _agg_rows(out):
    return [r for r in RunDirectory.open_existing(out).read_rows() if r["scope"] == "aggregation"]


@pytest.mark.parametrize("aggregate", ["avg", "MAS", "mas_inv", "mas_DRW"])
def test_aggregation_variants(tmp_path, aggregate, small_prior):
    out = tmp_path / aggregate
    assert main(["run", "--method", "fedmas", "--free_u", "3", "--pre_trained_models", small_prior, "--comm_round", "2",
                 "--aggregate_method", aggregate, "--output", str(out), *TINY]) == 0
    for row in _agg_rows(out):
        rf, n, weights = row["robust_factor"], row["num_examples"], row["weights"]
        assert len(row["divergence_before_0"]) == len(rf) == 6
        if aggregate == "avg":
            assert weights == pytest.approx([x / sum(n) for x in n])
        elif aggregate in ("MAS", "mas_inv"):
            assert weights == pytest.approx([x / sum(rf) for x in rf])
            assert all(0 < x <= 1 for x in rf)
        else:  # mas_DRW: FedAvg weights before round floor(0.8 * 2) = 1 (0-based), i.e. in round 1
            if row["round"] == 1:
                assert weights == pytest.approx([x / sum(n) for x in n])


def test_free_u_zero_measures_the_supervised_loss(tiny_values):
    cfg = build_config({**tiny_values, "method": "fedmas", "pre_trained_models": "random", "free_u": 0,
                        "aggregate_method": "mas"})
    sim = Simulation(cfg, load_data(cfg), "cpu")
    state, _ = initial_global_state(cfg, sim.build_model)
    reply = sim.run_client(ClientTask(1, 4, sim.algorithm.server_message(1, state, {}), {}), False).reply
    before = [reply.metrics[f"divergence-before-{c}"] for c in range(8)]
    # MSK (client 4) has only MEL, NV and BKL: the others stay 0; cross-entropy values are positive
    assert [c for c, v in enumerate(before) if v > 0] == [0, 1, 4]
    assert 0 < reply.metrics["robust-factor"] <= 1


@pytest.mark.parametrize("policy, kept, taken", [("free", ("fc.",), ("p_free.", "fc_free.")),
                                                  ("global", ("p_free.", "fc_free."), ("fc.",))])
def test_update_projector_head_keeps_the_other_heads_local(tiny_values, policy, kept, taken):
    cfg = build_config({**tiny_values, "method": "fedmas", "pre_trained_models": "random", "free_u": 1,
                        "update_projector_head": policy})
    sim = Simulation(cfg, load_data(cfg), "cpu")
    state0, _ = initial_global_state(cfg, sim.build_model)
    client_state = {}
    trained = sim.run_client(ClientTask(1, 0, sim.algorithm.server_message(1, state0, {}), client_state), False).reply.arrays
    sim.algorithm.load_start_model(sim.workspace, sim.algorithm.server_message(2, state0, {}), client_state,
                                   sim.training_clients[0])
    now = sim.workspace.model.state_dict()
    for key in now:
        if key.startswith(kept):
            assert torch.equal(now[key], trained[key]), key  # the client's own head survives the broadcast
        elif key.startswith(taken) or key.startswith("backbone."):
            assert torch.equal(now[key], state0[key]), key  # everything else comes from the global model


def _seed_readme_commands():
    common = ("--client_number 6 --pre_trained_tv --thread_number 6 --comm_round 100 --lr 0.0003 --epochs 1 "
              "--data_dir data/Flamby_isic --update_projector_head='both' --partition_method='homo' "
              "--partition_alpha=0 --model='resnet18' --gpu='0,1,3,4,5,6,7' --batch_size=64 --loss_fn_name=BSM "
              "--adam --validate_client --fold=1")
    return [
        f"--method fedavg {common}",
        f"--method fedmas --free_u=3 --pre_trained_models='moco' {common}",
        f"--method fedmas --free_u=3 --pre_trained_models='moco' {common} --aggregate_method='MAS'",
    ]


@pytest.mark.slow
def test_the_seed_readme_commands_run_as_written(tmp_path, monkeypatch):
    # The weights files a user would have: torchvision's ResNet-18 and the MoCo-v2 checkpoint.
    torch_home, cache = tmp_path / "torch", tmp_path / "cache"
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    monkeypatch.setenv("FEDWARD_CACHE", str(cache))
    (torch_home / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(get_model("resnet18", num_classes=1000).state_dict(), torch_home / "hub/checkpoints/resnet18-f37072fd.pth")
    (cache / "priors").mkdir(parents=True)
    r50 = get_model("resnet50", num_classes=128).state_dict()
    torch.save({"epoch": 800, "arch": "resnet50",
                "state_dict": {f"module.encoder_q.{k}": v for k, v in r50.items()}}, cache / "priors" / MOCO_FILE)
    monkeypatch.chdir(tmp_path)
    # Without the data folder the commands stop, naming it (never a silent run on synthetic data).
    assert main(["run", *shlex.split(_seed_readme_commands()[0]), "--output", str(tmp_path / "none")]) == 2
    assert not (tmp_path / "none").exists()
    # On a user's Fed-MAS data folder (fake tree: real names and columns).
    from test_fed_isic2019 import make_fedmas

    make_fedmas(tmp_path / "data")
    for index, command in enumerate(_seed_readme_commands()):
        out = tmp_path / f"real{index}"
        tiny = ["--comm_round", "1", "--image_size", "16", "--batch_size", "4", "--progress", "false", "--output", str(out)]
        assert main(["run", *shlex.split(command), *tiny]) == 0, command
        assert RunDirectory.open_existing(out).read_config()["client_names"][0] == "BCN"
        assert (out / "final_model.pt").is_file()
    assert _agg_rows(tmp_path / "real2")[0]["weights"] == pytest.approx(
        [x / sum(_agg_rows(tmp_path / "real2")[0]["robust_factor"]) for x in _agg_rows(tmp_path / "real2")[0]["robust_factor"]])


def test_prior_batchnorm_drift_is_per_client_and_only_with_the_flag(tiny_values, small_prior):
    def run_two_clients(drift):
        cfg = build_config({**tiny_values, "method": "fedmas", "pre_trained_models": small_prior, "free_u": 1,
                            "aggregate_method": "mas", "prior_bn_drift": drift})
        sim = Simulation(cfg, load_data(cfg), "cpu")
        state0, _ = initial_global_state(cfg, sim.build_model)
        states = [{}, {}]
        for k in (0, 1):
            sim.run_client(ClientTask(1, k, sim.algorithm.server_message(1, state0, {}), states[k]), False)
        return sim, states

    sim, states = run_two_clients(False)
    clean = sim.workspace.prior_buffers[small_prior]
    assert all(torch.equal(b, clean[n]) for n, b in sim.workspace.priors[small_prior].named_buffers())
    assert "prior-batchnorm" not in states[0]
    sim, states = run_two_clients(True)
    key = "encoder.bn1.running_mean"
    first, second = states[0]["prior-batchnorm"][key], states[1]["prior-batchnorm"][key]
    # each client's prior drifted from the loaded statistics towards its own data, independently
    assert not torch.equal(first, clean[key]) and not torch.equal(second, clean[key])
    assert not torch.equal(first, second)


def test_cached_prior_features_are_the_prior_on_unaugmented_images(tiny_values, small_prior):
    """Without augmentation f(x) of a batch equals the cached f(x): the two runs match; with
    augmentation the cache is an approximation, computed once per client and reused."""
    def one_client(cache, augment):
        cfg = build_config({**tiny_values, "method": "fedmas", "pre_trained_models": small_prior, "free_u": 1,
                            "aggregate_method": "mas", "augment": augment, "cache_prior_features": cache})
        sim = Simulation(cfg, load_data(cfg), "cpu")
        state0, _ = initial_global_state(cfg, sim.build_model)
        result = sim.run_client(ClientTask(1, 0, sim.algorithm.server_message(1, state0, {}), {}), False)
        return sim, result.reply

    _, plain = one_client(False, False)
    sim, cached = one_client(True, False)
    assert plain.metrics["robust-factor"] == pytest.approx(cached.metrics["robust-factor"], rel=1e-4)
    for key, value in plain.arrays.items():
        if value.is_floating_point():
            assert torch.allclose(value, cached.arrays[key], atol=1e-4), key
    features = sim.workspace.prior_features[(small_prior, 0)]
    assert features.shape == (len(sim.training_clients[0].train), sim.workspace.priors[small_prior].num_features)
    _, augmented = one_client(False, True)
    _, approximated = one_client(True, True)
    assert augmented.metrics["robust-factor"] != approximated.metrics["robust-factor"]
    with pytest.raises(Exception, match="needs a fixed prior"):
        build_config({**tiny_values, "method": "fedmas", "pre_trained_models": "random", "cache_prior_features": True,
                      "prior_bn_drift": True})


@pytest.mark.parametrize("loss, aux_head, fc_type, fc_free_type", [
    ("LDAM", "cosine", "CosineClassifier", "CosineClassifier"),  # the reference: ClassifierLDAM for both heads
    ("LDAM", "linear", "CosineClassifier", "Linear"),
    ("CE", "cosine", "Linear", "Linear"),
])
def test_ldam_makes_both_heads_cosine_classifiers(tiny_values, loss, aux_head, fc_type, fc_free_type):
    cfg = build_config({**tiny_values, "method": "fedmas", "pre_trained_models": "random", "free_u": 1,
                        "loss_fn_name": loss, "ldam_aux_head": aux_head})
    model = Simulation(cfg, load_data(cfg), "cpu").build_model()
    assert (type(model.fc).__name__, type(model.fc_free).__name__) == (fc_type, fc_free_type)
    z, _, z2 = model.forward_all(torch.randn(3, 3, 16, 16))
    if fc_free_type == "CosineClassifier":
        assert z2.abs().max() <= 1.0 + 1e-6  # LDAM's scale 30 then meets bounded logits, as in the reference


def test_option_for_another_setting_is_an_error(tiny_values):
    from fedward.errors import ConfigError

    base = {**tiny_values, "method": "fedmas", "pre_trained_models": "random", "free_u": 1}
    with pytest.raises(ConfigError, match="--ldam_aux_head linear applies to --loss_fn_name LDAM"):
        build_config({**base, "ldam_aux_head": "linear"})
    with pytest.raises(ConfigError, match="--free_u0_task_mean plain applies to --free_u 0"):
        build_config({**base, "free_u0_task_mean": "plain"})
    with pytest.raises(ConfigError, match="--rf_normalisation present applies to the MAS"):
        build_config({**base, "rf_normalisation": "present"})


@pytest.mark.parametrize("mean, expected", [("weighted", 2.0), ("plain", 4.0 / 3.0 + 1.0)])
def test_free_u_zero_task_mean_by_hand(tiny_values, mean, expected):
    from fedward.algorithms.fedmas import TaskLosses
    from fedward.losses import build_loss

    cfg = build_config({**tiny_values, "method": "fedmas", "pre_trained_models": "random", "free_u": 0,
                        "loss_fn_name": "RW", "free_u0_task_mean": mean})
    algorithm = Simulation(cfg, load_data(cfg), "cpu").algorithm
    # RW with counts [3, 1]: w = n / (C n_j) = [2/3, 2]. Zero logits: every per-sample CE is log 2.
    losses = TaskLosses(*(build_loss("RW", [3, 1], reduction=r) for r in ("mean", "mean", "none")))
    z = z2 = torch.zeros(2, 2)
    labels = torch.tensor([0, 1])
    loss, divergence = algorithm.local_objective(losses, z, None, z2, labels, prior_feature=None, free_factor=0.0)
    # weighted: (2/3 + 2) log 2 / (2/3 + 2) = log 2 for each head; plain: (2/3 + 2) log 2 / 2 for z
    assert float(loss) == pytest.approx(expected * math.log(2.0))
    torch.testing.assert_close(divergence, torch.tensor([2.0 / 3.0, 2.0]) * math.log(2.0))


def test_lrd_ramps_free_u_down_from_start_free_rd(tiny_values):
    cfg = build_config({**tiny_values, "method": "fedmas", "pre_trained_models": "random", "free_u": 3,
                        "comm_round": 100, "LRD": True, "start_free_rd": 30})
    algorithm = Simulation(cfg, load_data(cfg), "cpu").algorithm
    # 0-based round r = round - 1: 3 until r = 30, then 3 (1 - (r - 30) / 70): r = 65 -> 1.5, r = 99 -> 3/70
    factors = [algorithm.free_factor(r + 1) for r in (0, 29, 30, 65, 99)]
    assert factors == pytest.approx([3.0, 3.0, 3.0, 1.5, 3.0 / 70.0])
    plain = build_config({**tiny_values, "method": "fedmas", "pre_trained_models": "random", "free_u": 3})
    assert Simulation(plain, load_data(plain), "cpu").algorithm.free_factor(99) == 3.0
    from fedward.errors import ConfigError

    with pytest.raises(ConfigError, match="--LRD ramps down --free_u, which is 0"):
        build_config({**tiny_values, "method": "fedmas", "pre_trained_models": "random", "free_u": 0, "LRD": True})


@pytest.mark.parametrize("share", [False, True])
def test_share_prior_forward_replays_the_prepass_batches_and_runs_the_prior_once_per_sample(tiny_values, share):
    cfg = build_config({**tiny_values, "method": "fedmas", "pre_trained_models": "random", "free_u": 1,
                        "aggregate_method": "mas", "epochs": 2, "share_prior_forward": share})
    sim = Simulation(cfg, load_data(cfg), "cpu")
    state0, _ = initial_global_state(cfg, sim.build_model)
    prior = sim.algorithm.prior(sim.workspace, 0)
    prior_calls, model_inputs = [], []
    hook = prior.register_forward_hook(lambda m, args, out: prior_calls.append(len(args[0])))
    augment = sim.workspace.augment

    def recorded_augment(images, generator):
        model_inputs.append(augment(images, generator))
        return model_inputs[-1]

    sim.workspace.augment = recorded_augment
    sim.run_client(ClientTask(1, 0, sim.algorithm.server_message(1, state0, {}), {}), False)
    hook.remove()
    batches = len(sim.training_clients[0].train) // cfg.batch_size
    # pre-pass + 2 epochs: 3 passes over the batches; the prior runs in all 3, or in 2 when shared
    assert len(model_inputs) == 3 * batches
    assert len(prior_calls) == (2 if share else 3) * batches
    prepass, first_epoch = model_inputs[:batches], model_inputs[batches:2 * batches]
    replayed = all(torch.equal(a, b) for a, b in zip(prepass, first_epoch))
    assert replayed == share  # the very same augmented images, so the stored features are f(x) of them


def test_share_prior_forward_needs_the_prepass(tiny_values):
    from fedward.errors import ConfigError

    base = {**tiny_values, "method": "fedmas", "pre_trained_models": "random", "free_u": 1, "share_prior_forward": True}
    with pytest.raises(ConfigError, match="needs --aggregate_method mas"):
        build_config(base)
    with pytest.raises(ConfigError, match="drop --cache_prior_features"):
        build_config({**base, "aggregate_method": "mas", "cache_prior_features": True})
