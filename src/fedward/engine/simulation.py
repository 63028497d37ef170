"""The in-process simulation engine: K clients on one machine, one after another on one device or
spread over a pool of workers (one per device), with a checkpoint after every round.

Each client's randomness comes from generators keyed by (seed, round, client), so the results
do not depend on the order clients run in or on which worker runs them, and a resumed run ends
with exactly the metrics of an uninterrupted one.
"""

from __future__ import annotations

import math

import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch
from fedward.algorithms import Algorithm, ClientReply, ServerMessage, TaskSpec, Workspace, get_algorithm
from fedward.algorithms.privacy import (
    describe, describe_per_sample, describe_secure, per_sample_summary, privacy_summary, secure_summary,
)
from fedward.config import RunConfig
from fedward.data.augment import BatchAugment, normalize
from fedward.data.types import ClientData, FederatedData, Split
from fedward.engine import checkpoint as ckpt
from fedward.engine.client_states import CLIENT_STATES_FOLDER, ClientStateStore
from fedward.engine.evaluation import PredictionBlock, Predictions, predict
from fedward.engine.rounds import Outcome, RoundLoop
from fedward.engine.secure import SecureMean, secure_in_process
from fedward.engine.setup import (
    configure_threads,
    cpu_cores,
    initial_global_state,
    load_data,
    model_builder,
    notice,
    pooled_client,
    resolve_devices,
    task_spec,
)
from fedward.secure_aggregation import SecureSettings
from fedward.seeding import seed_globals, torch_generator
from fedward.tracking import RunDirectory
from fedward.tracking.rundir import new_run_folder
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
    predictions: list[PredictionBlock] = field(default_factory=list)  # the final round's, per image
    selected_predictions: list[PredictionBlock] = field(default_factory=list)  # at the client's val-selected round


SELECTED_LOCAL = "selected-local-predictions"  # client state: its local model's val-selected predictions


