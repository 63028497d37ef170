"""The in-process simulation engine: K clients on one machine, one after another on one device or
spread over a pool of workers (one per device), with a checkpoint after every round.

Each client's randomness comes from generators keyed by (seed, round, client), so the results
do not depend on the order clients run in or on which worker runs them, and a resumed run ends
with exactly the metrics of an uninterrupted one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from fedward.algorithms import Algorithm, ClientReply, ServerMessage, TaskSpec, Workspace, get_algorithm
from fedward.config import RunConfig, client_architectures
from fedward.data.augment import BatchAugment, normalize
from fedward.data.types import ClientData, FederatedData, Split
from fedward.engine import checkpoint as ckpt
from fedward.engine.evaluation import Predictions, predict
from fedward.engine.setup import (
    configure_threads,
    initial_global_state,
    load_data,
    model_builder,
    notice,
    pooled_client,
    resolve_devices,
    task_spec,
)
from fedward.seeding import seed_globals, torch_generator
from fedward.tracking import RunDirectory
from fedward.tracking.report import format_summary_table, summarize, write_report


@dataclass
class ClientTask:
    round: int
    client_index: int
    message: ServerMessage
    state: dict[str, Any]


@dataclass
class ClientResult:
    reply: ClientReply
    state: dict[str, Any]
    rows: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0


class Simulation:
    """Holds what one worker needs to run client updates: config, data, method and workspace."""

    def __init__(self, cfg: RunConfig, data: FederatedData, device: str, *, spec: TaskSpec | None = None,
                 pooled_local_rows: bool = True):
        """``spec`` defaults to the facts of ``data``; a Flower node, which holds one client only, gets
        the federation's facts from the server instead. ``pooled_local_rows``: also evaluate each
        personalised model on the union of all clients' test sets (only possible when all data is here)."""
        self.cfg = cfg
        self.data = data
        self.spec: TaskSpec = spec if spec is not None else task_spec(data)
        self.pooled_local_rows = pooled_local_rows
        self.build_model = model_builder(cfg, self.spec)
        self.algorithm: Algorithm = get_algorithm(cfg.method)(cfg, self.spec, self.build_model)
        self.device = torch.device(device)
        self.training_clients: list[ClientData] = (
            [pooled_client(data)] if self.algorithm.centralized else list(data.clients))
        self._workspace: Workspace | None = None
        self._pooled_test: Split | None = None  # built once, for the local models' pooled rows

    @property
    def workspace(self) -> Workspace:
        if self._workspace is None:
            mean, std = self.spec.mean, self.spec.std
            blur_scale = self.cfg.blur_scale or self.spec.image_size / 1024
            augment = (BatchAugment(mean=mean, std=std, blur_scale=blur_scale) if self.cfg.augment
                       else _Normalize(mean, std))
            self._workspace = Workspace(self.build_model, self.device, augment)
        return self._workspace

    def run_client(self, task: ClientTask, evaluate_local: bool) -> ClientResult:
        """One client's update (and, when asked, the evaluation of its local model on its splits)."""
        start = time.perf_counter()
        client = self.client(task.client_index)
        seed_globals(self.cfg.seed, "global-stream", task.round, task.client_index)
        generator = torch_generator(self.cfg.seed, "client-train", task.round, task.client_index)
        state = task.state
        reply = self.algorithm.client_update(self.workspace, client, task.message, state, generator)
        rows: list[dict[str, Any]] = []
        local = self.algorithm.local_model_state(reply, state) if evaluate_local else None
        if local is not None:
            rows = self.local_rows(task.round, client, local, state)
        return ClientResult(reply=reply, state=state, rows=rows, seconds=time.perf_counter() - start)

    def client(self, client_id: int) -> ClientData:
        """The training client with this id (a Flower node holds only its own)."""
        for client in self.training_clients:
            if client.client_id == client_id:
                return client
        raise KeyError(f"client {client_id} is not held here (clients: {[c.client_id for c in self.training_clients]})")

    def local_rows(self, round_index: int, client: ClientData, local_state,
                   state: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        model = self.algorithm.local_model(self.workspace, client.client_id)
        model.load_state_dict(local_state)
        rows = []
        # The local model, then any diagnostic predictor the method offers (MH-pFLID's messenger path).
        predictors = {"local": model, **self.algorithm.diagnostic_models(self.workspace, client, state or {})}
        for name, predictor in predictors.items():
            for split_name in ("val", "test"):
                split = getattr(client, split_name)
                if len(split):
                    rows.append(self._predict(predictor, split).row(
                        self.spec.num_classes, round=round_index, scope="client", client=client.client_id,
                        model=name, data="client", split=split_name))
        if self.algorithm.personalised and self.pooled_local_rows:
            # FLamby's "Local i" rows: each local model on the pooled test set too.
            if self._pooled_test is None:
                self._pooled_test = self.data.pooled("test")
            rows.append(self._predict(model, self._pooled_test).row(
                self.spec.num_classes, round=round_index, scope="client", client=client.client_id,
                model="local", data="pooled", split="test"))
        return rows

    def global_predictions(self, global_state) -> dict[int, dict[str, Predictions]]:
        """The global model's predictions on every held client's non-empty val and test splits."""
        model = self.workspace.model
        model.load_state_dict(global_state)
        return {client.client_id: {name: self._predict(model, getattr(client, name))
                                   for name in ("val", "test") if len(getattr(client, name))}
                for client in self.data.clients}

    def global_rows(self, round_index: int, global_state) -> list[dict[str, Any]]:
        return global_rows(self.spec.num_classes, round_index, self.global_predictions(global_state))

    def _predict(self, model, split) -> Predictions:
        return predict(model, split, device=self.device, mean=self.spec.mean, std=self.spec.std,
                       batch_size=self.cfg.eval_batch_size)


def global_rows(num_classes: int, round_index: int,
                predictions: dict[int, dict[str, Predictions]]) -> list[dict[str, Any]]:
    """Rows of the global model on every client's val and test splits, and on their union (pooled
    rows reuse the per-client predictions: one forward pass per image). A Flower server builds the
    same rows from the confusion matrices its nodes send."""
    rows = []
    for split_name in ("val", "test"):
        parts = []
        for client_id in sorted(predictions):
            pred = predictions[client_id].get(split_name)
            if pred is None:
                continue
            parts.append(pred)
            rows.append(pred.row(num_classes, round=round_index, scope="server", client=client_id, model="global",
                                 data="client", split=split_name))
        if parts:
            rows.append(Predictions.concat(parts).row(
                num_classes, with_confusion=split_name == "test", round=round_index, scope="server",
                client=None, model="global", data="pooled", split=split_name))
    return rows


class _Normalize:
    """Normalisation only (``augment: false``)."""

    def __init__(self, mean, std):
        self.mean, self.std = mean, std

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return normalize(images, self.mean, self.std)


def prepare(cfg: RunConfig, *, overwrite: bool = False) -> tuple[RunDirectory, FederatedData]:
    """Check everything that can fail on bad input (devices, data, model, weights files), then
    create the run directory and write its config.yaml. Nothing is written if a check fails."""
    from fedward import __version__

    resolve_devices(cfg)
    data = load_data(cfg)
    client_architectures(cfg, data.num_clients)  # one --client_models entry per client
    spec = task_spec(data)
    initial_global_state(cfg, model_builder(cfg, spec))
    if cfg.method == "fedmas":  # a missing or mismatched prior file fails here, not in round 1
        from fedward.priors import client_prior_names, load_prior, resolve_auto

        if cfg.pre_trained_models == "auto":  # trains the self-supervised prior if needed; the run records the file
            load_prior("auto", prior_path=cfg.prior_path, image_size=spec.image_size, progress=cfg.progress)
            cfg.prior_path = resolve_auto(spec.image_size, cfg.prior_path)
        for name in sorted(set(client_prior_names(cfg.pre_trained_models, data.num_clients, cfg.seed))):
            path = None if cfg.pre_trained_models == "mix" else cfg.prior_path
            load_prior(name, prior_path=path, image_size=spec.image_size)
    if not cfg.output:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        cfg.output = str(Path("runs") / f"{cfg.method}-{cfg.loss_fn_name}-seed{cfg.seed}-{stamp}")
    run_dir = RunDirectory.create(Path(cfg.output), overwrite=overwrite)
    run_dir.write_config({**cfg.to_dict(), "class_names": spec.class_names,
                          "client_names": [c.name for c in data.clients], "fedward_version": __version__})
    return run_dir, data


def evaluation_round(cfg: RunConfig, round_index: int) -> bool:
    if round_index == cfg.comm_round:
        return True
    return cfg.eval_every > 0 and round_index % cfg.eval_every == 0


def run(cfg: RunConfig, run_dir: RunDirectory, *, data: FederatedData | None = None, resume: bool = False,
        on_round_end: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Train for ``cfg.comm_round`` rounds (continuing from the last checkpoint with ``resume``),
    log every round to the run directory, and write the final model, results and report."""
    from fedward.engine.executor import make_executor

    devices = resolve_devices(cfg)
    data = data if data is not None else load_data(cfg)
    sim = Simulation(cfg, data, devices[0])
    algorithm = sim.algorithm
    n_clients = len(sim.training_clients)

    if resume:
        saved = ckpt.load(run_dir, expected_num_classes=sim.spec.num_classes)
        start_round, global_state = saved["round"], saved["global_state"]
        client_states, server_state = saved["client_states"], saved["server_state"]
        run_dir.truncate_rounds_after(start_round)
        notice(f"resuming {run_dir.path} after round {start_round} of {cfg.comm_round}")
    else:
        global_state, notices = initial_global_state(cfg, sim.build_model)
        for line in notices:
            notice(line)
        start_round, client_states, server_state = 0, [{} for _ in range(n_clients)], {}

    executor = make_executor(cfg, data, devices, sim)
    if len(devices) == 1:
        configure_threads(1, cfg.threads)
    evaluate_local = cfg.validate_client or algorithm.personalised
    rounds = tqdm(range(start_round + 1, cfg.comm_round + 1), desc=f"{cfg.method} rounds", unit="round",
                  initial=start_round, total=cfg.comm_round, disable=not cfg.progress, dynamic_ncols=True)
    saver = ckpt.BackgroundSaver()
    try:
        for round_index in rounds:
            t0 = time.perf_counter()
            message = algorithm.server_message(round_index, global_state)
            tasks = [ClientTask(round_index, k, message, client_states[k]) for k in range(n_clients)]
            results = executor.run(tasks, evaluate_local=evaluate_local and evaluation_round(cfg, round_index),
                                   progress=cfg.progress)
            results.sort(key=lambda r: r.reply.client_id)  # aggregation order is fixed, whatever finished first
            for k, result in enumerate(results):
                client_states[k] = result.state
            replies = [r.reply for r in results]
            global_state, info = algorithm.aggregate(round_index, global_state, replies)
            train_seconds = time.perf_counter() - t0
            rows: list[dict[str, Any]] = []
            for result in results:
                rows.extend(result.rows)
            if "weights" in info:
                rows.append(_aggregation_row(round_index, replies, info))
            if not algorithm.personalised and evaluation_round(cfg, round_index):
                rows.extend(sim.global_rows(round_index, global_state))
            run_dir.log_rows(rows)
            if round_index % cfg.checkpoint_every == 0 or round_index == cfg.comm_round:
                saver.submit(run_dir, round=round_index, global_state=global_state, client_states=list(client_states),
                             server_state=dict(server_state), num_classes=sim.spec.num_classes)
            rounds.set_postfix(_postfix(rows, train_seconds))
            if on_round_end is not None:
                on_round_end(round_index)
    finally:
        saver.wait()
        executor.close()
        rounds.close()
    return finish(cfg, run_dir, sim, global_state, client_states)


def _aggregation_row(round_index: int, replies: list[ClientReply], info: dict[str, Any]) -> dict[str, Any]:
    row = {"round": round_index, "scope": "aggregation", "clients": [r.client_id for r in replies],
           "weights": [float(w) for w in info["weights"]]}
    for key in replies[0].metrics:
        row[key.replace("-", "_")] = [float(r.metrics[key]) for r in replies]
    for key, value in info.items():
        if key != "weights":
            row[key] = value
    return row


def _postfix(rows: list[dict[str, Any]], seconds: float) -> dict[str, str]:
    out = {"train s": f"{seconds:.1f}"}
    for row in rows:
        if row.get("scope") == "server" and row.get("data") == "pooled" and row.get("split") == "test":
            out["test BA"] = f"{row['balanced_accuracy']:.3f}"
    return out


def model_meta(cfg: RunConfig, spec: TaskSpec) -> dict[str, Any]:
    """What a saved model file records next to its weights."""
    return {"model": cfg.model, "method": cfg.method, "num_classes": spec.num_classes, "image_size": spec.image_size,
            "class_names": spec.class_names, "mean": list(spec.mean), "std": list(spec.std)}


def client_model_payload(cfg: RunConfig, spec: TaskSpec, algorithm: Algorithm, client_id: int,
                         state: dict[str, Any]) -> dict[str, Any] | None:
    """A personalised client's saved model (its architecture, weights and the task facts), or None."""
    local = algorithm.local_model_state(ClientReply(client_id, {}, {}), state)
    if local is None:
        return None
    model = algorithm.client_architecture(client_id) if algorithm.heterogeneous else cfg.model
    return {**model_meta(cfg, spec), "model": model, "client": client_id, "state_dict": local}


def finish(cfg: RunConfig, run_dir: RunDirectory, sim: Simulation, global_state,
           client_states: list[dict[str, Any]] | None) -> dict[str, Any]:
    """Final model(s), results.json and the report. ``client_states`` None: the personalised models
    are on the clients' own machines (Flower), not here."""
    if sim.algorithm.personalised:
        # Personalised models stay with their clients; in simulation the "client side" is this folder.
        for k, state in enumerate(client_states or []):
            payload = client_model_payload(cfg, sim.spec, sim.algorithm, k, state)
            if payload is not None:
                torch.save(payload, run_dir.client_model_path(k))
    else:
        torch.save({**model_meta(cfg, sim.spec), "state_dict": global_state}, run_dir.final_model_path)
    summary = summarize(run_dir.read_rows())
    run_dir.write_results(summary)
    write_report(run_dir)
    return summary


def print_summary(summary: dict[str, Any], run_dir: RunDirectory) -> None:
    print(format_summary_table(summary, run_dir.read_config().get("client_names")))
    print(f"run directory: {run_dir.path}")
