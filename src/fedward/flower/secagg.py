"""SecAgg+ on Flower for fedward's rounds (:mod:`fedward.secure_aggregation`).

The server runs Flower's ``SecAggPlusWorkflow`` over the coordinator's own messaging (its poll
interval and round timeout), with fedward's train records in place of Flower's ``FitIns``, and a
strategy that keeps only the unmasked mean. The node runs Flower's ``secaggplus_mod`` around
fedward's train handler: the handler's reply becomes the update to mask (Flower's ``FitRes``
layout, its arrays cleared by the mod before the reply leaves), the metrics and integer buffers
that travel in the clear, and the evaluation report.

Imports Flower and NumPy only: the ClientApp loads it without torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.app.message_type import MessageType
from flwr.client.mod import secaggplus_mod
from flwr.common import Code, FitIns, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common.recorddict_compat import fitres_to_recorddict
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey

from fedward.flower.keys import ARRAYS, CLIENT_ID, CONFIG, METRICS, REPORT
from fedward.secure_aggregation import (
    CLEAR_RECORD, CLIPPED_METRIC, MODULUS_RANGE, QUANTIZATION_RANGE, SECURE_CONFIG, SecureSettings, client_update,
    rounding_seed,
)


# -- the node ---------------------------------------------------------------------------------------
def secure_mod(msg: Message, context: Context, call_next: Callable[[Message, Context], Message]) -> Message:
    """The ClientApp's mod: a train message of the SecAgg+ protocol goes through Flower's
    ``secaggplus_mod``; every other message straight to fedward's handler."""
    if msg.metadata.message_type != MessageType.TRAIN or RECORD_KEY_CONFIGS not in msg.content.config_records:
        return call_next(msg, context)

    def train(msg: Message, context: Context) -> Message:
        reply = call_next(msg, context)
        if reply.has_error():
            return reply
        content, seed = _update_to_mask(msg.content, reply.content, context.run_config)
        np.random.seed(seed)  # Flower's quantize rounds with NumPy's global generator, right after this
        return Message(content, reply_to=msg)

    saved = np.random.get_state()
    try:
        return secaggplus_mod(msg, context, train)
    finally:
        np.random.set_state(saved)


def _update_to_mask(received: RecordDict, reply: RecordDict, run_config: dict[str, Any]) -> tuple[RecordDict, int]:
    config = received[CONFIG]
    settings = json.loads(str(config[SECURE_CONFIG]))
    start = {name: array.numpy() for name, array in received[ARRAYS].items()}
    trained = {name: array.numpy() for name, array in reply[ARRAYS].items()}
    metrics = dict(reply[METRICS])
    update = client_update(start, trained, metrics, settings)
    fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(update.update), update.weight, {})  # type: ignore[arg-type]
    content = fitres_to_recorddict(fitres, keep_input=False)
    content[METRICS] = MetricRecord({**metrics, CLIPPED_METRIC: float(update.clipped)})
    content[CLEAR_RECORD] = ConfigRecord({"json": update.clear_json()})
    if REPORT in reply:
        content[REPORT] = reply[REPORT]
    seed = json.loads(str(run_config["fedward-config"]))["seed"]
    return content, rounding_seed(seed, int(config["round"]), int(metrics[CLIENT_ID]))


# -- the server -------------------------------------------------------------------------------------
STAGES = ("secagg-setup", "secagg-share-keys", "train", "secagg-unmask")  # the workflow's exchanges, in order


