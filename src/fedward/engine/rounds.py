"""The server half of every round, one piece of code for the in-process simulation and the Flower
ServerApp: pick the clients, send the method's message, check the replies, aggregate, evaluate,
log, checkpoint (the global model, the server state and, in simulation, the client states).

An engine only says how messages reach clients (:class:`Clients`): in simulation a local
executor runs the client updates; on Flower the ServerApp pushes messages to SuperNodes.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from tqdm.auto import tqdm

from fedward.algorithms import Algorithm, ClientReply, ServerMessage, TaskSpec
from fedward.algorithms.base import Arrays, fine_tunes
from fedward.config import RunConfig
from fedward.engine import checkpoint as ckpt
from fedward.engine.evaluation import PredictionBlock, Predictions, write_predictions
from fedward.engine.replies import reply_problem
from fedward.engine.secure import SecureMean, secure_average
from fedward import logs
from fedward.errors import FedwardError
from fedward.secure_aggregation import CLIPPED_METRIC, MAX_CLIENTS, SecureSettings
from fedward.tracking import RunDirectory

# The reply metrics a --verbose line shows per client.
CLIENT_LOG_KEYS = ("num-examples", "train-loss", "steps", "robust-factor")


@dataclass
class Outcome:
    """What became of one client's part in a round: ``ok`` with its reply (and the rows of its local
    evaluation), or ``dropped`` with the reason (no reply, an error)."""

    client_id: int
    reply: ClientReply | None
    rows: list[dict[str, Any]] = field(default_factory=list)
    status: str = "ok"
    reason: str | None = None
    node: int | None = None
    predictions: list[PredictionBlock] = field(default_factory=list)  # per image, where they may be kept
    selected_predictions: list[PredictionBlock] = field(default_factory=list)  # its local model's, val-selected


class Clients(Protocol):
    """How an engine reaches its clients."""

    def client_ids(self) -> list[int]:
        """Every client of the federation (those a method may select)."""

    def train(self, round_index: int, message: ServerMessage, client_ids: list[int],
              evaluate_local: bool) -> list[Outcome]:
        """Run the round's client updates of ``client_ids``; one outcome each."""

    def train_secure(self, round_index: int, message: ServerMessage, client_ids: list[int], evaluate_local: bool,
                     settings: SecureSettings) -> tuple[list[Outcome], SecureMean | None]:
        """As :meth:`train` under secure aggregation: the replies hold only what travels in the clear,
        and the weighted mean of the updates of the ``ok`` ones comes separately (None: no sum)."""

    def evaluate(self, round_index: int, global_state: Arrays) -> dict[int, dict[str, Predictions]]:
        """The global model's predictions on each reachable client's val and test splits."""

    def finetuned(self, round_index: int, global_state: Arrays) -> dict[int, dict[str, Predictions]]:
        """+FT: each reachable client's fine-tuned copy of the global model on its val and test splits."""

    def checkpointed(self, round_index: int) -> None:
        """The checkpoint of ``round_index`` is on disk (the client states it stands for may be pruned)."""

    def min_replies(self, selected: int) -> int:
        """The fewest usable replies a round of ``selected`` clients may aggregate."""


def evaluation_round(cfg: RunConfig, round_index: int) -> bool:
    if round_index == cfg.comm_round:
        return True
    return cfg.eval_every > 0 and round_index % cfg.eval_every == 0


def global_rows(num_classes: int, round_index: int, predictions: dict[int, dict[str, Predictions]], *,
                model: str = "global") -> list[dict[str, Any]]:
    """Rows of the global model (or, ``model="finetuned"``, of its copies fine-tuned at each client)
    on every client's val and test splits, and on their union (pooled rows reuse the per-client
    predictions: one forward pass per image). A Flower server builds the same rows from the
    confusion matrices its nodes send."""
    rows = []
    for split_name in ("val", "test"):
        parts = []
        for client_id in sorted(predictions):
            pred = predictions[client_id].get(split_name)
            if pred is None:
                continue
            parts.append(pred)
            rows.append(pred.row(num_classes, round=round_index, scope="server", client=client_id, model=model,
                                 data="client", split=split_name))
        if parts:
            rows.append(Predictions.concat(parts).row(
                num_classes, round=round_index, scope="server",
                client=None, model=model, data="pooled", split=split_name))
    return rows


def prediction_blocks(round_index: int, predictions: dict[int, dict[str, Predictions]], model: str) -> list[PredictionBlock]:
    """The per-image predictions behind :func:`global_rows`, where their scores are at hand."""
    blocks = [pred.block(round=round_index, model=model, client=client_id, split=split_name)
              for client_id in sorted(predictions) for split_name, pred in predictions[client_id].items()]
    return [block for block in blocks if block is not None]


def _pooled_val_score(rows: list[dict[str, Any]], round_index: int) -> float | None:
    """The global model's pooled validation balanced accuracy in ``rows`` (None if absent or NaN)."""
    for row in rows:
        if ((row.get("scope"), row.get("model"), row.get("data"), row.get("split"), row.get("round")) ==
                ("server", "global", "pooled", "val", round_index)):
            score = row.get("balanced_accuracy")
            return None if score is None or math.isnan(score) else float(score)
    return None


