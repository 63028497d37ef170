"""fedward on Flower, in one process: records, reply checks, node state, launch commands and the
server round loop over a loopback grid that hands each message to the real ClientApp.

The multi-process deployment on 127.0.0.1 (SuperLink + SuperNodes, TLS, Flower's simulation
runtime) is in test_flower_deploy.py.
"""

from __future__ import annotations

import json
import math
import tomllib
import sys

import numpy as np
import pytest
import torch

flwr = pytest.importorskip("flwr")

from flwr.app import Context, Error, Message, RecordDict  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402

from fedward.algorithms import get_algorithm  # noqa: E402
from fedward.algorithms.base import ClientReply, ServerMessage, TaskSpec  # noqa: E402
from fedward.config import build_config  # noqa: E402
from fedward.config import applicable_settings as applicable  # noqa: E402
from fedward.engine.evaluation import Predictions  # noqa: E402
from fedward.engine.simulation import prepare, run  # noqa: E402
from fedward.errors import ConfigError, FedwardError  # noqa: E402
from fedward.flower import app as flower_app  # noqa: E402
from fedward.flower import launch  # noqa: E402
from fedward.engine.replies import reply_problem  # noqa: E402
from fedward.flower.client_app import app as client_app  # noqa: E402
from fedward.flower.handlers import apply_drill  # noqa: E402
from fedward.flower.node import NodeSettings, NodeStateStore, load_node_data  # noqa: E402
from fedward.flower.records import (  # noqa: E402
    decode_reply, decode_server_message, encode_reply, encode_server_message, spec_from_json, spec_to_json,
)
from fedward.flower.server import Coordinator, ServerSettings  # noqa: E402
from fedward.flower.tls import generate_certificates  # noqa: E402

SPEC = TaskSpec(num_classes=2, image_size=8, class_names=["a", "b"], mean=(0.5, 0.5, 0.5), std=(0.2, 0.2, 0.2),
                train_class_counts=[[3, 1], [2, 2]], global_class_counts=[5, 3])


# -- records -------------------------------------------------------------------------------------
def test_server_message_and_reply_round_trip_bit_for_bit():
    arrays = {"w": torch.randn(3, 2), "bn.num_batches_tracked": torch.tensor(7), "empty": torch.zeros(0)}
    content = encode_server_message(ServerMessage(4, arrays, {"total-rounds": 9}), {"run-key": "r1", "evaluate-local": True})
    message, extra = decode_server_message(content)
    assert message.round == 4 and message.config == {"total-rounds": 9} and extra == {"run-key": "r1", "evaluate-local": True}
    assert message.arrays.keys() == arrays.keys()
    for name in arrays:
        assert message.arrays[name].dtype == arrays[name].dtype and torch.equal(message.arrays[name], arrays[name])

    reply, report = decode_reply(encode_reply(ClientReply(2, arrays, {"num-examples": 32, "train-loss": 0.5}), [{"round": 4}]))
    assert reply.client_id == 2 and reply.metrics == {"num-examples": 32.0, "train-loss": 0.5} and report == [{"round": 4}]
    assert all(torch.equal(reply.arrays[n], arrays[n]) for n in arrays)


def test_a_node_learns_only_the_global_counts_and_its_own():
    text = spec_to_json(SPEC)
    assert "[3, 1]" not in text and "[2, 2]" not in text  # no client's own counts travel to the others
    spec = spec_from_json(text, 1, [2, 2])
    assert spec.train_class_counts == [None, [2, 2]] and spec.global_class_counts == [5, 3]
    assert (spec.num_classes, spec.class_names, spec.mean) == (2, ["a", "b"], (0.5, 0.5, 0.5))


# -- reply checks ---------------------------------------------------------------------------------
def fedavg_algorithm():
    cfg = build_config({"method": "fedavg", "model": "smallcnn", "image_size": 8})
    return get_algorithm("fedavg")(cfg, SPEC, lambda: None)


GLOBAL = {"w": torch.zeros(2, 3), "b": torch.zeros(2), "steps": torch.tensor(0)}


def reply_with(**changes):
    arrays = {"w": torch.ones(2, 3), "b": torch.ones(2), "steps": torch.tensor(5)}
    metrics = {"num-examples": 16.0}
    metrics.update(changes.pop("metrics", {}))
    arrays.update(changes)
    return ClientReply(0, arrays, metrics)


def test_sound_reply_passes():
    assert reply_problem(fedavg_algorithm(), reply_with(), GLOBAL) is None


@pytest.mark.parametrize("changes, expected", [
    ({"w": torch.tensor([[1.0, math.nan, 1.0], [1.0, 1.0, math.inf]])}, "array 'w' holds 2 non-finite value(s) (NaN or Inf)"),
    ({"b": torch.tensor([1.0, -math.inf])}, "array 'b' holds 1 non-finite value(s)"),
    ({"w": torch.ones(3, 2)}, "array 'w' has shape (3, 2), expected (2, 3)"),
    ({"b": torch.ones(2, dtype=torch.float64)}, "array 'b' has dtype torch.float64"),
    ({"images": torch.ones(4, 3, 8, 8)}, "undeclared array(s) ['images']"),
    ({"metrics": {"train-loss": math.nan}}, "metric 'train-loss' is nan"),
    ({"metrics": {"num-examples": 0.0}}, "metric 'num-examples' is 0.0, expected > 0"),
])
def test_bad_replies_are_named(changes, expected):
    assert expected in reply_problem(fedavg_algorithm(), reply_with(**changes), GLOBAL)


