"""What a SuperNode does for its hospital.

A node holds one client: it loads only its own data (from the path in its node config), runs the
method's ``client_update`` with the same per-(seed, round, client) generators as the simulation,
and keeps the client's state (optimizer moments, personalised model, R/T, W_h) in a folder on the
node, one file per round, so the state survives a restart of the SuperNode and a resumed server
finds the state of the round it resumes from.

Node config keys (``flower-supernode --node-config "client-id=0 data-dir='/data/h0'"``, or
``fedward flower supernode --client-id 0 --data /data/h0``):

- ``client-id``: this hospital's index in the federation (0..K-1). Flower's simulation runtime
  sets ``partition-id`` instead, which is used when ``client-id`` is absent.
- ``data-dir``: the hospital's data. A data set with one client (e.g. a ``folders`` tree holding
  just this hospital's folder) is this client's; a data set with several (the built-in synthetic
  data, a full FLamby tree) gives this node client ``client-id`` and nothing else.
- ``state-dir``: where the client's state and its final personalised model are kept
  (default ``$FEDWARD_CACHE/flower-nodes``).
- ``device``: ``cpu``, ``cuda`` or ``cuda:N`` (default: ``cuda`` when present, else ``cpu``).
- ``prior-path``: Fed-MAS's prior checkpoint on this machine (default: the run's ``prior_path``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from fedward.algorithms.base import Arrays, ClientReply, ServerMessage
from fedward.config import RunConfig, build_config
from fedward.data.types import FederatedData
from fedward.engine.evaluation import write_predictions
from fedward.engine.rounds import prediction_blocks
from fedward.engine.setup import configure_threads, load_data
from fedward.engine.simulation import ClientTask, Simulation, client_model_payload
from fedward.errors import ConfigError
from fedward.paths import cache_root
from fedward.tracking.rundir import atomic_torch_save

STATE_FILE = re.compile(r"round-(\d+)\.pt$")


def default_state_dir() -> Path:
    return cache_root() / "flower-nodes"


@dataclass(frozen=True)
class NodeSettings:
    client_id: int
    data_dir: str | None
    state_dir: Path
    device: str
    prior_path: str | None

    @classmethod
    def from_node_config(cls, node_config: dict[str, Any]) -> "NodeSettings":
        raw_id = node_config.get("client-id", node_config.get("partition-id"))
        if raw_id is None:
            raise ConfigError("this SuperNode's node config has no client-id: start it with "
                              "--node-config \"client-id=K data-dir='/path/to/its/data'\"")
        try:
            client_id = int(raw_id)
        except (TypeError, ValueError):
            raise ConfigError(f"node config client-id={raw_id!r} is not an integer") from None
        if client_id < 0:
            raise ConfigError(f"node config client-id={client_id} must be >= 0")
        device = str(node_config.get("device") or ("cuda" if torch.cuda.is_available() else "cpu"))
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(f"node config device={device} needs CUDA, which this machine does not have")
        data_dir = node_config.get("data-dir")
        state_dir = node_config.get("state-dir")
        return cls(client_id=client_id, data_dir=str(data_dir) if data_dir else None,
                   state_dir=Path(str(state_dir)) if state_dir else default_state_dir(), device=device,
                   prior_path=str(node_config["prior-path"]) if node_config.get("prior-path") else None)


class NodeStateStore:
    """One client's state on its node: ``<state-dir>/<run-key>/client-<k>/round-<r>.pt``.

    A round's update starts from the newest state saved for an earlier round (a node that missed a
    round continues from the last one it took part in; a resumed server re-sends a round the node
    may already have done, and the node starts it again from the state before). Files older than
    ``keep`` rounds behind the newest are removed.
    """

    def __init__(self, root: Path, run_key: str, client_id: int, keep: int = 2):
        if not re.fullmatch(r"[A-Za-z0-9._-]+", run_key):
            raise ConfigError(f"run key {run_key!r} may only hold letters, digits, '.', '_' and '-'")
        self.folder = Path(root) / run_key / f"client-{client_id}"
        self.keep = max(keep, 1)

    def rounds(self) -> list[int]:
        if not self.folder.is_dir():
            return []
        return sorted(int(m.group(1)) for p in self.folder.iterdir() if (m := STATE_FILE.fullmatch(p.name)))

    def load_before(self, round_index: int) -> dict[str, Any]:
        earlier = [r for r in self.rounds() if r < round_index]
        if not earlier:
            return {}
        path = self.folder / f"round-{earlier[-1]}.pt"
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except Exception as err:  # a foreign or damaged file: say which
            raise ConfigError(f"client state {path} cannot be read ({type(err).__name__}: {err}); "
                              f"delete it to restart this client from round {earlier[-2] if len(earlier) > 1 else 0}") from None

    def save(self, round_index: int, state: dict[str, Any]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_torch_save(state, self.folder / f"round-{round_index}.pt")
        for old in self.rounds():
            if old <= round_index - self.keep:
                (self.folder / f"round-{old}.pt").unlink(missing_ok=True)

    @property
    def final_model_path(self) -> Path:
        return self.folder / "final_model.pt"


def load_node_data(cfg: RunConfig, settings: NodeSettings) -> FederatedData:
    """This node's client only, with its federation index as ``client_id``."""
    node_cfg = cfg.updated(data_dir=settings.data_dir or cfg.data_dir, progress=False)
    data = load_data(node_cfg)
    k = settings.client_id
    if data.num_clients == 1:  # the hospital's own data
        client = replace(data.clients[0], client_id=k)
    elif k < data.num_clients:
        client = data.clients[k]
    else:
        raise ConfigError(f"client-id {k}: the {data.name} data at {node_cfg.data_dir or '(built in)'} holds "
                          f"{data.num_clients} clients (ids 0..{data.num_clients - 1})")
    return replace(data, clients=[client], info={**data.info, "num_clients_loaded": data.num_clients})


