"""MH-pFLID and the model-heterogeneous baselines (fml, fedkd, local with --client_models):
attention by hand, stage freezing, aggregation, SVD compression, privacy, resume."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedward.algorithms.compression import compress, decompress, kept_rank
from fedward.config import build_config
from fedward.engine.setup import initial_global_state, load_data
from fedward.engine.simulation import SELECTED_LOCAL, ClientTask, Simulation, run
from fedward.losses import distillation_kl
from fedward.models import get_model
from fedward.models.messenger import CrossAttention, FeatureAddition, LocalProjection, MessengerOnly, build_fusion
from fedward.tracking import RunDirectory
from fedward.config import applicable_settings as applicable

HETERO = dict(dataset="synthetic_multires", image_size=16, patients_scale=1.0, client_models="smallcnn,resnet5,smallcnn,resnet5",
              stem="small", messenger_dim=16, comm_round=2, batch_size=16, injection_epochs=1, distillation_epochs=1,
              epochs=1, progress=False, eval_batch_size=128, threads=1)


def _set(linear: nn.Linear, weight, bias=None) -> None:
    with torch.no_grad():
        linear.weight.copy_(torch.tensor(weight, dtype=torch.float32))
        linear.bias.copy_(torch.zeros(linear.out_features) if bias is None else torch.tensor(bias, dtype=torch.float32))


# ---------------------------------------------------------------- R and T by hand

def test_receiver_attention_matches_hand_computation():
    # D_mes = 2, C_loc = 1; identity Q/K/V, W_d = [1, 0]^T: local token values become (v, 0).
    receiver = CrossAttention(local_channels=1, width=2, queries="messenger")
    _set(receiver.project_local, [[1.0], [0.0]])
    for layer in (receiver.query, receiver.key, receiver.value):
        _set(layer, [[1.0, 0.0], [0.0, 1.0]])
    messenger_map = torch.tensor([[1.0], [0.0]]).reshape(1, 2, 1, 1)  # one messenger token (1, 0)
    local_map = torch.tensor([0.0, 2.0]).reshape(1, 1, 1, 2)  # two local tokens: (0, 0) and (2, 0)
    out = receiver(messenger_map, local_map)
    # scores q.k / sqrt(2) = [0, 2/sqrt(2)]; softmax -> weights; output = sum w_j v_j
    scores = torch.tensor([0.0, 2.0 / math.sqrt(2.0)])
    weights = torch.softmax(scores, 0)
    expected = torch.tensor([[[weights[1].item() * 2.0, 0.0]]])
    torch.testing.assert_close(out, expected)


def test_transmitter_takes_queries_from_local_tokens():
    torch.manual_seed(0)
    transmitter = build_fusion("attention", "transmitter", local_channels=3, width=4)
    receiver = build_fusion("attention", "receiver", local_channels=3, width=4)
    messenger_map, local_map = torch.randn(2, 4, 2, 2), torch.randn(2, 3, 3, 3)
    assert transmitter(messenger_map, local_map).shape == (2, 9, 4)  # one output per local token
    assert receiver(messenger_map, local_map).shape == (2, 4, 4)  # one output per messenger token
    # T's outputs are convex combinations of the messenger tokens' values.
    values = transmitter.value(messenger_map.flatten(2).transpose(1, 2))
    out = transmitter(messenger_map, local_map)
    assert (out <= values.max(1, keepdim=True).values + 1e-6).all()
    assert (out >= values.min(1, keepdim=True).values - 1e-6).all()


@pytest.mark.parametrize("kind", ["attention", "add", "none"])
def test_a_prediction_does_not_depend_on_the_rest_of_the_batch(kind):
    torch.manual_seed(0)
    messenger = get_model("messenger", num_classes=2, image_size=16, width=8).eval()
    local = get_model("resnet5", num_classes=2, image_size=16, stem="small").eval()
    receiver = build_fusion(kind, "receiver", local.num_features, 8)
    x = torch.rand(5, 3, 16, 16)

    def routed(images):
        return messenger.classify_tokens(receiver(messenger.feature_map(images), local.feature_map(images)))

    batch = routed(x)
    alone = torch.cat([routed(x[i:i + 1]) for i in range(5)])
    torch.testing.assert_close(batch, alone)
    shuffled = routed(x.flip(0)).flip(0)
    torch.testing.assert_close(batch, shuffled)


def test_feature_addition_by_hand():
    add = FeatureAddition(local_channels=1, width=2)
    with torch.no_grad():
        add.project_local.weight.copy_(torch.tensor([[[[1.0]]], [[[2.0]]]]))
        add.project_local.bias.zero_()
    messenger_map = torch.ones(1, 2, 1, 1)
    local_map = torch.tensor([[[[1.0, 3.0], [5.0, 7.0]]]])  # pooled to the 1x1 messenger grid: 4
    torch.testing.assert_close(add(messenger_map, local_map), torch.tensor([[[5.0, 9.0]]]))


def test_none_fusion_is_W_d_alone_as_receiver_and_the_messenger_tokens_as_transmitter():
    receiver, transmitter = build_fusion("none", "receiver", 1, 2), build_fusion("none", "transmitter", 1, 2)
    assert isinstance(receiver, LocalProjection) and isinstance(transmitter, MessengerOnly)
    _set(receiver.project_local, [[1.0], [-2.0]], [0.5, 0.0])
    messenger_map = torch.full((1, 2, 1, 1), 9.0)  # ignored by R
    local_map = torch.tensor([[[[1.0, 3.0]]]])  # two local tokens, one channel
    torch.testing.assert_close(receiver(messenger_map, local_map), torch.tensor([[[1.5, -2.0], [3.5, -6.0]]]))
    torch.testing.assert_close(transmitter(messenger_map, local_map), torch.full((1, 1, 2), 9.0))


def test_messenger_head_on_tokens_equals_forward():
    messenger = get_model("messenger", num_classes=3, image_size=32, width=8).eval()
    x = torch.rand(2, 3, 32, 32)
    fmap = messenger.feature_map(x)
    torch.testing.assert_close(messenger.classify_tokens(fmap.flatten(2).transpose(1, 2)), messenger(x))


def test_messenger_at_224_has_the_reproduction_size():
    # Conv(3,64,k3) + Conv(64,64,k5) + Conv(64,512,k7) + Linear(512,256) + BN1d(256) + Linear(256,2), by hand:
    expected = (3 * 64 * 9 + 64) + (64 * 64 * 25 + 64) + (64 * 512 * 49 + 512) + (512 * 256 + 256) + 2 * 256 + (256 * 2 + 2)
    messenger = get_model("messenger", num_classes=2, image_size=224)
    assert sum(p.numel() for p in messenger.parameters()) == expected == 1_842_754
    assert messenger.feature_map(torch.zeros(1, 3, 224, 224)).shape == (1, 512, 5, 5)


def test_distillation_kl_by_hand():
    teacher = torch.tensor([[0.0, 0.0]])  # p = (1/2, 1/2)
    student = torch.tensor([[0.0, math.log(3.0)]])  # q = (1/4, 3/4)
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert distillation_kl(student, teacher).item() == pytest.approx(expected, rel=1e-6)
    student.requires_grad_(True)
    teacher.requires_grad_(True)
    distillation_kl(student, teacher).backward()
    assert teacher.grad is None  # the teacher only teaches


# ---------------------------------------------------------------- the client update

def _simulation(values):
    cfg = build_config(applicable({**HETERO, **values}))
    data = load_data(cfg)
    sim = Simulation(cfg, data, "cpu")
    global_state, _ = initial_global_state(cfg, sim.build_model)
    return cfg, data, sim, global_state


def test_injection_freezes_the_messenger_and_trains_the_local_model_and_R():
    cfg, data, sim, global_state = _simulation({"method": "mhpflid", "distillation_epochs": 0})
    state: dict = {}
    message = sim.algorithm.server_message(1, global_state, {})
    reply = sim.run_client(ClientTask(1, 1, message, state), evaluate_local=False).reply
    # Messenger frozen (weights and BatchNorm statistics): the reply is the global messenger.
    assert set(reply.arrays) == set(global_state)
    assert all(torch.equal(reply.arrays[k], global_state[k]) for k in global_state)
    initial_local = sim.algorithm.initial_local_state(1)
    assert any(not torch.equal(state["local"][k], initial_local[k]) for k in initial_local)
    # R learns (the reproduction's R never does); T has not moved from its seeded start.
    client = data.clients[1]
    for role, moved in (("receiver", True), ("transmitter", False)):
        start = sim.algorithm.fusion(sim.workspace, client, {}, role).state_dict()
        changed = [not torch.equal(state[role][k], start[k]) for k in start]
        assert any(changed) if moved else not any(changed), role


def test_distillation_freezes_the_local_model_and_trains_the_messenger_and_T():
    cfg, data, sim, global_state = _simulation({"method": "mhpflid", "injection_epochs": 0})
    state: dict = {}
    reply = sim.run_client(ClientTask(1, 0, sim.algorithm.server_message(1, global_state, {}), state), False).reply
    initial_local = sim.algorithm.initial_local_state(0)
    assert all(torch.equal(state["local"][k], initial_local[k]) for k in initial_local)
    assert any(not torch.equal(reply.arrays[k], global_state[k]) for k in global_state)
    assert reply.metrics["num-examples"] == len(data.clients[0].train)


def test_none_ablation_keeps_a_messenger_to_local_path():
    """With ``--mhpflid_fusion none`` the injection term M_h(W_d L_b x) still reaches the local model:
    its local model differs from `local` with the same optimizer, clip and batches, and equals it
    exactly once that term's weight is 0 (so the comparison isolates the term, nothing else)."""
    same = {"client_models": "smallcnn,resnet5,smallcnn,resnet5", "augment": False}

    def local_after_one_round(values):
        cfg, data, sim, global_state = _simulation({**same, **values})
        state: dict = {}
        sim.run_client(ClientTask(1, 1, sim.algorithm.server_message(1, global_state, {}), state), False)
        return state.get("local", state.get("model"))

    alone = local_after_one_round({"method": "local", "adam": True, "lr": 1e-4, "grad_clip": 1.0, "epochs": 1})
    mhpflid = {"method": "mhpflid", "mhpflid_fusion": "none", "lambda_inj_local": 1.0, "injection_epochs": 1,
               "distillation_epochs": 0}
    without_term = local_after_one_round({**mhpflid, "lambda_inj_messenger": 0.0})
    with_term = local_after_one_round(mhpflid)
    assert all(torch.equal(without_term[k], alone[k]) for k in alone)
    assert any(not torch.equal(with_term[k], alone[k]) for k in alone if alone[k].is_floating_point())


