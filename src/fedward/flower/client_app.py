"""The Flower ClientApp: each message is handed to this node's :class:`fedward.flower.node.NodeRuntime`.

Message types: ``query`` (handshake: this client's facts), ``train`` (one round of the method's
``client_update``), ``evaluate`` (the global model, or with ``finetune`` its copy fine-tuned on the
node, on this client's val and test splits).
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedward.algorithms.base import ClientReply
from fedward.errors import ConfigError
from fedward.flower.node import NodeRuntime, NodeSettings, runtime_for
from fedward.flower.records import (
    decode_server_message, encode_facts, encode_reply, encode_report, from_array_record,
)

app = ClientApp()


def _runtime(context: Context) -> NodeRuntime:
    config_json = str(context.run_config.get("fedward-config") or "")
    if not config_json:
        raise ConfigError("this Flower run has no fedward-config; start it with `fedward flower run --config FILE`")
    return runtime_for(config_json, NodeSettings.from_node_config(dict(context.node_config)))


@app.query()
def facts(msg: Message, context: Context) -> Message:
    return Message(encode_facts(_runtime(context).facts()), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    runtime = _runtime(context)
    message, extra = decode_server_message(msg.content)
    reply, rows = runtime.train(message, spec_json=str(extra["spec"]), run_key=str(extra["run-key"]),
                                evaluate_local=bool(extra["evaluate-local"]))
    reply = apply_drill(str(context.run_config.get("drill-bad-reply") or ""), reply, message.round)
    return Message(encode_reply(reply, rows), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    runtime = _runtime(context)
    config = msg.content["config"]
    report = runtime.evaluate(from_array_record(msg.content["arrays"]), spec_json=str(config["spec"]),
                              round_index=int(config["round"]), run_key=str(config["run-key"]),
                              finetune=bool(config.get("finetune", False)))
    return Message(encode_report(report), reply_to=msg)


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
