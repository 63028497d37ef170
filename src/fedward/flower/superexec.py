"""``flower-superexec`` whose ClientApp processes are forked from a warm one instead of started cold.

Flower 1.41's SuperExec starts ``flwr-clientapp`` as a new program for every message; most of a
deployment message's cost on a small CPU was that start (Python, then Flower's and fedward's
ClientApp imports: about 1 s, three nodes at once on two cores). ``fedward flower supernode``
runs its SuperNode with this module in place of ``flower-superexec``: Flower's own SuperExec,
except that its executor's ``flwr-clientapp`` launches go to a fork server. The server is forked
off when this process starts (one thread, nothing else running), imports the ClientApp's modules
once, and forks one child per launch that runs Flower's ``flwr-clientapp`` entry point with the
arguments Flower built. Each message still gets its own process, with its module state as fresh as
a cold start's; only the import work is shared. The imports are those of the installed fedward
and Flower: restart the node after upgrading either (as for the warm worker). With another Flower
version, or ``--no-fork-server``, Flower's SuperExec runs unchanged.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import traceback
import types
from typing import Any, Callable

FORK_SERVER_ENV = "FEDWARD_CLIENTAPP_FORK_SERVER"  # "1": the SuperNode runs this module as its SuperExec
CLIENTAPP_COMMAND = "flwr-clientapp"
PATCHED_FLOWER = "1.41.0"  # the version whose SuperExec and executor this was read from


def _run_child(request: dict, main: Callable[[], Any]) -> None:
    """The forked ClientApp process: Flower's ``flwr-clientapp`` with the launch's arguments."""
    code = 1
    try:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        if request["quiet"]:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
        sys.argv = list(request["args"])
        main()
        code = 0
    except SystemExit as stop:  # flwr-clientapp ends with sys.exit(code)
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    except BaseException:  # noqa: BLE001  (a crash must end this process, never return to the server loop)
        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(code)


def clientapp_main() -> Callable[[], Any]:
    """Flower's ``flwr-clientapp`` entry point, with the modules of fedward's ClientApp imported."""
    import importlib

    from flwr.supernode.cli import flwr_clientapp

    importlib.import_module("fedward.flower.client_app")  # the ClientApp every fedward FAB names
    return flwr_clientapp


def _serve(requests_fd: int, load: Callable[[], Callable[[], Any]]) -> None:
    """The fork server's loop: one JSON line per launch; ends when the SuperExec closes the pipe."""
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps the children
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the SuperExec's Ctrl-C is its own; EOF ends this one
    main = load()
    with os.fdopen(requests_fd, "rb") as requests:
        for line in requests:
            request = json.loads(line)
            if os.fork() == 0:
                requests.close()
                _run_child(request, main)
    os._exit(0)


class ForkServer:
    """A process that forks ClientApp processes on request. Create it before any thread starts.
    ``load`` runs once in the server and returns the entry point each child runs."""

    def __init__(self, load: Callable[[], Callable[[], Any]] = clientapp_main) -> None:
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(write_fd)
            try:
                _serve(read_fd, load)
            finally:
                os._exit(1)
        os.close(read_fd)
        self.pid = pid
        self._requests = write_fd

    def launch(self, args: list[str], quiet: bool) -> bool:
        """Ask for one ClientApp process; False when the server is gone (the caller starts it cold)."""
        line = (json.dumps({"args": [str(a) for a in args], "quiet": quiet}) + "\n").encode()
        try:
            os.write(self._requests, line)  # one write below PIPE_BUF: never interleaved
            return True
        except OSError:
            return False


def module_with(module: types.ModuleType, **replaced: Any) -> types.SimpleNamespace:
    """A stand-in for ``module`` as one Flower module sees it (assigned to that module's global):
    every public name of ``module``, with ``replaced`` in place of some."""
    names = {name: getattr(module, name) for name in dir(module) if not name.startswith("__")}
    return types.SimpleNamespace(**{**names, **replaced})


def executor_subprocess(server: ForkServer) -> types.SimpleNamespace:
    """The ``subprocess`` module as Flower's subprocess executor sees it: ``flwr-clientapp``
    launches go to ``server``; anything else, or a launch the server cannot take, starts cold."""
    def popen(args, **kwargs):
        if args and args[0] == CLIENTAPP_COMMAND and server.launch(list(args), kwargs.get("stdout") is subprocess.DEVNULL):
            return None  # the executor keeps no handle (Flower's own launch discards its Popen)
        return subprocess.Popen(args, **kwargs)

    return module_with(subprocess, Popen=popen)


def supernode_subprocess() -> types.SimpleNamespace:
    """The ``subprocess`` module as the SuperNode sees it: its ``flower-superexec`` is this module."""
    def popen(args, **kwargs):
        if args and args[0] == "flower-superexec":
            args = [sys.executable, "-m", __name__, *args[1:]]
        return subprocess.Popen(args, **kwargs)

    return module_with(subprocess, Popen=popen)


def main() -> None:
    import flwr

    if flwr.__version__ == PATCHED_FLOWER:
        server = ForkServer()
        from flwr.supercore.superexec.executor import subprocess_executor

        subprocess_executor.subprocess = executor_subprocess(server)
    else:
        print(f"fedward: Flower {flwr.__version__} is not {PATCHED_FLOWER}: its SuperExec starts each ClientApp "
              "process cold", file=sys.stderr, flush=True)
    from flwr.supercore.cli import flower_superexec

    sys.argv[0] = "flower-superexec"
    sys.exit(flower_superexec())


if __name__ == "__main__":
    main()
