"""Secure aggregation (SecAgg+): the arithmetic on hand-made arrays, Flower's protocol end to end
in this process, what the server sees, and the refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common import bytes_to_ndarray
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

from fedward.algorithms.aggregate import weighted_average
from fedward.config import build_config
from fedward.engine.secure import SecureMean, secure_average, secure_in_process
from fedward.engine.rounds import Outcome
from fedward.algorithms.base import ClientReply
from fedward.errors import ConfigError
from fedward.flower.keys import ARRAYS, CLIENT_ID, CONFIG, METRICS
from fedward.flower.secagg import secure_mod, secure_round
from fedward.secure_aggregation import (
    CLEAR_RECORD, QUANTIZATION_RANGE, SecureSettings, client_update, error_bound, quantised,
    rounding_seed,
)

# Three clients' hand-made models: a 2x3 weight, a bias and an integer counter.
START = {"w": torch.tensor([[0.5, -1.0, 2.0], [0.0, 0.25, -0.75]]), "b": torch.tensor([0.1, -0.2]),
         "count": torch.tensor(7)}
UPDATES = [torch.tensor([[0.01, -0.02, 0.03], [0.5, -0.5, 0.0]]), torch.tensor([[-0.3, 0.0, 0.125], [1.0, 2.0, -3.0]]),
           torch.tensor([[0.2, 0.2, 0.2], [-0.1, 0.05, 0.7]])]
BIAS_UPDATES = [torch.tensor([0.5, 0.0]), torch.tensor([-0.25, 1.5]), torch.tensor([0.0, -1.0])]
EXAMPLES = [120.0, 40.0, 200.0]  # num-examples: FedAvg weights 1/3, 1/9, 5/9
SETTINGS = SecureSettings("num-examples", max_weight=200.0)


def trained(k: int) -> dict[str, torch.Tensor]:
    return {"w": START["w"] + UPDATES[k], "b": START["b"] + BIAS_UPDATES[k], "count": START["count"] + 3 * (k + 1)}


def replies() -> list[ClientReply]:
    return [ClientReply(k, trained(k), {"num-examples": EXAMPLES[k], "train-loss": 0.5 + k}) for k in range(3)]


def test_the_secure_mean_is_the_weighted_mean_within_the_quantisation_error():
    outcomes = [Outcome(r.client_id, r) for r in replies()]
    outcomes, mean = secure_in_process(outcomes, START, SETTINGS, seed=0, round_index=1)
    weights = [120 / 360, 40 / 360, 200 / 360]
    states = [r.arrays for r in replies()]
    exact = weighted_average(states, weights)
    assert mean.names == ["b", "w"] and mean.num_clients == 3
    ratios = sum(n / 200.0 for n in EXAMPLES)
    bound = error_bound(3, ratios, 8.0, largest_update=3.0)
    assert bound < 1e-5
    for name, value in zip(mean.names, mean.mean):
        by_hand = sum(w * (r[name] - START[name]).double() for w, r in zip(weights, states))
        assert float((torch.from_numpy(value) - by_hand).abs().max()) <= bound
        assert float((torch.from_numpy(value) - by_hand).abs().max()) > 0  # it is quantised
    # the server's model: the global model plus the mean, the counter averaged in the clear and truncated
    average = secure_average(START, mean, [o.reply for o in outcomes], weights)
    assert int(average["count"]) == int(exact["count"]) == 13  # (10 * 120 + 13 * 40 + 16 * 200) / 360 = 13.67
    assert float((average["w"] - exact["w"]).abs().max()) <= bound + 1e-6  # plus float32 rounding of the sum
    # what the server holds of each client: metrics and the integer counter, no float array
    assert all(set(o.reply.arrays) == {"count"} for o in outcomes)
    assert [o.reply.metrics["secure-clipped"] for o in outcomes] == [0.0, 0.0, 0.0]


def test_each_clients_rounding_is_seeded_and_the_clipping_is_counted():
    update = client_update({k: v.numpy() for k, v in START.items()}, {k: v.numpy() for k, v in trained(1).items()},
                           {"num-examples": 40.0}, json.loads(SETTINGS.client_json()))
    # weight ratio 40 / 200 = 0.2: entries above 8 / 0.2 = 40 are clipped; none here, and one with clipping range 0.5
    assert update.clipped == 0
    tight = client_update({k: v.numpy() for k, v in START.items()}, {k: v.numpy() for k, v in trained(1).items()},
                          {"num-examples": 40.0}, {**json.loads(SETTINGS.client_json()), "clipping_range": 0.5})
    assert tight.clipped == 1  # |update| > 0.5 / 0.2 = 2.5: the -3.0 alone
    seed = rounding_seed(0, 1, 1)
    first, again = quantised(update, 200.0, 8.0, seed), quantised(update, 200.0, 8.0, seed)
    other = quantised(update, 200.0, 8.0, rounding_seed(0, 2, 1))
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not all(np.array_equal(a, b) for a, b in zip(first[1:], other[1:]))
    assert int(first[0][0]) == round(0.2 * QUANTIZATION_RANGE)  # the weight ratio, quantised, travels first


def wire(content: RecordDict) -> RecordDict:
    """``content`` as the other end receives it (Flower's protobuf form)."""
    from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
    from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

    proto = ProtoRecordDict()
    proto.ParseFromString(recorddict_to_proto(content).SerializeToString())
    return recorddict_from_proto(proto)


class Federation:
    """Three nodes in this process: Flower's ClientApp with fedward's SecAgg+ mod around a train
    handler that returns the hand-made models; every message and reply crosses a wire copy, and the
    server's side of every reply is kept."""

    def __init__(self, failing: int | None = None):
        self.app = ClientApp(mods=[secure_mod])
        self.states = {100 + k: RecordDict() for k in range(3)}
        self.received: list[Message] = []
        self.trained_nodes: list[int] = []

        @self.app.train()
        def train(msg: Message, context: Context) -> Message:
            k = int(context.node_config["client-id"])
            if k == failing:
                raise RuntimeError("the node died while training")
            self.trained_nodes.append(k)
            return Message(RecordDict({ARRAYS: ArrayRecord(trained(k)),
                                       METRICS: MetricRecord({"num-examples": EXAMPLES[k], "train-loss": 0.5 + k,
                                                              CLIENT_ID: k})}), reply_to=msg)

    def push_and_pull(self, messages: list[Message], timeout: float) -> dict[int, Message | str]:
        from flwr.app import Error

        answers = {}
        for message in messages:
            node = message.metadata.dst_node_id
            incoming = Message(wire(message.content), node, message.metadata.message_type)
            context = Context(run_id=1, node_id=node, node_config={"client-id": node - 100}, state=self.states[node],
                              run_config={"fedward-config": json.dumps({"seed": 0})})
            try:
                reply = self.app(incoming, context)
                reply = Message(wire(reply.content), reply_to=incoming)
            except Exception as err:
                reply = Message(Error(code=0, reason=str(err)), reply_to=incoming)
            self.received.append(reply)
            answers[node] = reply
        return answers

    def round(self) -> tuple:
        contents = {100 + k: RecordDict({ARRAYS: ArrayRecord(START), CONFIG: ConfigRecord({"round": 1})})
                    for k in range(3)}
        return secure_round(self.push_and_pull, 1, contents, SETTINGS, timeout=5.0)


def test_flowers_protocol_gives_the_simulations_mean_and_the_server_never_sees_an_update(task_identity):
    federation = Federation()
    result = federation.round()
    mean, masked_replies, failures = result.mean, result.masked_replies, result.failures
    assert not failures and sorted(masked_replies) == [100, 101, 102] and sorted(federation.trained_nodes) == [0, 1, 2]
    _, simulated = secure_in_process([Outcome(r.client_id, r) for r in replies()], START, SETTINGS, seed=0, round_index=1)
    assert [a.tolist() for a in mean] == [a.tolist() for a in simulated.mean]  # bit for bit
    # Every reply the server got, from every stage: no array, and each masked vector is unlike the
    # client's own quantised update in every entry (the masks are uniform modulo 2^32).
    for reply in federation.received:
        assert all(len(record) == 0 for record in reply.content.array_records.values())
    for node, reply in masked_replies.items():
        k = node - 100
        masked = [bytes_to_ndarray(b) for b in reply.content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS]]
        update = client_update({n: v.numpy() for n, v in START.items()}, {n: v.numpy() for n, v in trained(k).items()},
                               {"num-examples": EXAMPLES[k]}, json.loads(SETTINGS.client_json()))
        plain = quantised(update, 200.0, 8.0, rounding_seed(0, 1, k))
        assert sum(int((m.reshape(-1) == p.reshape(-1)).sum()) for m, p in zip(masked, plain)) == 0
        # in the clear: the metrics, the names of the summed arrays and the integer counter
        assert json.loads(reply.content[CLEAR_RECORD]["json"]) == {
            "names": ["b", "w"], "clear": {"count": {"shape": [], "values": [7 + 3 * (k + 1)]}}}
        assert dict(reply.content[METRICS])["num-examples"] == EXAMPLES[k]


