"""The server side of a Flower run: fedward's round loop over a Flower ``Grid``.

Per run: a handshake with every client (each node says which client it is and what its data
looks like; no image or label), then per round: broadcast the method's ``server_message``, collect
replies within ``round-timeout``, log and leave out nodes that dropped (no reply, an error) or
whose reply fails :func:`fedward.flower.checks.reply_problem`, aggregate the rest with the
method's ``aggregate`` (in client-id order, as the simulation does) if at least ``min-clients``
remain, evaluate the global model on the nodes, and write the round to the run directory. A node
that comes back (a restarted SuperNode, a new node id) is greeted again and takes part from the
next round on.

The run directory is the simulation's: config.yaml, metrics.jsonl (plus ``scope:
participation`` rows saying who took part), checkpoints, final_model.pt, results.json, report;
and ``messages.jsonl``, an audit of every record each node sent, and ``flower.json`` (run key,
task facts) for resuming.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

from fedward.algorithms import Algorithm, TaskSpec, get_algorithm
from fedward.algorithms.base import Arrays
from fedward.config import RunConfig
from fedward.engine import checkpoint as ckpt
from fedward.engine.evaluation import Predictions
from fedward.engine.rounds import Outcome, RoundLoop
from fedward.engine.secure import SecureMean
from fedward.engine.setup import initial_global_state, model_builder, notice
from fedward.engine.simulation import finish
from fedward.errors import ConfigError, FedwardError
from fedward.flower.records import (
    ARRAYS, CONFIG, METRICS, REPORT, decode_facts, decode_reply, decode_report, encode_server_message, spec_to_json, summary_of,
    to_array_record,
)
from fedward.secure_aggregation import CLEAR_RECORD, SecureSettings
from fedward.tracking import RunDirectory
from fedward.tracking.rundir import atomic_write_text

FLOWER_FILE = "flower.json"
AUDIT_FILE = "messages.jsonl"
# Facts every node must agree on (a node that disagrees is refused, with the difference logged).
SHARED_FACTS = ("data-set", "num-classes", "class-names", "image-size", "mean", "std")


@dataclass
class ServerSettings:
    """The Flower run config of a fedward run (``[tool.flwr.app.config]`` of the app)."""

    run_dir: str
    resume: bool = False
    min_clients: int = 0  # 0: every client must reply in every round
    round_timeout: float = 600.0  # seconds a round waits for replies
    join_timeout: float = 300.0  # seconds to wait for the clients to connect
    poll_interval: float = 0.2  # seconds between pulls of replies

    @classmethod
    def from_run_config(cls, run_config: dict[str, Any], cfg: RunConfig) -> "ServerSettings":
        settings = cls(run_dir=str(run_config.get("run-dir") or cfg.output or ""),
                       resume=bool(run_config.get("resume", False)),
                       min_clients=int(run_config.get("min-clients", 0)),
                       round_timeout=float(run_config.get("round-timeout", 600.0)),
                       join_timeout=float(run_config.get("join-timeout", 300.0)))
        if not settings.run_dir:
            raise ConfigError("no run directory: set `output` in the fedward config or run-dir in the run config")
        if settings.min_clients < 0 or settings.round_timeout <= 0 or settings.join_timeout <= 0:
            raise ConfigError(f"min-clients must be >= 0 and the timeouts > 0, got {asdict(settings)}")
        return settings


@dataclass
class Participant:
    node_id: int
    client_id: int
    facts: dict[str, Any] = field(repr=False)


def read_config(run_config: dict[str, Any]) -> RunConfig:
    from fedward.config import build_config

    text = str(run_config.get("fedward-config") or "")
    if not text:
        raise ConfigError("this Flower run has no fedward-config; start it with `fedward flower run --config FILE`")
    return build_config(json.loads(text))


class Coordinator:
    """Runs one fedward method over the nodes a Flower ``Grid`` reaches."""

    def __init__(self, grid, cfg: RunConfig, settings: ServerSettings, log: Callable[[str], None] = notice):
        if get_algorithm(cfg.method).centralized:
            raise ConfigError(f"--method {cfg.method} pools every hospital's data on one machine: it has no Flower "
                              "deployment")
        self.grid, self.cfg, self.settings, self.log = grid, cfg, settings, log
        self.by_node: dict[int, Participant] = {}
        self.refused: dict[int, float] = {}  # node id -> when its handshake failed (retried after join_timeout)
        self.reference_facts: dict[str, Any] | None = None
        self.num_clients: int | None = cfg.client_number
        self.spec: TaskSpec | None = None
        self.algorithm: Algorithm | None = None
        self.run_key = ""
        self.run_dir: RunDirectory | None = None

    # -- messaging --------------------------------------------------------------------------
    def exchange(self, contents: dict[int, RecordDict], message_type: str, group: str,
                 timeout: float) -> dict[int, Message | str]:
        """Send one message per node; each node's reply, or why there is none."""
        messages = [Message(contents[n], n, message_type, ttl=timeout, group_id=group) for n in contents]
        return self.push_and_pull(messages, timeout)

    def push_and_pull(self, messages: list[Message], timeout: float) -> dict[int, Message | str]:
        """Push ``messages`` (one per node); each node's reply, or why there is none."""
        node_ids = [m.metadata.dst_node_id for m in messages]
        message_ids = list(self.grid.push_messages(messages))
        answers: dict[int, Message | str] = {}
        pending: dict[str, int] = {}
        for message_id, node_id in zip(message_ids, node_ids):
            if message_id:
                pending[message_id] = node_id
            else:
                answers[node_id] = "the SuperLink refused the message (node no longer registered)"
        deadline = time.monotonic() + timeout
        while pending:
            for reply in self.grid.pull_messages(list(pending)):
                node_id = pending.pop(reply.metadata.reply_to_message_id, None)
                if node_id is not None:
                    answers[node_id] = reply
            if not pending or time.monotonic() >= deadline:
                break
            time.sleep(self.settings.poll_interval)
        for node_id in pending.values():
            answers[node_id] = f"no reply within {timeout:g} s"
        return answers

    @staticmethod
    def failure(answer: Message | str) -> str | None:
        if isinstance(answer, str):
            return answer
        if answer.has_error():
            return f"error on the node: {answer.error.reason}"
        return None

    def audit(self, round_index: int, kind: str, participant: Participant, content: RecordDict) -> None:
        line = {"round": round_index, "type": kind, "client": participant.client_id, "node": participant.node_id,
                "records": summary_of(content)}
        with open(self.run_dir.path / AUDIT_FILE, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(line) + "\n")

    # -- membership -------------------------------------------------------------------------
    def clients(self) -> dict[int, Participant]:
        return {p.client_id: p for p in self.by_node.values()}

    def refresh(self) -> None:
        """Forget nodes the SuperLink no longer lists; greet new ones."""
        online = set(self.grid.get_node_ids())
        for node_id in [n for n in self.by_node if n not in online]:
            gone = self.by_node.pop(node_id)
            self.log(f"client {gone.client_id} (node {node_id}) left the federation")
        now = time.monotonic()
        new = [n for n in sorted(online) if n not in self.by_node
               and now - self.refused.get(n, -1e18) > self.settings.join_timeout]
        if new:
            self.handshake(new)

    def handshake(self, node_ids: list[int]) -> None:
        answers = self.exchange({n: RecordDict() for n in node_ids}, "query", "handshake", self.settings.round_timeout)
        for node_id in node_ids:
            answer = answers[node_id]
            reason = self.failure(answer)
            facts: dict[str, Any] = {}
            if reason is None:
                facts = decode_facts(answer.content)
                reason = self.facts_problem(facts)
            if reason is not None:
                self.refused[node_id] = time.monotonic()
                self.log(f"node {node_id} refused: {reason}")
                continue
            client_id = int(facts["client-id"])
            previous = self.clients().get(client_id)
            if previous is not None:
                del self.by_node[previous.node_id]
                self.log(f"client {client_id} is now node {node_id} (was node {previous.node_id})")
            self.by_node[node_id] = Participant(node_id, client_id, facts)
            self.refused.pop(node_id, None)
            self.log(f"client {client_id} ({facts['client-name']}) joined as node {node_id}")

    def facts_problem(self, facts: dict[str, Any]) -> str | None:
        if self.reference_facts is None:
            self.reference_facts = facts
        for key in SHARED_FACTS:
            if facts.get(key) != self.reference_facts.get(key):
                return (f"its {key} is {facts.get(key)!r} but the federation's is {self.reference_facts.get(key)!r} "
                        "(every hospital must have the same classes and run the same settings)")
        if self.num_clients is None:
            in_data = facts.get("clients-in-data") or 0
            if in_data < 2:
                raise ConfigError("the nodes hold one hospital each, so the server cannot tell how many hospitals "
                                  "take part: set client_number in the fedward config")
            self.num_clients = int(in_data)
        client_id = int(facts["client-id"])
        if not 0 <= client_id < self.num_clients:
            return f"client-id {client_id} is outside 0..{self.num_clients - 1} (the federation has {self.num_clients} clients)"
        if self.spec is not None:
            counts = self.spec.train_class_counts[client_id]
            if counts is not None and list(facts["train-class-counts"]) != list(counts):
                return (f"client {client_id}'s training data changed since the run started "
                        f"(class counts {facts['train-class-counts']}, were {counts})")
        return None

    def wait_for(self, count: Callable[[], int], needed: Callable[[], int], what: str) -> None:
        deadline = time.monotonic() + self.settings.join_timeout
        while True:
            self.refresh()
            if self.num_clients is not None and count() >= needed():
                return
            if time.monotonic() >= deadline:
                have = sorted(self.clients())
                raise FedwardError(f"{what}: after {self.settings.join_timeout:g} s only clients {have} are connected "
                                   f"(need {needed() if self.num_clients is not None else 'all'} of "
                                   f"{self.num_clients or '?'}); start the missing SuperNodes or raise join-timeout")
            time.sleep(1.0)

    @property
    def min_clients(self) -> int:
        return self.settings.min_clients or self.num_clients

    # -- the run ----------------------------------------------------------------------------
    def open_run(self, lock: contextlib.ExitStack) -> tuple[int, Arrays, dict[str, Any]]:
        """Handshake, task facts, method, run directory (its lock held in ``lock``); the round to
        start after, the global model and the server state."""
        cfg, path = self.cfg, Path(self.settings.run_dir)
        saved: dict[str, Any] | None = None
        if self.settings.resume:
            self.run_dir = RunDirectory.open_existing(path)
            lock.enter_context(self.run_dir.writing())
            saved = json.loads((path / FLOWER_FILE).read_text())
            self.num_clients = saved["num_clients"]
            self.reference_facts = saved["reference_facts"]
            self.spec = TaskSpec(**saved["spec"])
            self.wait_for(lambda: len(self.clients()), lambda: self.min_clients, "resuming")
        else:
            self.wait_for(lambda: len(self.clients()), lambda: self.num_clients, "handshake")
            facts = {k: p.facts for k, p in self.clients().items()}
            counts = [facts[k]["train-class-counts"] for k in range(self.num_clients)]
            ref = self.reference_facts
            self.spec = TaskSpec(num_classes=ref["num-classes"], image_size=ref["image-size"],
                                 class_names=list(ref["class-names"]), mean=tuple(ref["mean"]), std=tuple(ref["std"]),
                                 train_class_counts=counts, global_class_counts=[sum(c) for c in zip(*counts)])
        if self.settings.min_clients > self.num_clients:
            raise ConfigError(f"min-clients {self.settings.min_clients} is more than the {self.num_clients} clients")
        build = model_builder(cfg, self.spec)
        self.algorithm = get_algorithm(cfg.method)(cfg, self.spec, build)
        if saved is not None:
            self.run_key = saved["run_key"]
            if not ckpt.path_of(self.run_dir).is_file():
                # Stopped before its first checkpoint: its start is its config (and the nodes start
                # round 1 from no state), so resuming is starting again, as in the simulation.
                self.log(f"{path} has no checkpoint yet (it stopped in round 1): starting it again from round 0")
                self.run_dir.truncate_rounds_after(0)
                global_state, notices = initial_global_state(cfg, build)
                for line in notices:
                    self.log(line)
                return 0, global_state, self.algorithm.initial_server_state(global_state)
            checkpoint = ckpt.load(self.run_dir, expected_num_classes=self.spec.num_classes, settings=cfg.to_dict())
            self.run_dir.truncate_rounds_after(checkpoint["round"])
            self.log(f"resuming {path} after round {checkpoint['round']} of {cfg.comm_round}")
            return checkpoint["round"], checkpoint["global_state"], checkpoint["server_state"]
        global_state, notices = initial_global_state(cfg, build)
        for line in notices:
            self.log(line)
        from fedward import __version__

        self.run_dir = RunDirectory.create(path)
        lock.enter_context(self.run_dir.writing())
        self.run_key = f"{path.name}-{secrets.token_hex(4)}"
        names = [self.clients()[k].facts["client-name"] for k in range(self.num_clients)]
        self.run_dir.write_config({**cfg.to_dict(), "output": str(path), "class_names": self.spec.class_names,
                                   "client_names": names, "fedward_version": __version__})
        atomic_write_text(path / FLOWER_FILE, json.dumps({
            "run_key": self.run_key, "num_clients": self.num_clients, "reference_facts": self.reference_facts,
            "spec": asdict(self.spec)}, indent=1))
        return 0, global_state, self.algorithm.initial_server_state(global_state)

    # -- the Clients of the round loop ------------------------------------------------------------
    def client_ids(self) -> list[int]:
        return list(range(self.num_clients))

    def min_replies(self, selected: int) -> int:
        return min(self.settings.min_clients or selected, selected)

    def checkpointed(self, round_index: int) -> None:
        pass  # each client's state is on its node, which keeps its last rounds

    def _round_messages(self, round_index: int, message, client_ids: list[int], evaluate_local: bool):
        """The connected participants, the round's records for each (by node) and the outcomes of
        the clients that are not connected."""
        wanted = set(client_ids)
        self.wait_for(lambda: len(wanted & set(self.clients())), lambda: self.min_replies(len(wanted)),
                      f"round {round_index}")
        connected = self.clients()
        outcomes = [Outcome(k, None, status="dropped", reason="not connected") for k in sorted(wanted - set(connected))]
        participants = [connected[k] for k in sorted(wanted & set(connected))]
        extra = {"spec": spec_to_json(self.spec), "run-key": self.run_key, "evaluate-local": evaluate_local}
        contents = {p.node_id: encode_server_message(self.algorithm.client_message(message, p.client_id), extra)
                    for p in participants}
        return participants, contents, outcomes

    def train(self, round_index: int, message, client_ids: list[int], evaluate_local: bool) -> list[Outcome]:
        participants, contents, outcomes = self._round_messages(round_index, message, client_ids, evaluate_local)
        answers = self.exchange(contents, "train", f"round-{round_index}", self.settings.round_timeout)
        for p in participants:
            answer = answers[p.node_id]
            outcome = Outcome(p.client_id, None, status="dropped", reason=self.failure(answer), node=p.node_id)
            if outcome.reason is None:
                self.audit(round_index, "train", p, answer.content)
                outcome.status = "rejected"
                try:
                    reply, report = decode_reply(answer.content)
                except (KeyError, TypeError, ValueError) as err:
                    outcome.reason = f"malformed reply ({type(err).__name__}: {err})"
                else:
                    if reply.client_id != p.client_id:
                        outcome.reason = f"the reply names client {reply.client_id}"
                    else:  # the round loop checks the arrays and metrics
                        outcome.status, outcome.reply, outcome.rows = "ok", reply, report or []
            elif isinstance(answer, str):
                # Silent nodes are often dead ones the SuperLink still lists (until their heartbeat
                # expires): greet this node id again only after join-timeout; a restarted SuperNode
                # registers under a new id and is greeted at once.
                self.by_node.pop(p.node_id, None)
                self.refused[p.node_id] = time.monotonic()
            outcomes.append(outcome)
        return outcomes

    def train_secure(self, round_index: int, message, client_ids: list[int], evaluate_local: bool,
                     settings: SecureSettings) -> tuple[list[Outcome], SecureMean | None]:
        """A round under SecAgg+: the nodes' updates reach the server only as their weighted mean;
        each reply's metrics, integer buffers and evaluation report come in the clear."""
        from fedward.flower.secagg import secure_round

        participants, contents, outcomes = self._round_messages(round_index, message, client_ids, evaluate_local)
        result = secure_round(self.push_and_pull, round_index, contents, settings, self.settings.round_timeout)
        by_node = {p.node_id: p for p in participants}
        for stage, node_id, reply in result.replies:  # every record of every stage, for the audit
            self.audit(round_index, stage, by_node[node_id], reply.content)
        names: list[str] | None = None
        for p in participants:
            if p.node_id in result.failures:
                outcomes.append(Outcome(p.client_id, None, status="dropped", reason=result.failures[p.node_id],
                                        node=p.node_id))
                continue
            outcome, summed_names = self._secure_outcome(p, result.masked_replies[p.node_id].content, message)
            names = summed_names if names is None else names
            if outcome.status == "ok" and summed_names != names:
                outcome.status, outcome.reason = "rejected", "its update covers other arrays than the others'"
            outcomes.append(outcome)
        mean = result.mean
        return outcomes, (SecureMean(names, mean, len(result.masked_replies)) if mean is not None else None)

    @staticmethod
    def _secure_outcome(p: Participant, content: RecordDict, message) -> tuple[Outcome, list[str]]:
        """What the server learns of one node in a secure round: its metrics, integer buffers and
        report, and the names of the arrays its masked update covers."""
        clear = json.loads(content[CLEAR_RECORD]["json"])
        reply, report = decode_reply(RecordDict({METRICS: content[METRICS], ARRAYS: ArrayRecord(),
                                                 **({REPORT: content[REPORT]} if REPORT in content else {})}))
        outcome = Outcome(p.client_id, reply, report or [], node=p.node_id)
        unknown = sorted(set(clear["clear"]) - set(message.arrays))
        if reply.client_id != p.client_id:
            outcome.status, outcome.reason = "rejected", f"the reply names client {reply.client_id}"
        elif unknown:
            outcome.status, outcome.reason = "rejected", f"its clear arrays {unknown[:5]} are not the global model's"
        else:
            reply.arrays = {name: torch.tensor(entry["values"], dtype=message.arrays[name].dtype).reshape(entry["shape"])
                            for name, entry in clear["clear"].items()}
        return outcome, clear["names"]

    def evaluate(self, round_index: int, global_state: Arrays, *,
                 finetune: bool = False) -> dict[int, dict[str, Predictions]]:
        """The global model (``finetune``: each node's fine-tuned copy of it) on every reachable client's val
        and test splits, from their confusion matrices."""
        participants = sorted(self.clients().values(), key=lambda p: p.client_id)
        content = RecordDict({ARRAYS: to_array_record(global_state),
                              CONFIG: ConfigRecord({"round": round_index, "spec": spec_to_json(self.spec),
                                                    "run-key": self.run_key, "finetune": finetune})})
        group = f"round-{round_index}" + ("-finetune" if finetune else "")
        answers = self.exchange({p.node_id: content for p in participants}, "evaluate", group,
                                self.settings.round_timeout)
        predictions: dict[int, dict[str, Predictions]] = {}
        for p in participants:
            reason = self.failure(answers[p.node_id])
            if reason is None:
                self.audit(round_index, "evaluate", p, answers[p.node_id].content)
                try:
                    predictions[p.client_id] = {
                        part["split"]: Predictions.from_confusion(part["confusion"], part["loss_sum"], part["auroc"])
                        for part in decode_report(answers[p.node_id].content)}
                except (KeyError, TypeError, ValueError) as err:
                    reason = f"malformed evaluation ({type(err).__name__}: {err})"
            if reason is not None:
                self.log(f"round {round_index}: client {p.client_id} (node {p.node_id}) left out of the evaluation: {reason}")
        return predictions

    def finetuned(self, round_index: int, global_state: Arrays) -> dict[int, dict[str, Predictions]]:
        return self.evaluate(round_index, global_state, finetune=True)

    def run(self) -> dict[str, Any]:
        with contextlib.ExitStack() as lock:
            start_round, global_state, server_state = self.open_run(lock)
            loop = RoundLoop(self.cfg, self.algorithm, self.spec, self.run_dir, self, log=self.log, progress=False)
            global_state = loop.run(start_round, global_state, server_state)
            # Personalised models stay on their nodes (<state-dir>/<run-key>/client-<k>/final_model.pt).
            return finish(self.cfg, self.run_dir, self, global_state, None)