def test_fedkd_factors_are_checked_after_multiplying_out():
    cfg = build_config({"method": "fedkd", "image_size": 8})
    algorithm = get_algorithm("fedkd")(cfg, SPEC, lambda: None)
    global_state = {"w": torch.zeros(4, 6)}
    good = ClientReply(0, {"w::svd_u": torch.ones(4, 1), "w::svd_v": torch.ones(1, 6)}, {"num-examples": 3.0})
    assert reply_problem(algorithm, good, global_state) is None
    bad = ClientReply(0, {"w::svd_u": torch.ones(4, 1), "w::svd_v": torch.ones(1, 5)}, {"num-examples": 3.0})
    assert "do not form the global model" in reply_problem(algorithm, bad, global_state)


def test_drills_break_only_their_target():
    reply = ClientReply(1, {"n": torch.tensor(3), "w": torch.ones(2, 2)}, {"num-examples": 4.0})
    assert apply_drill("1:2:nan", reply, 3) is reply and apply_drill("0:2:nan", reply, 2) is reply
    assert torch.isnan(apply_drill("1:2:nan", reply, 2).arrays["w"]).sum() == 1
    assert torch.isinf(apply_drill("1:2:inf", reply, 2).arrays["w"]).sum() == 1
    assert apply_drill("1:2:shape", reply, 2).arrays["w"].shape == (3,)
    assert torch.equal(reply.arrays["w"], torch.ones(2, 2))  # the original is untouched
    with pytest.raises(ConfigError, match="KIND must be one of"):
        apply_drill("1:2:zero", reply, 2)


# -- evaluation from confusion matrices -------------------------------------------------------------
def test_rows_from_a_confusion_matrix_equal_the_rows_of_the_predictions():
    labels = np.array([0, 0, 1, 2, 2, 2, 1, 0])
    preds = np.array([0, 1, 1, 2, 0, 2, 1, 0])
    scores = np.eye(4)[preds] * 0.7 + 0.075  # rows sum to 1; the predicted class scores highest
    original = Predictions(labels, preds, 3.25, scores=scores)
    rebuilt = Predictions.from_confusion(original.confusion(4), 3.25, original.auroc)
    assert original.confusion(4).tolist() == [[2, 1, 0, 0], [0, 2, 0, 0], [1, 0, 2, 0], [0, 0, 0, 0]]
    assert rebuilt.row(4, round=1) == original.row(4, round=1)
    assert original.row(4)["confusion_matrix"] == original.confusion(4).tolist()
    with pytest.raises(ValueError, match="square table"):
        Predictions.from_confusion([[1, 2]], 0.0)


# -- node state ------------------------------------------------------------------------------------
def test_state_store_keeps_the_last_rounds_and_loads_the_one_before(tmp_path):
    store = NodeStateStore(tmp_path, "run-1", 2, keep=2)
    assert store.load_before(1) == {}
    for r in (1, 2, 3):
        store.save(r, {"round": r, "m": torch.full((2,), float(r))})
    assert store.rounds() == [2, 3]
    assert store.load_before(3)["round"] == 2 and store.load_before(9)["round"] == 3
    assert store.folder == tmp_path / "run-1" / "client-2"
    (store.folder / "round-3.pt").write_bytes(b"junk")
    with pytest.raises(ConfigError, match="round-3.pt cannot be read"):
        store.load_before(4)
    with pytest.raises(ConfigError, match="run key"):
        NodeStateStore(tmp_path, "../escape", 0)


def test_node_settings_name_what_is_wrong():
    with pytest.raises(ConfigError, match="no client-id"):
        NodeSettings.from_node_config({"data-dir": "/x"})
    with pytest.raises(ConfigError, match="client-id='two' is not an integer"):
        NodeSettings.from_node_config({"client-id": "two"})
    settings = NodeSettings.from_node_config({"partition-id": 2, "num-partitions": 3})  # Flower's simulation runtime
    assert settings.client_id == 2 and settings.device == ("cuda" if torch.cuda.is_available() else "cpu")


def test_a_node_holds_only_its_own_client(tiny_values, tmp_path):
    from test_folders import make_tree

    cfg = build_config({**tiny_values, "client_number": 3, "partition_method": "iid"})
    settings = NodeSettings(1, None, tmp_path, "cpu", None)
    data = load_node_data(cfg, settings)
    assert [c.client_id for c in data.clients] == [1] and data.info["num_clients_loaded"] == 3
    with pytest.raises(ConfigError, match="client-id 5: the synthetic data .* holds 3 clients"):
        load_node_data(cfg, NodeSettings(5, None, tmp_path, "cpu", None))
    # a hospital's own folder: one client, which becomes client-id 4 of the federation
    root = make_tree(tmp_path / "hospital", {"beta": {"train": {"benign": 2, "malignant": 2}, "test": {"benign": 1, "malignant": 1}}})
    folders_cfg = build_config(applicable({**tiny_values, "dataset": "folders", "data_dir": str(root), "image_size": 8}))
    data = load_node_data(folders_cfg, NodeSettings(4, str(root), tmp_path, "cpu", None))
    assert [(c.client_id, c.name) for c in data.clients] == [(4, "beta")]