def test_a_node_that_fails_mid_protocol_is_left_out_and_the_others_are_summed(task_identity):
    result = Federation(failing=2).round()
    mean, masked_replies, failures = result.mean, result.masked_replies, result.failures
    assert sorted(masked_replies) == [100, 101] and list(failures) == [102]
    assert "the node died while training" in failures[102]
    _, two = secure_in_process([Outcome(r.client_id, r) for r in replies()[:2]], START, SETTINGS, seed=0, round_index=1)
    assert [a.tolist() for a in mean] == [a.tolist() for a in two.mean]


BASE = dict(model="smallcnn", comm_round=1, client_number=3, partition_method="iid", image_size=16, progress=False)


@pytest.mark.parametrize("settings, message", [
    ({"method": "scaffold", "secure_aggregation": True}, "control-variate"),
    ({"method": "cyclic", "secure_aggregation": True}, "one client trains per round"),
    ({"method": "fedmas", "pre_trained_models": "random", "aggregate_method": "mas_DRW", "secure_aggregation": True},
     "mas_DRW"),
    ({"method": "fedavg", "secagg_clipping_range": 4.0}, "--secagg_clipping_range applies with --secure_aggregation"),
    ({"method": "fedavg", "secure_aggregation": True, "clients_per_round": 1}, "needs at least 2 clients a round"),
])
def test_refusals_name_the_reason(settings, message):
    with pytest.raises(ConfigError, match=message):
        build_config({**BASE, **settings})


