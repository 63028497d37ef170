"""What each simulated client keeps between rounds (optimizer moments, a personalised model, R/T,
control variates), on disk with a small cache in memory: memory stays flat in the number of
clients, and a checkpoint writes only the states that changed.

Layout: ``<run>/checkpoints/clients/client-<k>/round-<r>.pt``, the state client k left after round
r. A checkpoint of round R stands for each client's newest file with r <= R, so a file is removed
only once a newer one is covered by a completed checkpoint, and a resume first removes the files
of rounds after R (written by the interrupted run after its last checkpoint).
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from fedward.errors import CheckpointError
from fedward.tracking.rundir import atomic_torch_save

STATE_FILE = re.compile(r"round-(\d+)\.pt")
CLIENT_STATES_FOLDER = "clients"  # under the run's checkpoints/


class ClientStateStore:
    """Client states by id: ``get`` (the newest state, {} before the client's first round) and
    ``put`` (after a round); at most ``in_memory`` of them are held in memory, least recently used
    first out (0: none, every ``get`` reads its file)."""

    def __init__(self, folder: Path, client_ids: list[int], in_memory: int):
        self.folder, self.client_ids, self.in_memory = Path(folder), list(client_ids), in_memory
        self._cache: OrderedDict[int, dict[str, Any]] = OrderedDict()
        self._unpruned: set[int] = set()  # clients with files a later commit may remove
        self._lock = threading.Lock()  # commit() runs in the checkpoint thread

    def _client_folder(self, client_id: int) -> Path:
        return self.folder / f"client-{client_id}"

    def rounds(self, client_id: int) -> list[int]:
        folder = self._client_folder(client_id)
        if not folder.is_dir():
            return []
        return sorted(int(m.group(1)) for p in folder.iterdir() if (m := STATE_FILE.fullmatch(p.name)))

    def get(self, client_id: int) -> dict[str, Any]:
        with self._lock:
            if client_id in self._cache:
                self._cache.move_to_end(client_id)
                return self._cache[client_id]
            saved = self.rounds(client_id)
        if not saved:
            return {}
        path = self._client_folder(client_id) / f"round-{saved[-1]}.pt"
        try:
            state = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as err:  # a damaged file: say which
            raise CheckpointError(f"client state {path} cannot be read ({type(err).__name__}: {err})") from None
        self._remember(client_id, state)
        return state

    def put(self, client_id: int, round_index: int, state: dict[str, Any]) -> None:
        """Keep the state client ``client_id`` left after ``round_index`` (on disk at once: a
        checkpoint of this round then covers it)."""
        if state or self.rounds(client_id):  # a client that keeps nothing writes nothing
            folder = self._client_folder(client_id)
            folder.mkdir(parents=True, exist_ok=True)
            atomic_torch_save(state, folder / f"round-{round_index}.pt")
            with self._lock:
                self._unpruned.add(client_id)
        self._remember(client_id, state)

    def _remember(self, client_id: int, state: dict[str, Any]) -> None:
        with self._lock:
            if self.in_memory <= 0:
                return
            self._cache[client_id] = state
            self._cache.move_to_end(client_id)
            while len(self._cache) > self.in_memory:
                self._cache.popitem(last=False)

    def commit(self, round_index: int) -> None:
        """A checkpoint of ``round_index`` is on disk: each client's files older than its newest one
        at or before that round are no longer needed."""
        with self._lock:  # only the clients written since: a round's cost follows the clients that trained
            for client_id in sorted(self._unpruned):
                saved = self.rounds(client_id)
                covered = [r for r in saved if r <= round_index]
                for old in covered[:-1]:
                    (self._client_folder(client_id) / f"round-{old}.pt").unlink(missing_ok=True)
                if all(r <= round_index for r in saved):
                    self._unpruned.discard(client_id)

    def rewind(self, round_index: int) -> None:
        """Resume after ``round_index``: the files of later rounds are an interrupted run's."""
        with self._lock:
            self._cache.clear()
            for client_id in self.client_ids:
                for later in [r for r in self.rounds(client_id) if r > round_index]:
                    (self._client_folder(client_id) / f"round-{later}.pt").unlink(missing_ok=True)
                if len(self.rounds(client_id)) > 1:  # an interrupted run's files the next commit prunes
                    self._unpruned.add(client_id)

    def states(self) -> list[dict[str, Any]]:
        """Every client's newest state, in id order (the personalised models at the end of a run)."""
        return [self.get(k) for k in self.client_ids]

    def nbytes_on_disk(self) -> int:
        return sum(p.stat().st_size for p in self.folder.rglob("round-*.pt")) if self.folder.is_dir() else 0