# -- launch commands, app, certificates ------------------------------------------------------------
def test_commands_carry_tls_or_insecure_never_both(tmp_path):
    node = launch.supernode_command(superlink="10.0.0.1:9093", client_id=1, data=str(tmp_path), state_dir=str(tmp_path / "s"),
                                    port=9401, ca_cert=None, insecure=True)
    assert node[node.index("--superlink") + 1] == "10.0.0.1:9093" and "--insecure" in node
    assert node[:3] == [sys.executable, "-m", "fedward.flower.supernode"]  # Flower's CLI with shorter waits
    config = node[node.index("--node-config") + 1]
    assert config == f"client-id=1 data-dir='{tmp_path.resolve()}' state-dir='{(tmp_path / 's').resolve()}'"
    with pytest.raises(ConfigError, match="either --insecure .* or --ca-cert"):
        launch.supernode_command(superlink="h:1", client_id=0, data=None, state_dir=None, port=1, ca_cert=None, insecure=False)
    with pytest.raises(ConfigError, match="--data .* does not exist"):
        launch.supernode_command(superlink="h:1", client_id=0, data=str(tmp_path / "nope"), state_dir=None, port=1,
                                 ca_cert=None, insecure=True)
    paths = generate_certificates(tmp_path / "certs")
    link = launch.superlink_command(host="0.0.0.0", port=9093, certs=str(tmp_path / "certs"), insecure=False, database=None)
    assert link[link.index("--ssl-certfile") + 1] == str(paths["server.pem"]) and "--insecure" not in link
    assert "--disable-runtime-dependency-installation" in link
    paths["server.key"].unlink()
    with pytest.raises(ConfigError, match="server.key is missing"):
        launch.superlink_command(host="0.0.0.0", port=9093, certs=str(tmp_path / "certs"), insecure=False, database=None)


def test_certificates_chain_to_the_ca_and_name_the_hosts(tmp_path):
    import ipaddress

    from cryptography import x509

    paths = generate_certificates(tmp_path, ["hospital-server.example.org", "10.1.2.3"])
    ca = x509.load_pem_x509_certificate(paths["ca.crt"].read_bytes())
    server = x509.load_pem_x509_certificate(paths["server.pem"].read_bytes())
    server.verify_directly_issued_by(ca)  # raises if the signature does not verify
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["hospital-server.example.org", "localhost"]
    assert ipaddress.ip_address("10.1.2.3") in names.get_values_for_type(x509.IPAddress)
    assert ipaddress.ip_address("127.0.0.1") in names.get_values_for_type(x509.IPAddress)
    assert oct(paths["server.key"].stat().st_mode & 0o777) == "0o600"


def test_the_app_points_at_fedwards_apps_and_declares_every_override(tmp_path, tiny_values):
    folder = flower_app.write_app(tmp_path / "app")
    project = tomllib.loads((folder / "pyproject.toml").read_text())
    assert project["tool"]["flwr"]["app"]["components"] == {"serverapp": "fedward.flower.server_app:app",
                                                          "clientapp": "fedward.flower.client_app:app"}
    assert project["tool"]["flwr"]["app"]["config"] == flower_app.RUN_CONFIG_DEFAULTS
    overrides = launch.run_config_overrides(build_config(tiny_values), run_dir=tmp_path / "r", resume=False, min_clients=2,
                                            round_timeout=30, join_timeout=20)
    assert set(overrides) == set(flower_app.RUN_CONFIG_DEFAULTS)  # Flower rejects keys the app does not declare
    assert json.loads(overrides["fedward-config"])["output"] == str(tmp_path / "r")


