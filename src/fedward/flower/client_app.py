"""The Flower ClientApp. It imports Flower only: each message's records go to the node's warm
worker (:mod:`fedward.flower.worker`, started by ``fedward flower supernode``) when one listens,
and are otherwise handled here (:mod:`fedward.flower.handlers`, the same code), as in Flower's
simulation runtime or a SuperNode started without fedward. Under ``--secure_aggregation`` a train
reply is masked here, by Flower's SecAgg+ mod (:mod:`fedward.flower.secagg`).
"""

from __future__ import annotations

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fedward.flower.secagg import secure_mod
from fedward.flower.worker import WORKER_KEY, forward

app = ClientApp(mods=[secure_mod])  # the SecAgg+ rounds of --secure_aggregation; other messages pass through


def _answer(kind: str, msg: Message, context: Context) -> Message:
    run_config, node_config = dict(context.run_config), dict(context.node_config)
    content: RecordDict | None = None
    if node_config.get(WORKER_KEY):
        content = forward(str(node_config[WORKER_KEY]), kind, msg.content, run_config, node_config)
    if content is None:
        from fedward.flower.handlers import handle

        content = handle(kind, msg.content, run_config, node_config)
    return Message(content, reply_to=msg)


@app.query()
def facts(msg: Message, context: Context) -> Message:
    return _answer("query", msg, context)


@app.train()
def train(msg: Message, context: Context) -> Message:
    return _answer("train", msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return _answer("evaluate", msg, context)
