"""``flower-supernode`` with shorter waits: Flower's own CLI, run after capping the sleeps of its
SuperNode loop.

Flower 1.41's SuperNode sleeps a fixed 3 s whenever a pull from the SuperLink finds no message,
and 0.5 s at a time while it waits for a reply or an object (``flwr/supernode/
start_client_internal.py``; no setting changes them). So every message waits 1.5 s on average
before a node sees it, and a SecAgg+ round sends four. ``fedward flower supernode`` runs this
module instead of ``flower-supernode``, with every such sleep capped at ``--idle-poll`` seconds
(default 0.2: five pulls a second per idle node, a trivial load on a SuperLink). With another
Flower version the sleeps are left alone and the node says so. ``--idle-poll 3`` gives Flower's
own behaviour. With ``--fork-server`` (the default) its SuperExec is :mod:`fedward.flower.superexec`,
which forks each ClientApp process from a warm one.
"""

from __future__ import annotations

import os
import sys
import time
import types

IDLE_POLL_ENV = "FEDWARD_SUPERNODE_IDLE_POLL"  # seconds; set by `fedward flower supernode --idle-poll`
DEFAULT_IDLE_POLL = 0.2
PATCHED_FLOWER = "1.41.0"  # the version whose loop this was read from


def capped_time(limit: float) -> types.SimpleNamespace:
    """The ``time`` module as the SuperNode loop sees it: every sleep at most ``limit`` seconds."""
    from fedward.flower.superexec import module_with

    return module_with(time, sleep=lambda seconds: time.sleep(min(float(seconds), limit)))


def main() -> None:
    import flwr
    from flwr.supernode import start_client_internal
    from flwr.supernode.cli.flower_supernode import flower_supernode

    from fedward.flower.superexec import FORK_SERVER_ENV, supernode_subprocess

    limit = float(os.environ.get(IDLE_POLL_ENV, DEFAULT_IDLE_POLL))
    if flwr.__version__ == PATCHED_FLOWER:
        start_client_internal.time = capped_time(limit)
        if os.environ.get(FORK_SERVER_ENV) == "1":
            start_client_internal.subprocess = supernode_subprocess()
    else:
        print(f"fedward: Flower {flwr.__version__} is not {PATCHED_FLOWER}: its SuperNode keeps its own poll "
              "interval (3 s when idle)", file=sys.stderr, flush=True)
    sys.argv[0] = "flower-supernode"
    sys.exit(flower_supernode())


if __name__ == "__main__":
    main()
