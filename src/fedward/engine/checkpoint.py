"""Checkpoints: after every round, everything a resumed run needs to continue exactly.

Randomness needs no saved state: every draw comes from generators keyed by (seed, round, client),
so a resumed round draws what the uninterrupted run drew.
"""

from __future__ import annotations

import threading
from typing import Any, Callable

import torch

from fedward.errors import CheckpointError
from fedward.tracking import RunDirectory
from fedward.tracking.rundir import atomic_torch_save

FORMAT_VERSION = 1

# What a resumed run may change: how it reports progress, whether it may download weights, whether
# it keeps its checkpoint, and its folder (a run directory may be moved). comm_round may grow (a
# longer run), never shrink.
RESUME_MAY_CHANGE = ("output", "progress", "quiet", "verbose", "offline", "keep_checkpoint", "states_in_memory")


def path_of(run_dir: RunDirectory):
    return run_dir.checkpoints_dir / "last.pt"


def save(run_dir: RunDirectory, *, round: int, global_state, server_state, num_classes: int,
         settings: dict[str, Any]) -> None:
    """Write the checkpoint atomically (a crash mid-write leaves the previous one intact), with the
    settings it was trained under (a resume under other settings is refused). The clients' states
    are not in it: they are in checkpoints/clients/ (``fedward.engine.client_states``), or on the
    clients' own machines on Flower. Older checkpoints held them as ``client_states``."""
    run_dir.checkpoints_dir.mkdir(parents=True, exist_ok=True)
    payload = {"format": FORMAT_VERSION, "round": round, "global_state": global_state,
               "server_state": server_state, "num_classes": num_classes, "settings": settings}
    atomic_torch_save(payload, path_of(run_dir))


def changed_settings(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """``key old -> new`` for every setting a resume may not change; a setting the checkpoint
    predates counts at its default."""
    from fedward.config import completed_settings

    saved = completed_settings(saved)
    keys = sorted(set(saved) | set(now))
    return [f"{k} {saved.get(k)!r} -> {now.get(k)!r}" for k in keys
            if k not in RESUME_MAY_CHANGE and k != "comm_round" and saved.get(k) != now.get(k)]


def check_resume(path, payload: dict[str, Any], settings: dict[str, Any]) -> None:
    """A resume continues the run its checkpoint holds, or stops naming what differs."""
    saved = payload.get("settings")
    if saved is None:  # a checkpoint from before settings were saved: nothing to compare
        return
    changed = changed_settings(saved, settings)
    if changed:
        raise CheckpointError(f"the run's settings differ from those its checkpoint {path} was trained with: "
                              f"{'; '.join(changed)}; restore them in config.yaml or start a new run")
    if settings["comm_round"] < payload["round"]:
        raise CheckpointError(f"comm_round {settings['comm_round']} is below round {payload['round']} that the "
                              f"checkpoint {path} has reached")
    if settings["comm_round"] != saved["comm_round"]:
        from fedward.logs import info

        info(f"comm_round changed from {saved['comm_round']} to {settings['comm_round']}: the run continues "
             f"to round {settings['comm_round']}")


def load(run_dir: RunDirectory, *, expected_num_classes: int, settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """The checkpoint of ``run_dir``; with ``settings`` (the resumed run's), checked against the
    settings it was trained with."""
    path = path_of(run_dir)
    if not path.is_file():
        raise CheckpointError(f"{run_dir.path} has no checkpoint ({path} is missing): nothing to resume; start a new run")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # a truncated or foreign file
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(err).__name__}: {err})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path} is not a fedward checkpoint of format {FORMAT_VERSION}")
    if payload["num_classes"] != expected_num_classes:
        raise CheckpointError(f"checkpoint {path} was trained for {payload['num_classes']} classes but the data "
                              f"has {expected_num_classes}")
    if settings is not None:
        check_resume(path, payload, settings)
    return payload


class BackgroundSaver:
    """Writes each round's checkpoint in a background thread while the next round trains.

    Safe because nothing saved is mutated afterwards: aggregation makes a new global state every
    round, and clients replace (never modify in place) what they keep in their state. At most one
    write is in flight; ``wait`` returns once the last one is on disk (a run waits before it ends
    or raises, so an interrupted run always finds its last completed round).
    """

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def submit(self, run_dir: RunDirectory, *, on_saved: Callable[[int], None] | None = None, **payload: Any) -> None:
        """Write a checkpoint; ``on_saved(round)`` runs in the writing thread once it is on disk."""
        self.wait()

        def work() -> None:
            try:
                save(run_dir, **payload)
                if on_saved is not None:
                    on_saved(payload["round"])
            except BaseException as err:  # surfaced by the next wait()
                self._error = err

        self._thread = threading.Thread(target=work, name="fedward-checkpoint", daemon=False)
        self._thread.start()

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error