def test_cli_writes_the_app_and_names_a_missing_tls_choice(tmp_path, tiny_values, capsys):
    from fedward.cli import main

    assert main(["flower", "app", str(tmp_path / "app")]) == 0
    assert tomllib.loads((tmp_path / "app" / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["publisher"] == "fedward"
    assert main(["flower", "certs", str(tmp_path / "certs"), "--host", "10.0.0.5"]) == 0
    assert sorted(p.name for p in (tmp_path / "certs").iterdir()) == ["ca.crt", "ca.key", "server.key", "server.pem"]
    code = main(["flower", "run", "--superlink", "10.0.0.5:9093", "--output", str(tmp_path / "run"),
                 "--model", "smallcnn", "--comm_round", "1"])
    assert code == 2 and "give either --insecure" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


# -- the round loop over a loopback grid -------------------------------------------------------------
def over_the_wire(content: RecordDict) -> RecordDict:
    """A copy of ``content`` as the other end gets it (Flower's protobuf form): no object is shared."""
    from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
    from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

    proto = ProtoRecordDict()
    proto.ParseFromString(recorddict_to_proto(content).SerializeToString())
    return recorddict_from_proto(proto)


class LoopbackGrid:
    """A Flower Grid in this process: every message goes straight to fedward's ClientApp, with the
    node config of its node. ``down`` nodes are listed but never answer (a killed SuperNode the
    SuperLink has not noticed yet); ``on_round`` lets a test act between rounds."""

    def __init__(self, node_configs: dict[int, dict], run_config: dict):
        self.node_configs = dict(node_configs)
        self.run_config = run_config
        self.down: set[int] = set()
        self.replies: dict[str, Message] = {}
        self.sent: list[Message] = []
        self.node_states = {n: RecordDict() for n in self.node_configs}  # a SuperNode keeps each run's context state
        self.on_push = lambda grid, messages: None

    def get_node_ids(self):
        return list(self.node_configs)

    def push_messages(self, messages):
        self.on_push(self, messages)
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = message.object_id
            self.sent.append(message)
            node_id = message.metadata.dst_node_id
            ids.append(message.object_id)
            if node_id in self.down:
                continue
            TaskIdentity.node_id = node_id
            message = Message(over_the_wire(message.content), message.metadata.dst_node_id,
                              message.metadata.message_type, ttl=message.metadata.ttl, group_id=message.metadata.group_id)
            message.metadata.__dict__["_message_id"] = ids[-1]
            context = Context(run_id=1, node_id=node_id, node_config=self.node_configs[node_id],
                              state=self.node_states.setdefault(node_id, RecordDict()), run_config=self.run_config)
            try:
                reply = client_app(message, context)
            except Exception as err:  # a real SuperNode turns a ClientApp exception into an error reply
                reply = Message(Error(code=0, reason=f"{type(err).__name__}: {err}"), reply_to=message)
            TaskIdentity.node_id = 0
            self.replies[ids[-1]] = reply
        return ids

    def pull_messages(self, message_ids):
        return [self.replies.pop(i) for i in list(message_ids) if i in self.replies]


def loopback_run(cfg, tmp_path, *, clients=3, node_ids=None, drill="", min_clients=0, on_push=None, logs=None):
    node_ids = node_ids or [101 + k for k in range(clients)]
    nodes = {n: {"client-id": k, "state-dir": str(tmp_path / "nodes")} for k, n in enumerate(node_ids)}
    run_config = {**flower_app.RUN_CONFIG_DEFAULTS,
                  **launch.run_config_overrides(cfg, run_dir=tmp_path / "flower-run", resume=False, min_clients=min_clients,
                                                round_timeout=5, join_timeout=5, drill_bad_reply=drill)}
    grid = LoopbackGrid(nodes, run_config)
    if on_push:
        grid.on_push = on_push
    settings = ServerSettings.from_run_config(run_config, cfg)
    settings.poll_interval = 0.01
    coordinator = Coordinator(grid, cfg, settings, log=(logs.append if logs is not None else lambda line: None))
    coordinator.run()
    return coordinator, grid


def simulation_model(cfg, tmp_path):
    cfg = build_config({**cfg.to_dict(), "output": str(tmp_path / "sim")})
    run_dir, data = prepare(cfg)
    run(cfg, run_dir, data=data)
    if not run_dir.final_model_path.is_file():  # personalised: no global model file
        return None, run_dir
    return torch.load(run_dir.final_model_path, weights_only=False)["state_dict"], run_dir


HETERO = dict(client_models="smallcnn,resnet5,smallcnn", stem="small", messenger_dim=16, injection_epochs=1,
              distillation_epochs=1)


@pytest.mark.parametrize("method, extra", [("fedavg", {}), ("fedprox", {"finetune_epochs": 1}),
                                           ("fedmas", {"pre_trained_models": "random", "free_u": 1}),
                                           ("mhpflid", HETERO), ("fedadam", {}), ("fedyogi", {}), ("fedadagrad", {}),
                                           ("fedavgm", {}), ("scaffold", {"clients_per_round": 2}),  # partial participation
                                           ("cyclic", {"comm_round": 4}),
                                           ("fedavg", {"dp_sgd_clip": 1.0, "dp_sgd_noise_multiplier": 1.0}),
                                           ("fedavgm", {"secure_aggregation": True}),
                                           ("fedmas", {"pre_trained_models": "random", "free_u": 1,
                                                       "aggregate_method": "mas", "secure_aggregation": True})])
def test_loopback_run_equals_the_simulation(method, extra, tiny_values, tmp_path, task_identity):
    cfg = build_config(applicable({**tiny_values, "method": method, "client_number": 3, "partition_method": "iid", **extra}))
    coordinator, _ = loopback_run(cfg, tmp_path)
    sim_model, sim_dir = simulation_model(cfg, tmp_path)
    if method == "mhpflid":  # the messenger is the global state; compare the last checkpoints
        flower_model = torch.load(coordinator.run_dir.checkpoints_dir / "last.pt", weights_only=False)["global_state"]
        sim_model = torch.load(sim_dir.checkpoints_dir / "last.pt", weights_only=False)["global_state"]
    else:
        flower_model = torch.load(coordinator.run_dir.final_model_path, weights_only=False)["state_dict"]
    assert max(float((flower_model[k].double() - sim_model[k].double()).abs().max()) for k in sim_model) == 0.0
    # the same metrics rows (besides who took part), the same report files
    same = [r for r in coordinator.run_dir.read_rows() if r["scope"] != "participation"]
    # personalised methods: the simulation also scores each local model on the pooled test set, which
    # no node can do (it holds one hospital's data)
    sim_rows = sim_dir.read_rows()
    assert same == [r for r in sim_rows if r["scope"] != "participation" and (r.get("data") != "pooled" or r["scope"] == "server")]
    # the same clients took part in each round (cyclic: one a round), in both engines
    taking_part = lambda rows: [(r["round"], r["client"], r["status"]) for r in rows if r["scope"] == "participation"]  # noqa: E731
    assert taking_part(coordinator.run_dir.read_rows()) == taking_part(sim_rows)
    assert (coordinator.run_dir.path / "report.html").is_file() and (coordinator.run_dir.path / "results.json").is_file()
    if cfg.has("dp_sgd_clip") and cfg.dp_sgd_clip is not None:  # each node's own epsilon, reported the same
        per_sample = json.loads(coordinator.run_dir.results_path.read_text())["per_sample_privacy"]
        assert per_sample == json.loads(sim_dir.results_path.read_text())["per_sample_privacy"]
        assert per_sample["epsilon"] is not None
    # per-image predictions: none at the server; the nodes' files hold the simulation's lines of their
    # clients (but the global model's at the validation-selected round, which takes the pooled
    # validation score; a personalised client's own selected round is its node's to keep)
    assert not list(coordinator.run_dir.path.glob("predictions_*.csv"))
    sim_files = sorted(f for f in sim_dir.path.glob("predictions_*.csv") if f.stem != "predictions_global_selected")
    assert sim_files
    for sim_file in sim_files:
        header, *sim_lines = sim_file.read_text().splitlines()
        node_files = sorted((tmp_path / "nodes").glob(f"*/client-*/{sim_file.name}"))
        assert all(f.read_text().splitlines()[0] == header for f in node_files)
        assert sorted(line for f in node_files for line in f.read_text().splitlines()[1:]) == sorted(sim_lines)


def test_dropout_bad_reply_and_rejoin(tiny_values, tmp_path, task_identity):
    """Round 1: client 1 sends a NaN (rejected). Round 2: client 2's node dies (dropped). Round 3: it
    is back under a new node id, is greeted again and takes part from its saved state."""
    cfg = build_config({**tiny_values, "method": "fedavg", "client_number": 3, "partition_method": "iid",
                        "comm_round": 3})
    sent_rounds = []

    def on_push(grid, messages):
        round_label = messages[0].metadata.group_id
        sent_rounds.append((round_label, messages[0].metadata.message_type))
        if round_label == "round-2" and messages[0].metadata.message_type == "train":
            grid.down.add(103)
        if round_label == "round-2" and messages[0].metadata.message_type == "evaluate":
            config = grid.node_configs.pop(103)  # the SuperLink drops the dead node; the restarted one registers
            grid.node_configs[203] = config
            raise_rejoin.append(True)

    raise_rejoin: list[bool] = []
    logs: list[str] = []
    coordinator, grid = loopback_run(cfg, tmp_path, drill="1:1:nan", min_clients=2, on_push=on_push, logs=logs)
    rows = coordinator.run_dir.read_rows()
    taking_part = {(r["round"], r["client"]): r["status"] for r in rows if r["scope"] == "participation"}
    assert taking_part[(1, 1)] == "rejected" and taking_part[(2, 2)] == "dropped"
    assert [taking_part[(3, k)] for k in range(3)] == ["ok", "ok", "ok"]
    reasons = {(r["round"], r["client"]): r.get("reason", "") for r in rows if r["scope"] == "participation"}
    assert "non-finite" in reasons[(1, 1)] and "no reply within 5 s" in reasons[(2, 2)]
    weights = {r["round"]: r["clients"] for r in rows if r["scope"] == "aggregation"}
    assert weights == {1: [0, 2], 2: [0, 1], 3: [0, 1, 2]}
    assert any("round 2: client 2 (node 103) dropped" in line for line in logs)
    assert any("client 2 (client_2) joined as node 203" in line for line in logs) and raise_rejoin
    assert (coordinator.run_dir.path / "final_model.pt").is_file()


def test_secure_aggregation_leaves_out_a_node_whose_update_cannot_be_summed(tiny_values, tmp_path, task_identity):
    """Round 1: client 1's update holds a NaN, so its node refuses to mask it (an error reply) and
    SecAgg+ removes its masks from the other two's sum; round 2: all three."""
    cfg = build_config({**tiny_values, "method": "fedavg", "client_number": 3, "partition_method": "iid",
                        "comm_round": 2, "secure_aggregation": True})
    coordinator, _ = loopback_run(cfg, tmp_path, drill="1:1:nan", min_clients=2)
    rows = coordinator.run_dir.read_rows()
    taking_part = {(r["round"], r["client"]): (r["status"], r.get("reason", "")) for r in rows
                   if r["scope"] == "participation"}
    assert taking_part[(1, 1)][0] == "dropped" and "NaN" in taking_part[(1, 1)][1]
    assert {r["round"]: r["clients"] for r in rows if r["scope"] == "aggregation"} == {1: [0, 2], 2: [0, 1, 2]}
    audit = [json.loads(line) for line in (coordinator.run_dir.path / "messages.jsonl").read_text().splitlines()]
    trains = [line for line in audit if line["type"] == "train"]
    # what the server kept of each train reply: no array in any record (the masked update is one
    # vector of integers in Flower's SecAgg+ record)
    assert len(trains) == 5
    assert all("arrays" not in line["records"] and "masked_params" in line["records"]["secaggplus_configs"]
               for line in trains)
    stages = {line["type"] for line in audit} - {"train", "evaluate"}
    assert stages == {"secagg-setup", "secagg-share-keys", "secagg-unmask"}  # every stage's records are audited
    assert all(v == {} for line in audit if line["type"] != "evaluate" for v in line["records"].values()
               if isinstance(v, dict))
    assert json.loads(coordinator.run_dir.results_path.read_text())["secure_aggregation"]["clipped_entries"] == 0


def _stop_in_round_then_resume(cfg, tmp_path, stop_round: int) -> list[str]:
    """A 2-client loopback run whose node 102 goes down in ``stop_round`` (too few replies stop the
    run), then ``--resume`` with both nodes back; the resumed run's log lines."""
    def kill(grid, messages):
        if messages[0].metadata.group_id == f"round-{stop_round}":
            grid.down.add(102)

    with pytest.raises(FedwardError, match=f"round {stop_round}: 1 usable replies, fewer than the minimum 2; "
                                           f"resume after round {stop_round - 1}"):
        loopback_run(cfg, tmp_path, clients=2, on_push=kill)
    run_dir = tmp_path / "flower-run"
    nodes = {101: {"client-id": 0, "state-dir": str(tmp_path / "nodes")}, 102: {"client-id": 1, "state-dir": str(tmp_path / "nodes")}}
    run_config = {**flower_app.RUN_CONFIG_DEFAULTS,
                  **launch.run_config_overrides(cfg, run_dir=run_dir, resume=True, min_clients=0, round_timeout=5, join_timeout=5)}
    logs: list[str] = []
    Coordinator(LoopbackGrid(nodes, run_config), cfg, ServerSettings.from_run_config(run_config, cfg),
                log=logs.append).run()
    resumed = torch.load(run_dir / "final_model.pt", weights_only=False)["state_dict"]
    sim_model, _ = simulation_model(cfg, tmp_path)
    assert all(torch.equal(resumed[k], sim_model[k]) for k in sim_model)
    return logs


@pytest.mark.parametrize("method", ["fedavg", "fedadam", "scaffold"])
def test_too_few_replies_stop_the_round_and_the_run_resumes(method, tiny_values, tmp_path, task_identity):
    """The server state (FedAdam's moments, SCAFFOLD's control variate) is in the server's
    checkpoint and the client states on the nodes: the resumed run ends at the simulation's model."""
    cfg = build_config({**tiny_values, "method": method, "client_number": 2, "partition_method": "iid", "comm_round": 2})
    logs = _stop_in_round_then_resume(cfg, tmp_path, stop_round=2)
    assert any("resuming" in line and "after round 1" in line for line in logs)


def test_a_run_stopped_in_round_1_resumes_from_round_0(tiny_values, tmp_path, task_identity):
    """No checkpoint yet: --resume starts the run again (same run key, the nodes start round 1 from
    no state) and ends at the simulation's model."""
    cfg = build_config({**tiny_values, "method": "fedavg", "client_number": 2, "partition_method": "iid", "comm_round": 2})
    logs = _stop_in_round_then_resume(cfg, tmp_path, stop_round=1)
    assert any("starting it again from round 0" in line for line in logs)


def test_nodes_that_disagree_are_refused(tiny_values, tmp_path, task_identity):
    cfg = build_config({**tiny_values, "method": "fedavg", "client_number": 2, "partition_method": "iid", "comm_round": 1})
    logs: list[str] = []
    nodes = {101: {"client-id": 0}, 102: {"client-id": 7}}  # 7 is outside the federation
    run_config = {**flower_app.RUN_CONFIG_DEFAULTS,
                  **launch.run_config_overrides(cfg, run_dir=tmp_path / "r", resume=False, min_clients=0, round_timeout=5,
                                                join_timeout=1)}
    coordinator = Coordinator(LoopbackGrid(nodes, run_config), cfg, ServerSettings.from_run_config(run_config, cfg),
                              log=logs.append)
    with pytest.raises(FedwardError, match=r"handshake: after 1 s only clients \[0\] are connected"):
        coordinator.run()
    assert any("node 102 refused: error on the node: ConfigError: client-id 7: the synthetic data at (built in) holds 2 "
               "clients" in line for line in logs)
    assert not (tmp_path / "r").exists()  # nothing written before the federation is complete


def test_centralized_has_no_deployment(tiny_values, tmp_path):
    cfg = build_config({**tiny_values, "method": "centralized"})
    with pytest.raises(ConfigError, match="centralized pools every hospital's data"):
        Coordinator(None, cfg, ServerSettings(run_dir=str(tmp_path)))


PRIVACY_SETTINGS = {"fedavg": {}, "fedprox": {}, "moon": {}, "fedmas": {"pre_trained_models": "random", "free_u": 1},
                    "fedadam": {}, "fedyogi": {}, "fedadagrad": {}, "fedavgm": {}, "scaffold": {}, "cyclic": {},
                    "local": {"client_models": HETERO["client_models"], "stem": "small"},
                    "mhpflid": HETERO, "fml": HETERO, "fedkd": HETERO,
                    **{m: {**HETERO, "public_size": 48} for m in ("fedmd", "dsfl", "ktpfl")},
                    **{m: {**HETERO, "public_size": 48, "feddf_server_steps": 5, "feddf_server_batch": 24}
                       for m in ("feddf", "pfeddf")},
                    # personalised on one shared architecture: resnet5 is the name the final-model check expects
                    **{m: {"model": "resnet5", "stem": "small"} for m in ("fedrep", "lgfedavg", "apfl", "ditto")}}


def test_privacy_covers_every_method_with_a_deployment():
    from fedward.algorithms import METHOD_REGISTRY

    assert set(PRIVACY_SETTINGS) == {name for name, cls in METHOD_REGISTRY.items() if not cls.centralized}


@pytest.mark.parametrize("method", sorted(PRIVACY_SETTINGS))
def test_privacy_server_side_messages_hold_only_declared_records(method, tiny_values, tmp_path, task_identity):
    """Every record each node sent the server, read back on the server side: only the method's
    declared arrays, scalar metrics and evaluation summaries; no array equal to any local model,
    R, T or W_h tensor; and personalised models stay in the node's state folder."""
    cfg = build_config(applicable({**tiny_values, "method": method, "client_number": 3, "partition_method": "iid",
                                   "comm_round": 1, **PRIVACY_SETTINGS[method]}))
    received: list[Message] = []

    class RecordingGrid(LoopbackGrid):
        def pull_messages(self, message_ids):
            replies = super().pull_messages(message_ids)
            received.extend(replies)
            return replies

    nodes = {101 + k: {"client-id": k, "state-dir": str(tmp_path / "nodes")} for k in range(3)}
    run_config = {**flower_app.RUN_CONFIG_DEFAULTS,
                  **launch.run_config_overrides(cfg, run_dir=tmp_path / "r", resume=False, min_clients=0, round_timeout=5,
                                                join_timeout=5)}
    coordinator = Coordinator(RecordingGrid(nodes, run_config), cfg, ServerSettings.from_run_config(run_config, cfg),
                              log=lambda line: None)
    coordinator.run()
    global_keys = set(coordinator.algorithm.build_model().state_dict())
    declared = coordinator.algorithm.declared_reply_keys(
        {k: torch.zeros(1) for k in global_keys}) if method == "fedkd" else coordinator.algorithm.declared_reply_keys(
        coordinator.algorithm.build_model().state_dict())
    # FedRep and LG-FedAvg send one part of the personal model by design: the other part is the private one
    shared = declared if declared < global_keys else set()
    local_tensors = []
    for k in range(3):
        saved = sorted((tmp_path / "nodes").glob(f"*/client-{k}/round-*.pt"))
        if not saved:  # cyclic: one client a round
            continue
        state = torch.load(saved[-1], weights_only=False)
        for value in state.values():
            if isinstance(value, dict):
                local_tensors += [t for name, t in value.items()
                                  if isinstance(t, torch.Tensor) and t.numel() > 1 and name not in shared]
    private = coordinator.algorithm.personalised or coordinator.algorithm.heterogeneous
    assert local_tensors or not private
    for message in received:
        assert set(message.content.keys()) <= {"arrays", "metrics", "facts", "report"}
        if "arrays" in message.content:
            arrays = message.content["arrays"].to_torch_state_dict()
            assert set(arrays) <= declared
            if private:  # a personalised model, R, T or W_h never equals anything sent
                assert not any(a.shape == t.shape and torch.equal(a, t) for a in arrays.values() for t in local_tensors)
        if "metrics" in message.content:
            assert all(isinstance(v, (int, float)) for v in message.content["metrics"].values())
        if "facts" in message.content:
            assert set(json.loads(message.content["facts"]["json"])) == {
                "client-id", "client-name", "data-set", "clients-in-data", "num-classes", "class-names", "image-size",
                "mean", "std", "train-class-counts"}
    if method != "local":
        assert any("arrays" in m.content and len(m.content["arrays"]) for m in received)
    # personalised models are on the nodes, not in the server's run directory
    assert not list(coordinator.run_dir.path.glob("final_model_client_*.pt"))
    finals = sorted((tmp_path / "nodes").glob("*/client-*/final_model.pt"))
    if coordinator.algorithm.personalised:
        assert len(finals) == 3 and torch.load(finals[1], weights_only=False)["model"] == "resnet5"
    else:
        assert not finals and coordinator.run_dir.final_model_path.is_file()


def test_supernode_authentication_needs_tls_and_real_key_files(tmp_path):
    from fedward.flower import launch
    from fedward.flower.tls import generate_node_keys

    with pytest.raises(ConfigError, match="--auth needs TLS"):
        launch.superlink_command(host="127.0.0.1", port=1, certs=None, insecure=True, database=None, auth=True)
    with pytest.raises(ConfigError, match="--auth-key .*missing.key is not a file"):
        launch.supernode_command(superlink="h:1", client_id=0, data=None, state_dir=None, port=2, ca_cert=None,
                                 insecure=True, auth_key=str(tmp_path / "missing.key"))
    keys = generate_node_keys(tmp_path, range(2))
    assert keys["node-1.pub"].read_text().startswith("ecdsa-sha2-nistp384 ")
    assert keys["node-0.key"].stat().st_mode & 0o777 == 0o600
    command = launch.supernode_command(superlink="h:1", client_id=0, data=None, state_dir=None, port=2, ca_cert=None,
                                       insecure=True, auth_key=str(keys["node-0.key"]))
    assert command[-2:] == ["--auth-supernode-private-key", str(keys["node-0.key"].resolve())]
    before = keys["node-0.key"].read_bytes()
    assert generate_node_keys(tmp_path, range(2))["node-0.key"].read_bytes() == before  # kept, never overwritten


# -- the warm node worker ---------------------------------------------------------------------------
def _start_worker(path, parent_pid=None):
    import os
    import subprocess
    import sys

    return subprocess.Popen([sys.executable, "-m", "fedward.flower.worker", "--socket", str(path),
                             "--parent-pid", str(parent_pid or os.getpid())])


def _wait_for_socket(path, process, timeout=120.0):
    import time

    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None and time.monotonic() < deadline, "the worker did not start"
        time.sleep(0.1)


@pytest.mark.slow
def test_nodes_with_warm_workers_give_the_simulations_run(tiny_values, tmp_path, task_identity):
    """The ClientApp hands every message to its node's worker process (pickled records over a Unix
    socket): the run equals the simulation's, and a worker's error reaches the ClientApp as itself."""
    from fedward.flower.worker import WORKER_KEY, forward, socket_path

    cfg = build_config(applicable({**tiny_values, "method": "fedavg", "client_number": 3, "partition_method": "iid"}))
    sockets = [socket_path(90000 + k) for k in range(3)]
    workers = [_start_worker(path) for path in sockets]
    try:
        for path, process in zip(sockets, workers):
            _wait_for_socket(path, process)
        nodes = {101 + k: {"client-id": k, "state-dir": str(tmp_path / "nodes"), WORKER_KEY: str(sockets[k])}
                 for k in range(3)}
        run_config = {**flower_app.RUN_CONFIG_DEFAULTS,
                      **launch.run_config_overrides(cfg, run_dir=tmp_path / "flower-run", resume=False, min_clients=0,
                                                    round_timeout=60, join_timeout=60)}
        grid = LoopbackGrid(nodes, run_config)
        settings = ServerSettings.from_run_config(run_config, cfg)
        settings.poll_interval = 0.01
        coordinator = Coordinator(grid, cfg, settings, log=lambda line: None)
        coordinator.run()
        flower_model = torch.load(coordinator.run_dir.final_model_path, weights_only=False)["state_dict"]
        sim_model, _ = simulation_model(cfg, tmp_path)
        assert all(torch.equal(flower_model[k], sim_model[k]) for k in sim_model)
        assert sorted(p.name for p in (tmp_path / "nodes").glob("*/client-1/predictions_*.csv")) == ["predictions_global.csv"]
        with pytest.raises(ConfigError, match="no client-id"):  # raised in the worker, re-raised here
            forward(str(sockets[0]), "query", RecordDict(), run_config, {})
        assert forward(str(tmp_path / "no-worker.sock"), "query", RecordDict(), run_config, {}) is None
    finally:
        for process in workers:
            process.kill()
            process.wait()


def test_a_worker_ends_with_its_supernode(tmp_path):
    """The worker watches the SuperNode's pid (its parent): once the parent is gone it exits."""
    import subprocess
    import sys

    from fedward.flower.worker import socket_path

    path = socket_path(90100)
    parent = subprocess.Popen([sys.executable, "-c", (
        "import subprocess, sys, os, time; "
        f"subprocess.Popen([sys.executable, '-m', 'fedward.flower.worker', '--socket', {str(path)!r}, "
        "'--parent-pid', str(os.getpid())]); time.sleep(60)")])
    try:
        _wait_for_socket(path, parent)
    finally:
        parent.kill()
        parent.wait()
    import time

    deadline = time.monotonic() + 30
    while path.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not path.exists()  # it removed its socket on the way out


def test_the_supernode_loop_sleeps_at_most_the_idle_poll(monkeypatch):
    import time as real_time

    from fedward.flower.supernode import capped_time

    slept = []
    monkeypatch.setattr(real_time, "sleep", slept.append)
    clock = capped_time(0.2)
    clock.sleep(3)  # Flower's idle wait
    clock.sleep(0.5)  # its wait for a reply
    clock.sleep(0.05)
    assert slept == [0.2, 0.2, 0.05]
    assert clock.monotonic is real_time.monotonic and clock.time is real_time.time  # the rest is time's own
