"""fedward's messages as Flower records, and back.

Every Flower message of a fedward run holds at most these records:

=============  =================  ==========================================================
key            record             content
=============  =================  ==========================================================
``arrays``     ArrayRecord        the method's named arrays (global model, messenger, factors)
``config``     ConfigRecord       server -> node: round, the method's message settings, task facts
``metrics``    MetricRecord       node -> server: the reply's scalars (``num-examples`` ...)
``facts``      ConfigRecord       node -> server, handshake: client id, classes, image size, counts
``report``     ConfigRecord       node -> server: evaluation results as JSON (metrics rows of the
                                  client's own models, confusion matrices of the global model)
=============  =================  ==========================================================

Nothing else is ever put in a message: the privacy test reads these back on the server side.
Under ``--secure_aggregation`` a train reply instead holds Flower's SecAgg+ records and
``secure-clear`` (:mod:`fedward.flower.secagg`).
"""

from __future__ import annotations

import json
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedward.algorithms.base import Arrays, ClientReply, ServerMessage, TaskSpec

from fedward.flower.keys import ARRAYS, CLIENT_ID, CONFIG, FACTS, METRICS, REPORT  # noqa: F401  (re-exported)


def to_array_record(arrays: Arrays) -> ArrayRecord:
    return ArrayRecord({name: tensor.detach().cpu() for name, tensor in arrays.items()})


def from_array_record(record: ArrayRecord) -> Arrays:
    return dict(record.to_torch_state_dict())


def spec_to_json(spec: TaskSpec) -> str:
    """The task facts a node needs, without any other client's class counts."""
    return json.dumps({"num_classes": spec.num_classes, "image_size": spec.image_size, "class_names": spec.class_names,
                       "mean": list(spec.mean), "std": list(spec.std), "num_clients": len(spec.train_class_counts),
                       "global_class_counts": spec.global_class_counts})


def spec_from_json(text: str, client_id: int, own_counts: list[int]) -> TaskSpec:
    """A node's task facts: the federation's, with only its own train counts (others are None)."""
    facts = json.loads(text)
    counts: list[Any] = [None] * facts["num_clients"]
    counts[client_id] = list(own_counts)
    return TaskSpec(num_classes=facts["num_classes"], image_size=facts["image_size"], class_names=facts["class_names"],
                    mean=tuple(facts["mean"]), std=tuple(facts["std"]), train_class_counts=counts,
                    global_class_counts=facts["global_class_counts"])


def encode_server_message(message: ServerMessage, extra: dict[str, Any]) -> RecordDict:
    config = {"round": message.round, "message-config": json.dumps(message.config), **extra}
    return RecordDict({ARRAYS: to_array_record(message.arrays), CONFIG: ConfigRecord(config)})


def decode_server_message(content: RecordDict) -> tuple[ServerMessage, dict[str, Any]]:
    config = dict(content[CONFIG])
    message = ServerMessage(round=int(config.pop("round")), arrays=from_array_record(content[ARRAYS]),
                            config=json.loads(config.pop("message-config")))
    return message, config


def encode_reply(reply: ClientReply, report: Any = None) -> RecordDict:
    content = RecordDict({ARRAYS: to_array_record(reply.arrays),
                          METRICS: MetricRecord({**{k: float(v) for k, v in reply.metrics.items()},
                                                 CLIENT_ID: int(reply.client_id)})})
    if report is not None:
        content[REPORT] = _report_record(report)
    return content


def decode_reply(content: RecordDict) -> tuple[ClientReply, Any]:
    metrics = dict(content[METRICS])
    client_id = int(metrics.pop(CLIENT_ID))
    reply = ClientReply(client_id=client_id, arrays=from_array_record(content[ARRAYS]), metrics=metrics)
    return reply, decode_report(content)


def _report_record(report: Any) -> ConfigRecord:
    return ConfigRecord({"json": json.dumps(report)})


def encode_report(report: Any) -> RecordDict:
    return RecordDict({REPORT: _report_record(report)})


def decode_report(content: RecordDict) -> Any:
    return json.loads(content[REPORT]["json"]) if REPORT in content else None


def encode_facts(facts: dict[str, Any]) -> RecordDict:
    return RecordDict({FACTS: ConfigRecord({"json": json.dumps(facts)})})


def decode_facts(content: RecordDict) -> dict[str, Any]:
    return json.loads(content[FACTS]["json"])


def summary_of(content: RecordDict) -> dict[str, Any]:
    """What a message carried, for the run's audit log: record names, array shapes, metric names."""
    out: dict[str, Any] = {}
    for key, record in content.items():
        if isinstance(record, ArrayRecord):
            out[key] = {name: list(array.shape) for name, array in record.items()}
        elif isinstance(record, MetricRecord):
            out[key] = sorted(record.keys())
        else:
            out[key] = sorted(record.keys()) if hasattr(record, "keys") else type(record).__name__
    return out