def keep_if_selected(state: dict[str, Any], round_index: int, client_id: int,
                     scored: dict[str, tuple[dict[str, Any], Predictions]]) -> None:
    """A personalised client's part of the summary's per-client selection (the earliest round with
    the highest balanced accuracy of its local model on its own validation split, NaN never
    winning): that round's per-image predictions, kept in its state until the last round writes
    them (predictions_local_selected.csv), so a resumed run keeps them too."""
    if "val" not in scored or "test" not in scored:
        return
    score = scored["val"][0].get("balanced_accuracy")
    if score is None or math.isnan(score):
        return
    best = state.get(SELECTED_LOCAL)
    if best is None or score > best["score"]:
        blocks = [pred.block(round=round_index, model="local", client=client_id, split=split)
                  for split, (_, pred) in scored.items()]
        state[SELECTED_LOCAL] = {"score": float(score), "round": round_index,
                                 "blocks": [b for b in blocks if b is not None]}


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
            augment = (BatchAugment(mean=mean, std=std, blur_scale=blur_scale, backend=self.augment_backend)
                       if self.cfg.augment else _Normalize(mean, std))
            self._workspace = Workspace(self.build_model, self.device, augment)
        return self._workspace

    @property
    def augment_backend(self) -> str:
        """``--augment_backend``, with auto resolved for this worker's device and the image size:
        on a GPU the batch stays on the device; on a CPU OpenCV's per-image kernels win from
        ``OPENCV_FROM_PX`` up and torch's batched ops (two threads) below."""
        if self.cfg.augment_backend != "auto":
            return self.cfg.augment_backend
        return "opencv" if self.device.type == "cpu" and self.spec.image_size >= OPENCV_FROM_PX else "torch"

    def run_client(self, task: ClientTask, evaluate_local: bool) -> ClientResult:
        """One client's update (and, when asked, the evaluation of its local model on its splits)."""
        start = time.perf_counter()
        client = self.client(task.client_index)
        seed_globals(self.cfg.seed, "global-stream", task.round, task.client_index)
        generator = torch_generator(self.cfg.seed, "client-train", task.round, task.client_index)
        state = task.state
        reply = self.algorithm.client_update(self.workspace, client, task.message, state, generator)
        rows: list[dict[str, Any]] = []
        blocks: list[PredictionBlock] = []
        local = self.algorithm.local_model_state(reply, state) if evaluate_local else None
        if local is not None:
            rows, blocks = self.local_rows(task.round, client, local, state)
        selected = state.get(SELECTED_LOCAL, {}).get("blocks", []) if task.round == self.cfg.comm_round else []
        return ClientResult(reply=reply, state=state, rows=rows, seconds=time.perf_counter() - start,
                            predictions=blocks, selected_predictions=selected)

    def client(self, client_id: int) -> ClientData:
        """The training client with this id (a Flower node holds only its own)."""
        for client in self.training_clients:
            if client.client_id == client_id:
                return client
        raise KeyError(f"client {client_id} is not held here (clients: {[c.client_id for c in self.training_clients]})")

    def local_rows(self, round_index: int, client: ClientData, local_state,
                   state: dict[str, Any] | None = None) -> tuple[list[dict[str, Any]], list[PredictionBlock]]:
        """The metrics rows of the client's own models on its splits, and at the final round their
        per-image predictions."""
        model = self.algorithm.local_model(self.workspace, client.client_id)
        model.load_state_dict(local_state)
        rows, blocks = [], []
        # The local model, then any diagnostic predictor the method offers (MH-pFLID's messenger path).
        predictors = {"local": model, **self.algorithm.diagnostic_models(self.workspace, client, state or {})}
        for name, predictor in predictors.items():
            scored: dict[str, tuple[dict[str, Any], Predictions]] = {}
            for split_name in ("val", "test"):
                split = getattr(client, split_name)
                if len(split):
                    pred = self._predict(predictor, split)
                    rows.append(pred.row(self.spec.num_classes, round=round_index, scope="client",
                                         client=client.client_id, model=name, data="client", split=split_name))
                    scored[split_name] = (rows[-1], pred)
                    if round_index == self.cfg.comm_round:
                        blocks.append(pred.block(round=round_index, model=name, client=client.client_id,
                                                 split=split_name))
            if name == "local" and self.algorithm.personalised and state is not None:
                keep_if_selected(state, round_index, client.client_id, scored)
        if self.algorithm.personalised and self.pooled_local_rows:
            # FLamby's "Local i" rows: each local model on the pooled test set too.
            if self._pooled_test is None:
                self._pooled_test = self.data.pooled("test")
            rows.append(self._predict(model, self._pooled_test).row(
                self.spec.num_classes, round=round_index, scope="client", client=client.client_id,
                model="local", data="pooled", split="test"))
        return rows, blocks

    def global_predictions(self, global_state) -> dict[int, dict[str, Predictions]]:
        """The global model's predictions on every held client's non-empty val and test splits."""
        model = self.workspace.model
        model.load_state_dict(global_state)
        return {client.client_id: {name: self._predict(model, getattr(client, name))
                                   for name in ("val", "test") if len(getattr(client, name))}
                for client in self.data.clients}

    def finetuned_predictions(self, global_state, client_ids: list[int] | None = None) -> dict[int, dict[str, Predictions]]:
        """+FT: each client's fine-tuned copy of the global model on its own non-empty val and test splits
        (the fine-tuning randomness is keyed by the client, so a node computes what the simulation does)."""
        out = {}
        for client in self.data.clients:
            if client_ids is not None and client.client_id not in client_ids:
                continue
            seed_globals(self.cfg.seed, "finetune-stream", client.client_id)
            generator = torch_generator(self.cfg.seed, "finetune", client.client_id)
            model = self.algorithm.finetune(self.workspace, client, global_state, generator)
            out[client.client_id] = {name: self._predict(model, getattr(client, name))
                                     for name in ("val", "test") if len(getattr(client, name))}
        return out

    def _predict(self, model, split) -> Predictions:
        return predict(model, split, device=self.device, mean=self.spec.mean, std=self.spec.std,
                       batch_size=self.cfg.eval_batch_size)