class _Messaging:
    """The Grid the workflow talks through: the coordinator's push and pull, keeping every reply by
    stage (for the audit; the masked-vector stage's carry the clear records) and why a node fell out."""

    def __init__(self, push_and_pull: Callable[[list[Message], float], dict[int, Message | str]], timeout: float):
        self.push_and_pull, self.timeout = push_and_pull, timeout
        self.replies: list[tuple[str, int, Message]] = []  # (stage, node, reply)
        self.masked_replies: dict[int, Message] = {}
        self.failures: dict[int, str] = {}
        self.exchanges = 0

    def send_and_receive(self, messages, *, timeout: float | None = None) -> list[Message]:
        stage = STAGES[min(self.exchanges, len(STAGES) - 1)]
        self.exchanges += 1
        replies = []
        for node_id, answer in self.push_and_pull(list(messages), self.timeout).items():
            if isinstance(answer, str):
                self.failures[node_id] = answer
                continue
            if answer.has_error():
                self.failures[node_id] = f"error on the node: {answer.error.reason}"
            else:
                self.replies.append((stage, node_id, answer))
                if CLEAR_RECORD in answer.content:
                    self.masked_replies[node_id] = answer
            replies.append(answer)
        return replies


class _KeepMean(Strategy):
    """The workflow's strategy: the round's nodes, and the unmasked mean it hands to ``aggregate_fit``."""

    def __init__(self, proxies: list[GridClientProxy]):
        self.proxies = proxies
        self.mean: list[np.ndarray] | None = None
        self.summed: list[int] = []

    def initialize_parameters(self, client_manager):
        return None

    def configure_fit(self, server_round, parameters, client_manager):
        return [(proxy, FitIns(parameters, {})) for proxy in self.proxies]

    def aggregate_fit(self, server_round, results, failures):
        self.summed = [proxy.node_id for proxy, _ in results]
        self.mean = parameters_to_ndarrays(results[0][1].parameters) if results else None
        return None, {}

    def configure_evaluate(self, server_round, parameters, client_manager):
        return []

    def aggregate_evaluate(self, server_round, results, failures):
        return None, {}

    def evaluate(self, server_round, parameters):
        return None


class _FedwardRecords(SecAggPlusWorkflow):
    """Flower's workflow, sending each node fedward's train records (the round's message) where it
    would send a ``FitIns``."""

    def __init__(self, contents: dict[int, RecordDict], **kwargs):
        super().__init__(**kwargs)
        self.contents = contents

    def share_keys_stage(self, grid, context, state) -> bool:
        state.nid_to_fitins = {node_id: self.contents[node_id] for node_id in state.nid_to_fitins}
        return super().share_keys_stage(grid, context, state)


@dataclass
class SecureRound:
    """A SecAgg+ round as the server saw it: the weighted mean of the updates of the nodes in the sum
    (None when the protocol stopped), their masked-stage replies, why each other node fell out, and
    every reply of every stage (stage, node, reply)."""

    mean: list[np.ndarray] | None
    masked_replies: dict[int, Message]
    failures: dict[int, str]
    replies: list[tuple[str, int, Message]]


def secure_round(push_and_pull, round_index: int, contents: dict[int, RecordDict], settings: SecureSettings,
                 timeout: float) -> SecureRound:
    """Run the SecAgg+ protocol over the nodes of ``contents``."""
    for content in contents.values():
        content[CONFIG][SECURE_CONFIG] = settings.client_json()
    messaging = _Messaging(push_and_pull, timeout)
    strategy = _KeepMean([GridClientProxy(node_id, messaging, 0) for node_id in contents])
    context = LegacyContext(Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={}),
                            strategy=strategy)
    context.state[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: round_index})
    context.state[MAIN_PARAMS_RECORD] = ArrayRecord()
    workflow = _FedwardRecords(contents, num_shares=settings.shares, reconstruction_threshold=settings.threshold,
                               max_weight=settings.max_weight, clipping_range=settings.clipping_range,
                               quantization_range=QUANTIZATION_RANGE, modulus_range=MODULUS_RANGE, timeout=timeout)
    workflow(messaging, context)
    summed = set(strategy.summed)
    replies = {n: m for n, m in messaging.masked_replies.items() if n in summed}
    failures = {n: messaging.failures.get(n, "left out of the secure sum (its part of the protocol did not complete)")
                for n in contents if n not in summed}
    return SecureRound(strategy.mean if summed else None, replies, failures, messaging.replies)