def test_clients_keep_their_own_architectures_and_seeded_local_models():
    cfg, data, sim, global_state = _simulation({"method": "mhpflid"})
    assert [sim.algorithm.client_architecture(k) for k in range(4)] == ["smallcnn", "resnet5", "smallcnn", "resnet5"]
    a, b = sim.algorithm.initial_local_state(0), sim.algorithm.initial_local_state(2)
    assert set(a) == set(b) and any(not torch.equal(a[k], b[k]) for k in a)  # same architecture, own seed
    assert set(sim.algorithm.initial_local_state(1)) != set(a)


def test_server_averages_the_messenger_by_training_examples():
    from fedward.algorithms.base import ClientReply

    cfg, data, sim, global_state = _simulation({"method": "mhpflid"})
    key = next(k for k in global_state if k.endswith("weight"))
    replies = [ClientReply(0, {k: torch.full_like(v, 1.0) if v.is_floating_point() else v for k, v in global_state.items()},
                           {"num-examples": 30.0}),
               ClientReply(1, {k: torch.full_like(v, 5.0) if v.is_floating_point() else v for k, v in global_state.items()},
                           {"num-examples": 10.0})]
    new_state, info = sim.algorithm.aggregate(1, global_state, replies, {})
    assert info["weights"] == pytest.approx([0.75, 0.25])
    floats = sim.algorithm.parameter_names  # weights only, not BatchNorm statistics
    old_norm = math.sqrt(sum(float(global_state[k].double().pow(2).sum()) for k in floats))
    moved = math.sqrt(sum(float((2.0 - global_state[k].double()).pow(2).sum()) for k in floats))  # every float is 2
    assert info["shared_displacement"] == pytest.approx(moved / old_norm, rel=1e-6)
    assert torch.allclose(new_state[key], torch.full_like(new_state[key], 0.75 * 1 + 0.25 * 5))


