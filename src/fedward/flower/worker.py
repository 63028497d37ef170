"""A warm process beside a SuperNode that runs the node's messages.

Flower 1.41 starts a fresh ClientApp process for every message (``flwr-clientapp`` runs one task
and exits; the SuperExec starts the next), so each message paid Python + torch + fedward imports
(about 2.5 s on this machine, more under load) and reloaded the node's data. ``fedward flower
supernode`` now also starts this worker; fedward's ClientApp, which imports only Flower, hands
each message's records to it over a Unix socket and returns its answer. The worker keeps torch,
the data and the method loaded between messages, as Flower's simulation runtime keeps its
processes; client states still go through the node's state folder, so a restarted worker (or a
message run in the ClientApp itself, when no worker answers) continues exactly.

The socket is created with mode 0600 in a folder of mode 0700: only the node's own user can
connect. Records travel in Flower's own protobuf format, the configs and errors pickled, between
two processes of that user.
"""

from __future__ import annotations

import argparse
import os
import pickle
import signal
import socket
import struct
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any

WORKER_KEY = "worker-socket"  # the node config key naming the worker's socket
_HEADER = struct.Struct("!Q")


def socket_path(pid: int) -> Path:
    """Where the worker of the SuperNode with this pid listens (short: a Unix socket path has at
    most 107 bytes)."""
    folder = Path(tempfile.gettempdir()) / f"fedward-{os.getuid()}"
    folder.mkdir(mode=0o700, exist_ok=True)
    return folder / f"node-{pid}.sock"


def _send(conn: socket.socket, obj: Any) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    conn.sendall(_HEADER.pack(len(data)) + data)


def _receive(conn: socket.socket) -> Any:
    def exactly(n: int) -> bytes:
        chunks, left = [], n
        while left:
            chunk = conn.recv(min(left, 1 << 20))
            if not chunk:
                raise ConnectionError("the fedward node worker closed the connection mid-message")
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)

    (size,) = _HEADER.unpack(exactly(_HEADER.size))
    return pickle.loads(exactly(size))


def _records_to_bytes(content: Any) -> bytes:
    # Flower's own wire format: its arrays may be memoryviews of received buffers, which pickle refuses.
    from flwr.common.serde import recorddict_to_proto

    return recorddict_to_proto(content).SerializeToString()


def _records_from_bytes(data: bytes) -> Any:
    from flwr.common.serde import recorddict_from_proto
    from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

    proto = ProtoRecordDict()
    proto.ParseFromString(data)
    return recorddict_from_proto(proto)


def forward(path: str, kind: str, content: Any, run_config: dict, node_config: dict) -> Any | None:
    """The worker's answer to one message (its reply records), or None when no worker listens at
    ``path`` (the caller then runs the message itself). An error in the worker is raised here."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(path)
    except (FileNotFoundError, ConnectionRefusedError):
        conn.close()
        return None
    with conn:
        _send(conn, (kind, _records_to_bytes(content), run_config, node_config))
        status, value = _receive(conn)
    if status == "error":
        raise value
    return _records_from_bytes(value)


def serve(path: Path, parent_pid: int) -> None:
    """Answer messages one at a time until the SuperNode (``parent_pid``) is gone."""
    from fedward.flower import handlers  # torch and fedward: imported once, here

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # a SuperNode stopped with its group: clean up
    path.unlink(missing_ok=True)  # a killed predecessor's
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    os.chmod(path, 0o600)
    server.listen(4)
    server.settimeout(1.0)
    try:
        while os.getppid() == parent_pid:
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(None)
                try:
                    kind, content, run_config, node_config = _receive(conn)
                except (ConnectionError, EOFError, pickle.UnpicklingError):
                    continue  # a ClientApp that died mid-message: serve the next one
                try:
                    reply = handlers.handle(kind, _records_from_bytes(content), run_config, node_config)
                    answer = ("ok", _records_to_bytes(reply))
                except Exception as err:  # handed to the ClientApp, which raises it for Flower to report
                    answer = ("error", _picklable(err))
                try:
                    _send(conn, answer)
                except OSError:
                    continue
    finally:
        server.close()
        path.unlink(missing_ok=True)


def _picklable(err: Exception) -> Exception:
    from fedward.errors import FedwardError

    if isinstance(err, FedwardError):
        return err
    return RuntimeError(f"{type(err).__name__}: {err}\n{''.join(traceback.format_exception(err))}")


def main() -> None:
    parser = argparse.ArgumentParser(description="fedward's warm message worker for one SuperNode")
    parser.add_argument("--socket", required=True)
    parser.add_argument("--parent-pid", type=int, required=True)
    args = parser.parse_args()
    serve(Path(args.socket), args.parent_pid)


if __name__ == "__main__":
    main()