# bench/bench_augment.py on this 2-core CPU, batch 64, two torch threads (a busy machine, interleaved):
# OpenCV / torch images per second 0.65 at 32 px, 0.63 at 64, 1.31 at 96, 1.42 at 128, 1.6 at 224.
OPENCV_FROM_PX = 96


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
    from fedward.download import go_offline

    go_offline(cfg.offline)
    resolve_devices(cfg)
    data = load_data(cfg)
    spec = task_spec(data)
    algorithm = get_algorithm(cfg.method)
    algorithm.prepare_run(cfg, spec, data.num_clients)
    initial_global_state(cfg, model_builder(cfg, spec))
    if not cfg.output:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        cfg.output = str(new_run_folder(Path("runs") / f"{cfg.method}-{cfg.loss_fn_name}-seed{cfg.seed}-{stamp}"))
    run_dir = RunDirectory.create(Path(cfg.output), overwrite=overwrite)
    run_dir.write_config({**cfg.to_dict(), "class_names": spec.class_names,
                          "client_names": [c.name for c in data.clients], "fedward_version": __version__})
    run_dir.write_data(data_facts(cfg, data))
    return run_dir, data


def data_facts(cfg: RunConfig, data: FederatedData) -> dict[str, Any]:
    """What data.json records: the data set and where from, each client's class counts per split
    (the imbalance the run trained on) and the images left out as unreadable."""
    splits = ("train", "val", "test")
    return {"dataset": data.name, "data_dir": cfg.data_dir, "image_size": data.image_size,
            "class_names": list(data.class_names),
            "clients": [{"name": c.name, **{s: getattr(c, s).class_counts(data.num_classes).tolist() for s in splits}}
                        for c in data.clients],
            "skipped_bad_images": int(data.info.get("skipped_bad_images", 0)),
            "bad_images": [str(b) for b in data.info.get("bad_images", [])]}


class SimulationClients:
    """The clients of an in-process run: an executor runs their updates, their states stay in a
    store on disk with a few in memory."""

    def __init__(self, sim: Simulation, executor, store: ClientStateStore, progress: bool):
        self.sim, self.executor, self.store, self.progress = sim, executor, store, progress

    def client_ids(self) -> list[int]:
        return [c.client_id for c in self.sim.training_clients]

    def train(self, round_index: int, message: ServerMessage, client_ids: list[int], evaluate_local: bool) -> list[Outcome]:
        # A generator: the sequential executor reads each state just before its client trains.
        tasks = (ClientTask(round_index, k, self.sim.algorithm.client_message(message, k), self.store.get(k))
                 for k in client_ids)

        def keep(result: ClientResult) -> ClientResult:  # stored as it comes: a round holds few states at once
            self.store.put(result.reply.client_id, round_index, result.state)
            return replace(result, state=None)

        results = self.executor.run(tasks, len(client_ids), evaluate_local=evaluate_local, progress=self.progress,
                                    on_result=keep)
        return [Outcome(r.reply.client_id, r.reply, r.rows, predictions=r.predictions,
                        selected_predictions=r.selected_predictions) for r in results]

    def train_secure(self, round_index: int, message: ServerMessage, client_ids: list[int], evaluate_local: bool,
                     settings: SecureSettings) -> tuple[list[Outcome], SecureMean | None]:
        outcomes = self.train(round_index, message, client_ids, evaluate_local)
        return secure_in_process(outcomes, message.arrays, settings, self.sim.cfg.seed, round_index)

    def evaluate(self, round_index: int, global_state) -> dict[int, dict[str, Predictions]]:
        return self.sim.global_predictions(global_state)

    def finetuned(self, round_index: int, global_state) -> dict[int, dict[str, Predictions]]:
        return self.sim.finetuned_predictions(global_state)

    def checkpointed(self, round_index: int) -> None:
        self.store.commit(round_index)

    def min_replies(self, selected: int) -> int:
        return selected  # in one process every client answers; a rejected reply stops the run