# ---------------------------------------------------------------- FedKD's compression

def test_kept_rank_by_hand():
    singular = torch.tensor([4.0, 3.0])  # energies 16 and 9 of 25
    assert kept_rank(singular, 0.6) == 1  # 16/25 = 0.64 >= 0.6
    assert kept_rank(singular, 0.95) == 2
    assert kept_rank(torch.zeros(3), 0.9) == 1


def test_compress_low_rank_round_trip_and_small_tensors_as_they_are():
    column, row = torch.arange(1.0, 9.0).reshape(8, 1), torch.arange(1.0, 7.0).reshape(1, 6)
    arrays = {"w": column @ row, "conv": (column @ row).reshape(8, 6, 1, 1), "bias": torch.ones(8),
              "steps": torch.tensor(3)}
    sent = compress(arrays, 0.95)
    assert set(sent) == {"w::svd_u", "w::svd_v", "conv::svd_u", "conv::svd_v", "bias", "steps"}
    assert sent["w::svd_u"].shape == (8, 1) and sent["w::svd_v"].shape == (1, 6)  # rank 1
    back = decompress(sent, arrays)
    for name in arrays:
        torch.testing.assert_close(back[name], arrays[name])
    assert compress(arrays, 1.0).keys() == arrays.keys()
    with pytest.raises(KeyError, match="'w'"):
        decompress({"bias": arrays["bias"]}, arrays)