def aggregation_row(round_index: int, replies: list[ClientReply], info: dict[str, Any]) -> dict[str, Any]:
    row = {"round": round_index, "scope": "aggregation", "clients": [r.client_id for r in replies],
           "weights": [float(w) for w in info["weights"]]}
    for key in replies[0].metrics:
        row[key.replace("-", "_")] = [float(r.metrics[key]) for r in replies]
    for key, value in info.items():
        if key != "weights":
            row[key] = value
    return row


class RoundLoop:
    """Rounds ``start + 1 .. comm_round`` of one run."""

    def __init__(self, cfg: RunConfig, algorithm: Algorithm, spec: TaskSpec, run_dir: RunDirectory, clients: Clients,
                 *, log: Callable[[str], None], progress: bool):
        self.cfg, self.algorithm, self.spec, self.run_dir, self.clients = cfg, algorithm, spec, run_dir, clients
        self.log, self.progress = log, progress
        self._best_pooled_val: float | None = None  # read back from the rows on first use (a resume)

    def run_round(self, round_index: int, global_state: Arrays,
                  server_state: dict[str, Any]) -> tuple[Arrays, list[dict[str, Any]]]:
        cfg, algorithm = self.cfg, self.algorithm
        evaluate_now = evaluation_round(cfg, round_index)
        selected = algorithm.select_clients(round_index, self.clients.client_ids(), server_state)
        message = algorithm.server_message(round_index, global_state, server_state)
        evaluate_local = (cfg.validate_client or algorithm.personalised) and evaluate_now
        secure = algorithm.secure_settings(round_index)
        if secure is None:
            outcomes, secure_mean = self.clients.train(round_index, message, selected, evaluate_local), None
        else:
            if len(selected) > MAX_CLIENTS:
                raise FedwardError(f"round {round_index}: {len(selected)} clients, more than the {MAX_CLIENTS} whose "
                                   "weight factors the secure sum can hold modulo 2^32; lower --clients_per_round")
            outcomes, secure_mean = self.clients.train_secure(round_index, message, selected, evaluate_local, secure)
        reference = algorithm.reply_reference(global_state, server_state)
        rows: list[dict[str, Any]] = []
        accepted: list[Outcome] = []
        for outcome in sorted(outcomes, key=lambda o: o.client_id):  # a fixed order, whoever finished first
            if outcome.status == "ok":
                outcome.reason = reply_problem(algorithm, outcome.reply, global_state, reference)
                if outcome.reason is not None:
                    outcome.status = "rejected"
                else:
                    accepted.append(outcome)
            rows.append({"round": round_index, "scope": "participation", "client": outcome.client_id,
                         **({"node": outcome.node} if outcome.node is not None else {}), "status": outcome.status,
                         **({"reason": outcome.reason} if outcome.reason else {})})
            if outcome.reason:
                where = f" (node {outcome.node})" if outcome.node is not None else ""
                self.log(f"round {round_index}: client {outcome.client_id}{where} {outcome.status}: {outcome.reason}")
        needed = self.clients.min_replies(len(selected))
        if len(accepted) < needed:
            raise FedwardError(f"round {round_index}: {len(accepted)} usable replies, fewer than the minimum {needed}; "
                               f"resume after round {round_index - 1} with `--resume {self.run_dir.path}`")
        replies = [o.reply for o in accepted]
        if secure is None:
            global_state, info = algorithm.aggregate(round_index, global_state, replies, server_state)
        else:
            global_state, info = self._aggregate_secure(round_index, global_state, outcomes, accepted, secure_mean,
                                                        server_state)
        for outcome in accepted:
            rows.extend(outcome.rows)
            metrics = outcome.reply.metrics
            logs.detail(f"round {round_index}: client {outcome.client_id}: "
                        + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k in CLIENT_LOG_KEYS))
        if "weights" in info:
            rows.append(aggregation_row(round_index, replies, info))
        final = round_index == cfg.comm_round
        blocks = [block for outcome in accepted for block in outcome.predictions] if final else []
        if not algorithm.personalised and evaluate_now:
            predictions = self.clients.evaluate(round_index, global_state)
            evaluated = global_rows(self.spec.num_classes, round_index, predictions)
            rows.extend(evaluated)
            global_blocks = prediction_blocks(round_index, predictions, "global")
            if final:
                blocks += global_blocks
            if global_blocks:
                self._keep_if_selected(round_index, evaluated, global_blocks)
        if fine_tunes(cfg) and final:
            predictions = self.clients.finetuned(round_index, global_state)
            rows.extend(global_rows(self.spec.num_classes, round_index, predictions, model="finetuned"))
            blocks += prediction_blocks(round_index, predictions, "finetuned")
        if blocks:  # in one process; a Flower server gets none (each node writes its own)
            write_predictions(self.run_dir.path, blocks, self.spec.class_names)
        selected_blocks = [block for outcome in accepted for block in outcome.selected_predictions] if final else []
        if selected_blocks:
            write_predictions(self.run_dir.path, selected_blocks, self.spec.class_names, selected=True)
        return global_state, rows

    def _aggregate_secure(self, round_index: int, global_state: Arrays, outcomes: list[Outcome],
                          accepted: list[Outcome], secure_mean: SecureMean | None,
                          server_state: dict[str, Any]) -> tuple[Arrays, dict[str, Any]]:
        """The method's server step on the secure mean. A reply the checks reject cannot be taken out
        of the sum, so it stops the round."""
        resume = f"resume after round {round_index - 1} with `--resume {self.run_dir.path}`"
        rejected = [o for o in outcomes if o.status == "rejected"]
        if rejected:
            raise FedwardError(f"round {round_index}: client {rejected[0].client_id}'s reply is rejected "
                               f"({rejected[0].reason}) but its update is inside the secure sum, which cannot be taken "
                               f"apart; {resume}")
        if secure_mean is None:
            raise FedwardError(f"round {round_index}: no secure sum (it needs at least 2 clients whose protocol "
                               f"completes; {len(accepted)} replied); {resume}")
        replies = [o.reply for o in accepted]
        clipped = sum(r.metrics.get(CLIPPED_METRIC, 0.0) for r in replies)
        if clipped:
            self.log(f"round {round_index}: secure aggregation clipped {clipped:.0f} weighted update entries to "
                     f"+-{self.cfg.secagg_clipping_range:g}; raise --secagg_clipping_range")
        weights = self.algorithm.aggregation_weights(round_index, replies)
        average = secure_average(global_state, secure_mean, replies, weights)
        return self.algorithm.aggregate_average(round_index, global_state, average, weights, server_state)

    def _keep_if_selected(self, round_index: int, evaluated: list[dict[str, Any]],
                          blocks: list[PredictionBlock]) -> None:
        """predictions_global_selected.csv: the global model's per-image predictions at the round the
        summary's validation selection picks (the earliest with the highest pooled validation
        balanced accuracy), rewritten whenever a round beats every earlier one."""
        score = _pooled_val_score(evaluated, round_index)
        if score is None:
            return
        if self._best_pooled_val is None:
            earlier = [_pooled_val_score([row], row["round"]) for row in self.run_dir.read_rows()
                       if row.get("round", round_index) < round_index]
            self._best_pooled_val = max((s for s in earlier if s is not None), default=-math.inf)
        if score > self._best_pooled_val:
            self._best_pooled_val = score
            write_predictions(self.run_dir.path, blocks, self.spec.class_names, selected=True)

    def run(self, start_round: int, global_state: Arrays, server_state: dict[str, Any],
            on_round_end: Callable[[int], None] | None = None) -> Arrays:
        cfg = self.cfg
        bar = tqdm(range(start_round + 1, cfg.comm_round + 1), desc=f"{cfg.method} rounds", unit="round",
                   initial=start_round, total=cfg.comm_round, disable=not self.progress, dynamic_ncols=True)
        saver = ckpt.BackgroundSaver()
        try:
            for round_index in bar:
                t0 = time.perf_counter()
                global_state, rows = self.run_round(round_index, global_state, server_state)
                seconds = time.perf_counter() - t0
                self.run_dir.log_rows(rows)
                if round_index % cfg.checkpoint_every == 0 or round_index == cfg.comm_round:
                    saver.submit(self.run_dir, round=round_index, global_state=global_state,
                                 server_state=dict(server_state), num_classes=self.spec.num_classes,
                                 settings=cfg.to_dict(), on_saved=self.clients.checkpointed)
                summary = round_summary(rows, seconds)
                if self.progress:
                    bar.set_postfix(summary)
                self.log(f"round {round_index}/{cfg.comm_round}: " + ", ".join(f"{k} {v}" for k, v in summary.items()))
                if on_round_end is not None:
                    on_round_end(round_index)
        finally:
            saver.wait()
            bar.close()
        return global_state


def round_summary(rows: list[dict[str, Any]], seconds: float) -> dict[str, str]:
    """The round's line: clients that replied / took part, the mean train loss of the replies, the
    pooled validation and test balanced accuracy when the round evaluated, seconds."""
    taking_part = [r for r in rows if r.get("scope") == "participation"]
    out = {"clients": f"{sum(r['status'] == 'ok' for r in taking_part)}/{len(taking_part)}"}
    for row in rows:
        if row.get("scope") == "aggregation" and row.get("train_loss"):
            out["train loss"] = f"{sum(row['train_loss']) / len(row['train_loss']):.4f}"
    for split in ("val", "test"):
        for row in rows:
            if (row.get("scope"), row.get("model"), row.get("data"), row.get("split")) == ("server", "global", "pooled", split):
                out[f"{split} BA"] = f"{row['balanced_accuracy']:.3f}"
    out["s"] = f"{seconds:.1f}"
    return out