def run(cfg: RunConfig, run_dir: RunDirectory, *, data: FederatedData | None = None, resume: bool = False,
        on_round_end: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Train for ``cfg.comm_round`` rounds (continuing from the last checkpoint with ``resume``),
    log every round to the run directory, and write the final model, results and report. Log lines
    go to stderr and to the run's log.txt."""
    from fedward import logs
    from fedward.download import go_offline

    go_offline(cfg.offline)
    logs.set_verbosity(quiet=cfg.quiet, verbose=cfg.verbose)
    with run_dir.writing(), logs.run_log(run_dir.path / "log.txt"):
        return _run(cfg, run_dir, data=data, resume=resume, on_round_end=on_round_end)


def startup_lines(cfg: RunConfig, data: FederatedData, sim: "Simulation", devices: list[str], threads: int,
                  run_dir: RunDirectory) -> list[str]:
    """What a run uses, said once at its start: data (and where from), clients and their sizes,
    classes, method, model, devices and threads, output folder."""
    where = f" from {cfg.data_dir}" if cfg.data_dir else " (built in)"
    sizes = ", ".join(f"{c.name} {len(c.train)}/{len(c.val)}/{len(c.test)}" for c in data.clients)
    algorithm = sim.algorithm
    model = (",".join(algorithm.client_architecture(c.client_id) for c in data.clients) if algorithm.heterogeneous
             else algorithm.global_model_name())
    return [f"data: {cfg.dataset}{where}, {cfg.image_size} px; {len(data.clients)} clients (train/val/test): {sizes}",
            f"classes ({data.num_classes}): {', '.join(data.class_names)}",
            f"method: {cfg.method}, model {model}, {cfg.comm_round} rounds, loss {cfg.loss_fn_name}",
            f"device: {', '.join(devices)}, {threads} torch thread(s) per worker; output: {run_dir.path}",
            *([describe(p)] if (p := privacy_summary(cfg.to_dict(), len(data.clients))) else []),
            *([f"per-sample DP-SGD: clip {cfg.dp_sgd_clip:g}, noise multiplier {cfg.dp_sgd_noise_multiplier:g}; "
               "each client reports its epsilon as it trains"] if cfg.has("dp_sgd_clip") and cfg.dp_sgd_clip else []),
            *([f"secure aggregation: SecAgg+, updates clipped to +-{cfg.secagg_clipping_range:g} and quantised; the "
               "server sees only their weighted sum"] if cfg.has("secure_aggregation") and cfg.secure_aggregation
              else [])]


def _run(cfg: RunConfig, run_dir: RunDirectory, *, data: FederatedData | None, resume: bool,
         on_round_end: Callable[[int], None] | None) -> dict[str, Any]:
    import sys

    from fedward.engine.executor import make_executor

    devices = resolve_devices(cfg)
    data = data if data is not None else load_data(cfg)
    sim = Simulation(cfg, data, devices[0])
    algorithm = sim.algorithm

    store = ClientStateStore(run_dir.checkpoints_dir / CLIENT_STATES_FOLDER,
                             [c.client_id for c in sim.training_clients], cfg.states_in_memory)
    if resume and not ckpt.path_of(run_dir).is_file() and run_dir.config_path.is_file():
        # Stopped before its first checkpoint: its start is its config, so resuming is starting again.
        notice(f"{run_dir.path} has no checkpoint yet (it stopped in round 1): starting it again from round 0")
        run_dir.truncate_rounds_after(0)
        resume = False
    if resume:
        saved = ckpt.load(run_dir, expected_num_classes=sim.spec.num_classes, settings=cfg.to_dict())
        start_round, global_state, server_state = saved["round"], saved["global_state"], saved["server_state"]
        store.rewind(start_round)
        for k, state in enumerate(saved.get("client_states") or []):  # a checkpoint from before the store
            store.put(k, start_round, state)
        run_dir.truncate_rounds_after(start_round)
        notice(f"resuming {run_dir.path} after round {start_round} of {cfg.comm_round}")
    else:
        global_state, notices = initial_global_state(cfg, sim.build_model)
        for line in notices:
            notice(line)
        start_round = 0
        store.rewind(0)  # a folder started over: no state of an earlier run
        server_state = algorithm.initial_server_state(global_state)

    executor = make_executor(cfg, data, devices, sim)
    # One device: this process trains, with the cores; several: each pool worker takes its share.
    threads = (configure_threads(1, cfg.threads) if len(devices) == 1 else
               cfg.threads or max(1, cpu_cores() // len(devices)))
    for line in startup_lines(cfg, data, sim, devices, threads, run_dir):
        notice(line)
    bars = cfg.progress and sys.stderr.isatty()  # a piped or captured stderr gets the lines only
    clients = SimulationClients(sim, executor, store, bars)
    loop = RoundLoop(cfg, algorithm, sim.spec, run_dir, clients, log=notice, progress=bars)
    try:
        global_state = loop.run(start_round, global_state, server_state, on_round_end=on_round_end)
    finally:
        executor.close()
    return finish(cfg, run_dir, sim, global_state, (store.get(k) for k in store.client_ids))


def model_meta(cfg: RunConfig, spec: TaskSpec, model: str) -> dict[str, Any]:
    """What a saved model file records next to its weights (``model``: its registry name)."""
    return {"model": model, "method": cfg.method, "num_classes": spec.num_classes, "image_size": spec.image_size,
            "class_names": spec.class_names, "mean": list(spec.mean), "std": list(spec.std)}


def client_model_payload(cfg: RunConfig, spec: TaskSpec, algorithm: Algorithm, client_id: int,
                         state: dict[str, Any]) -> dict[str, Any] | None:
    """A personalised client's saved model (its architecture, weights and the task facts), or None."""
    local = algorithm.local_model_state(ClientReply(client_id, {}, {}), state)
    if local is None:
        return None
    model = algorithm.client_architecture(client_id) if algorithm.heterogeneous else algorithm.global_model_name()
    return {**model_meta(cfg, spec, model), "client": client_id, "state_dict": local}


def finish(cfg: RunConfig, run_dir: RunDirectory, sim: Simulation, global_state,
           client_states: Iterable[dict[str, Any]] | None) -> dict[str, Any]:
    """Final model(s), results.json and the report. ``client_states`` None: the personalised models
    are on the clients' own machines (Flower), not here."""
    if sim.algorithm.personalised:
        # Personalised models stay with their clients; in simulation the "client side" is this folder.
        for k, state in enumerate(client_states or []):
            payload = client_model_payload(cfg, sim.spec, sim.algorithm, k, state)
            if payload is not None:
                torch.save(payload, run_dir.client_model_path(k))
    else:
        torch.save({**model_meta(cfg, sim.spec, sim.algorithm.global_model_name()), "state_dict": global_state}, run_dir.final_model_path)
    summary = summarize(run_dir.read_rows())
    privacy = privacy_summary(cfg.to_dict(), len(sim.spec.train_class_counts))
    if privacy is not None:
        summary["privacy"] = privacy
    per_sample = per_sample_summary(cfg.to_dict(), run_dir.read_rows())
    if per_sample is not None:
        summary["per_sample_privacy"] = per_sample
        notice(describe_per_sample(per_sample))
    secure = secure_summary(cfg.to_dict(), run_dir.read_rows())
    if secure is not None:
        summary["secure_aggregation"] = secure
        notice(describe_secure(secure))
    run_dir.write_results(summary)
    run_dir.write_hparams(cfg.to_dict(), {"final_test_ba": summary["final"]["balanced_accuracy"],
                                          "selected_test_ba": (summary.get("selected") or {}).get("balanced_accuracy"),
                                          "mean_client_ba": summary.get("mean_client_final")})
    write_report(run_dir)
    if not cfg.keep_checkpoint:
        (run_dir.checkpoints_dir / "last.pt").unlink(missing_ok=True)
        shutil.rmtree(run_dir.checkpoints_dir / CLIENT_STATES_FOLDER, ignore_errors=True)
    return summary


def print_summary(summary: dict[str, Any], run_dir: RunDirectory) -> None:
    print(format_summary_table(summary, run_dir.read_config().get("client_names")))
    print(f"run directory: {run_dir.path}")