def test_fedkd_energy_schedule_and_compressed_messages():
    cfg, data, sim, global_state = _simulation({"method": "fedkd", "comm_round": 4, "fedkd_energy_start": 0.5,
                                                "fedkd_energy_end": 0.9})
    algorithm = sim.algorithm
    assert [algorithm.energy(r) for r in (1, 2, 3)] == pytest.approx([0.5, 0.6, 0.7])
    message = algorithm.server_message(1, global_state, {})
    assert any(k.endswith("::svd_u") for k in message.arrays)
    reply = sim.run_client(ClientTask(1, 0, message, {}), evaluate_local=False).reply
    assert set(reply.arrays) <= algorithm.declared_reply_keys(global_state)
    new_state, _ = algorithm.aggregate(1, global_state, [reply], {})
    assert {k: v.shape for k, v in new_state.items()} == {k: v.shape for k, v in global_state.items()}


# ---------------------------------------------------------------- whole runs

def _run(tmp_path, name, values, **kwargs):
    cfg = build_config(applicable({**HETERO, **values}))
    run_dir = RunDirectory.create(tmp_path / name)
    run_dir.write_config(cfg.to_dict())
    return cfg, run_dir, run(cfg, run_dir, **kwargs)


@pytest.mark.parametrize("method, extra", [("mhpflid", {}), ("mhpflid", {"mhpflid_fusion": "add"}),
                                           ("mhpflid", {"mhpflid_fusion": "none"}), ("fml", {}), ("fedkd", {}),
                                           ("local", {"adam": True})])