class NodeRuntime:
    """A node's client for one run: its data, and the method built on the federation's facts.

    ClientApp processes may live for one message (deployment) or many (Flower's simulation
    runtime); :func:`runtime_for` keeps one per (run config, node settings) in a process.
    """

    def __init__(self, cfg: RunConfig, settings: NodeSettings):
        self.cfg = cfg.updated(prior_path=settings.prior_path) if settings.prior_path and cfg.has("prior_path") else cfg
        self.settings = settings
        self.data = load_node_data(self.cfg, settings)
        self.client = self.data.clients[0]
        self._sim: Simulation | None = None
        self._spec_json: str | None = None

    # -- handshake ---------------------------------------------------------------------------
    def facts(self) -> dict[str, Any]:
        """What the server learns about this client before round 1 (no image, no label)."""
        data, client = self.data, self.client
        return {"client-id": client.client_id, "client-name": client.name, "data-set": data.name,
                "clients-in-data": data.info.get("num_clients_loaded"), "num-classes": data.num_classes,
                "class-names": list(data.class_names), "image-size": data.image_size,
                "mean": list(data.mean), "std": list(data.std),
                "train-class-counts": client.train.class_counts(data.num_classes).tolist()}

    # -- rounds ------------------------------------------------------------------------------
    def simulation(self, spec_json: str) -> Simulation:
        if self._sim is None or spec_json != self._spec_json:
            from fedward.flower.records import spec_from_json

            own = self.client.train.class_counts(self.data.num_classes).tolist()
            spec = spec_from_json(spec_json, self.client.client_id, own)
            self._sim = Simulation(self.cfg, self.data, self.settings.device, spec=spec, pooled_local_rows=False)
            self._spec_json = spec_json
            configure_threads(1, self.cfg.threads)
            self._sim.workspace  # built before any seeded stream is drawn, as in the simulation's first client
        return self._sim

    def store(self, run_key: str) -> NodeStateStore:
        return NodeStateStore(self.settings.state_dir, run_key, self.client.client_id,
                              keep=self.cfg.checkpoint_every + 1)

    def train(self, message: ServerMessage, *, spec_json: str, run_key: str,
              evaluate_local: bool) -> tuple[ClientReply, list[dict[str, Any]]]:
        sim = self.simulation(spec_json)
        store = self.store(run_key)
        state = store.load_before(message.round)
        result = sim.run_client(ClientTask(message.round, self.client.client_id, message, state), evaluate_local)
        store.save(message.round, result.state)
        if result.predictions:  # per-image predictions stay here, beside the hospital's data
            write_predictions(store.folder, result.predictions, sim.spec.class_names)
        if result.selected_predictions:
            write_predictions(store.folder, result.selected_predictions, sim.spec.class_names, selected=True)
        if sim.algorithm.personalised and message.round == self.cfg.comm_round:
            payload = client_model_payload(self.cfg, sim.spec, sim.algorithm, self.client.client_id, result.state)
            if payload is not None:  # the personalised model stays here, on the hospital's machine
                atomic_torch_save(payload, store.final_model_path)
        return result.reply, result.rows

    def evaluate(self, global_state: Arrays, *, spec_json: str, round_index: int, run_key: str,
                 finetune: bool = False) -> list[dict[str, Any]]:
        """The global model (``finetune``: its copy fine-tuned here, +FT) on this client's val and test
        splits, as confusion matrices with the AUROC (which needs the per-image scores); at the final
        round the per-image predictions are written here, in this client's state folder."""
        sim = self.simulation(spec_json)
        if finetune:
            predictions = sim.finetuned_predictions(global_state, [self.client.client_id])[self.client.client_id]
        else:
            predictions = sim.global_predictions(global_state)[self.client.client_id]
        if round_index == self.cfg.comm_round:
            blocks = prediction_blocks(round_index, {self.client.client_id: predictions},
                                       "finetuned" if finetune else "global")
            if blocks:
                self.store(run_key).folder.mkdir(parents=True, exist_ok=True)
                write_predictions(self.store(run_key).folder, blocks, sim.spec.class_names)
        return [{"split": name, "confusion": pred.confusion(sim.spec.num_classes).tolist(), "loss_sum": pred.loss_sum,
                 "auroc": pred.auroc}
                for name, pred in predictions.items()]


_RUNTIMES: dict[tuple[str, NodeSettings], NodeRuntime] = {}


def runtime_for(config_json: str, settings: NodeSettings) -> NodeRuntime:
    key = (config_json, settings)
    if key not in _RUNTIMES:
        _RUNTIMES.clear()  # one run at a time per process: free the previous run's data
        _RUNTIMES[key] = NodeRuntime(build_config(json.loads(config_json)), settings)
    return _RUNTIMES[key]
