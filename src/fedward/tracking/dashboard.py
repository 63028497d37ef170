"""``fedward dashboard``: a live web view of running and finished runs.

It is TensorBoard, which fedward already depends on and writes to every round: its scalars page
follows the runs as they write (learning curves per hospital and class, aggregation weights,
participation), its HPARAMS tab compares the settings of finished runs, and it needs no new
package, no browser plug-in and no database. A hand-written page would re-implement its file
watching and plotting; a general dashboard framework (Dash, Streamlit) would add a heavy
dependency for the same plots.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from fedward.errors import ConfigError
from fedward.tracking.rundir import TENSORBOARD_NAME

RELOAD_SECONDS = 5


def logdir_spec(paths: list[str | os.PathLike[str]]) -> str:
    """TensorBoard's ``--logdir_spec``: ``name:folder`` for each run directory (its tensorboard/
    folder), or a folder of runs, which TensorBoard searches for event files itself."""
    entries = []
    for given in paths:
        path = Path(given)
        if not path.is_dir():
            raise ConfigError(f"dashboard: {path} is not a folder; expected a run directory or a folder of runs")
        folder = path / TENSORBOARD_NAME if (path / TENSORBOARD_NAME).is_dir() else path
        name = path.resolve().name or str(path)
        if ":" in name or "," in name:
            raise ConfigError(f"dashboard: the folder name {name!r} holds ':' or ',', which TensorBoard's --logdir_spec cannot take")
        entries.append(f"{name}:{folder.resolve()}")
    names = [entry.split(":", 1)[0] for entry in entries]
    if len(set(names)) < len(names):
        raise ConfigError(f"dashboard: two folders share a name ({', '.join(sorted(n for n in set(names) if names.count(n) > 1))}); "
                          "give their parent folder instead")
    return ",".join(entries)


def launch(paths: list[str | os.PathLike[str]], *, host: str = "127.0.0.1", port: int = 6006) -> str:
    """Start TensorBoard over the runs in a background thread; its URL."""
    from tensorboard import program

    board = program.TensorBoard()
    board.configure(argv=[None, "--logdir_spec", logdir_spec(paths), "--host", host, "--port", str(port),
                          "--reload_interval", str(RELOAD_SECONDS)])
    return board.launch()


def serve(paths: list[str | os.PathLike[str]], *, host: str = "127.0.0.1", port: int = 6006) -> None:
    url = launch(paths, host=host, port=port)
    print(f"fedward: dashboard at {url} (TensorBoard, reloading every {RELOAD_SECONDS} s); Ctrl-C stops it", flush=True)
    while True:
        time.sleep(3600)