def test_only_the_shared_model_leaves_a_client(tmp_path, monkeypatch, method, extra):
    """Privacy: every reply holds only the shared model's arrays (or nothing, for local) and
    scalars; no reply array equals any array of a client's local model, R, T or W_h, or its data."""
    from fedward.engine import simulation as sim_module

    seen = []
    original = sim_module.Simulation.run_client

    def spy(self, task, evaluate_local):
        result = original(self, task, evaluate_local)
        seen.append((self, task, result))
        return result

    monkeypatch.setattr(sim_module.Simulation, "run_client", spy)
    _, run_dir, summary = _run(tmp_path, method, {"method": method, **extra})
    assert len(seen) == 2 * 4
    for sim, task, result in seen:
        reply = result.reply
        shared = sim.workspace.model.state_dict()
        if method == "local":
            assert reply.arrays == {}
        else:
            assert set(reply.arrays) <= sim.algorithm.declared_reply_keys(shared) and reply.arrays
        assert all(isinstance(v, float) for v in reply.metrics.values())
        private = [t for key, part in result.state.items() if not key.startswith("optimizer") and key != SELECTED_LOCAL
                   for t in part.values()]  # (the selected round's predictions stay in the state too: not arrays)
        client = sim.training_clients[task.client_index]
        for array in reply.arrays.values():
            assert not any(array.shape == t.shape and torch.equal(array, t) for t in private if t.numel() > 1)
            assert array.shape[1:] != client.train.images.shape[1:]
    # Each client's local model is saved with its own architecture, in the run folder (its "client side").
    for k, arch in enumerate(["smallcnn", "resnet5", "smallcnn", "resnet5"]):
        saved = torch.load(run_dir.client_model_path(k), weights_only=False)
        assert saved["model"] == arch
        get_model(arch, num_classes=2, image_size=16, **({"stem": "small"} if arch != "smallcnn" else {})).load_state_dict(
            saved["state_dict"])
    assert summary["mode"] == "local" and set(summary["per_client_final"]) == {0, 1, 2, 3}


class _Crash(Exception):
    pass


def test_mhpflid_resumes_to_identical_metrics(tmp_path):
    values = {"method": "mhpflid", "comm_round": 3}
    _, full, _ = _run(tmp_path, "full", values)

    def crash_after_two(round_index):
        if round_index == 2:
            raise _Crash

    with pytest.raises(_Crash):
        _run(tmp_path, "crashed", values, on_round_end=crash_after_two)
    cfg = build_config(applicable({**HETERO, **values}))
    run(cfg, RunDirectory.open_existing(tmp_path / "crashed"), resume=True)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(RunDirectory.open_existing(tmp_path / "crashed").read_rows()) == strip(full.read_rows())
    # The messenger path M_h(R(M_b x, L_b x)) is logged as a diagnostic next to each local model.
    paths = [r for r in full.read_rows() if r.get("model") == "messenger-path" and r["split"] == "test"]
    assert {r["client"] for r in paths} == {0, 1, 2, 3} and all(0 <= r["accuracy"] <= 1 for r in paths)


def test_client_models_count_must_match_the_clients(tmp_path):
    from fedward.engine.simulation import prepare
    from fedward.errors import ConfigError

    cfg = build_config(applicable({**HETERO, "method": "mhpflid", "client_models": "resnet5,resnet8", "output": str(tmp_path / "r")}))
    with pytest.raises(ConfigError, match="lists 2 models .* 4 clients"):
        prepare(cfg)
    assert not (tmp_path / "r").exists()


def test_injection_lowers_the_local_models_training_loss():
    cfg, data, sim, global_state = _simulation({"method": "mhpflid", "injection_epochs": 3, "local_lr": 3e-3,
                                                "augment": False})
    from fedward.data.augment import normalize

    train = data.clients[0].train
    model = sim.algorithm.local_model(sim.workspace, 0)

    def train_loss(local_state) -> float:
        model.load_state_dict(local_state)
        with torch.no_grad():
            return F.cross_entropy(model.eval()(normalize(train.images, sim.spec.mean, sim.spec.std)), train.labels).item()

    before = train_loss(sim.algorithm.initial_local_state(0))
    state: dict = {}
    sim.run_client(ClientTask(1, 0, sim.algorithm.server_message(1, global_state, {}), state), evaluate_local=False)
    assert train_loss(state["local"]) < before - 0.01