def test_a_mean_over_other_clients_than_the_replies_is_refused():
    mean = SecureMean(["b", "w"], [np.zeros(2), np.zeros((2, 3))], num_clients=2)
    with pytest.raises(Exception, match="holds 2 clients' updates but 3 replies"):
        secure_average(START, mean, replies(), [1 / 3] * 3)


def test_a_weight_above_the_bound_is_refused_on_the_client():
    start, mine = {k: v.numpy() for k, v in START.items()}, {k: v.numpy() for k, v in trained(0).items()}
    with pytest.raises(ValueError, match="num-examples = 250 is outside"):
        client_update(start, mine, {"num-examples": 250.0}, json.loads(SETTINGS.client_json()))


def test_small_updates_are_rounded_at_random_not_fixed():
    """In float64 an entry of 3e-7 (below a quarter level once 8 is added in float32) still rounds
    up or down at random, so its mean over many draws is the entry."""
    start, mine = {"w": np.zeros(20000, dtype=np.float32)}, {"w": np.full(20000, 3e-7, dtype=np.float32)}
    update = client_update(start, mine, {}, {"weight_metric": None, "max_weight": 1.0, "clipping_range": 8.0})
    levels = quantised(update, 1.0, 8.0, seed=1)[1] - QUANTIZATION_RANGE // 2
    step = 16 / QUANTIZATION_RANGE
    assert set(np.unique(levels).tolist()) == {0, 1}
    assert abs(levels.mean() * step - 3e-7) < 0.1 * 3e-7


def test_a_method_with_its_own_aggregate_is_refused():
    from fedward.algorithms.fedavg import FedAvg

    class Median(FedAvg):
        def aggregate(self, round_index, global_state, replies, server_state):
            raise NotImplementedError

    with pytest.raises(ConfigError, match="its server step is its own aggregate"):
        Median.check_config(build_config({**BASE, "method": "fedavg", "secure_aggregation": True}))
