"""What a fedward node does with each Flower message, given its records and configs: ``query``
(handshake: this client's facts), ``train`` (one round of the method's ``client_update``),
``evaluate`` (the global model, or with ``finetune`` its copy fine-tuned on the node, on this
client's val and test splits). Run in the ClientApp process or in the node's warm worker
(:mod:`fedward.flower.worker`); both give the same records.
"""

from __future__ import annotations

from typing import Any

from flwr.app import RecordDict

from fedward.algorithms.base import ClientReply
from fedward.errors import ConfigError
from fedward.flower.node import NodeRuntime, NodeSettings, runtime_for
from fedward.flower.records import (
    decode_server_message, encode_facts, encode_reply, encode_report, from_array_record,
)


def _runtime(run_config: dict[str, Any], node_config: dict[str, Any]) -> NodeRuntime:
    config_json = str(run_config.get("fedward-config") or "")
    if not config_json:
        raise ConfigError("this Flower run has no fedward-config; start it with `fedward flower run --config FILE`")
    return runtime_for(config_json, NodeSettings.from_node_config(node_config))


def handle(kind: str, content: RecordDict, run_config: dict[str, Any], node_config: dict[str, Any]) -> RecordDict:
    runtime = _runtime(run_config, node_config)
    if kind == "query":
        return encode_facts(runtime.facts())
    if kind == "train":
        message, extra = decode_server_message(content)
        reply, rows = runtime.train(message, spec_json=str(extra["spec"]), run_key=str(extra["run-key"]),
                                    evaluate_local=bool(extra["evaluate-local"]))
        reply = apply_drill(str(run_config.get("drill-bad-reply") or ""), reply, message.round)
        return encode_reply(reply, rows)
    if kind == "evaluate":
        config = content["config"]
        report = runtime.evaluate(from_array_record(content["arrays"]), spec_json=str(config["spec"]),
                                  round_index=int(config["round"]), run_key=str(config["run-key"]),
                                  finetune=bool(config.get("finetune", False)))
        return encode_report(report)
    raise ConfigError(f"a fedward node got a message of type {kind!r}; expected query, train or evaluate")


DRILLS = ("nan", "inf", "shape")


def apply_drill(drill: str, reply: ClientReply, round_index: int) -> ClientReply:
    """A fire drill for the server's reply checks: ``drill-bad-reply = "CLIENT:ROUND:KIND"`` makes
    that client's reply in that round carry a NaN, an Inf or a wrongly shaped first array."""
    if not drill:
        return reply
    try:
        client, round_text, kind = drill.split(":")
        target = (int(client), int(round_text))
    except ValueError:
        raise ConfigError(f"drill-bad-reply {drill!r}: expected CLIENT:ROUND:KIND with KIND one of {DRILLS}") from None
    if kind not in DRILLS:
        raise ConfigError(f"drill-bad-reply {drill!r}: KIND must be one of {DRILLS}")
    if target != (reply.client_id, round_index) or not reply.arrays:
        return reply
    arrays = dict(reply.arrays)
    name = next(n for n, t in arrays.items() if t.is_floating_point() and t.numel() > 1)
    tensor = arrays[name].clone()
    if kind == "shape":
        tensor = tensor.flatten()[:-1]
    else:
        tensor.view(-1)[0] = float(kind)
    arrays[name] = tensor
    return ClientReply(reply.client_id, arrays, dict(reply.metrics))
