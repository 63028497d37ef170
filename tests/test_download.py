"""fedward.download against a real HTTP server on 127.0.0.1 that serves bytes held in memory."""

from __future__ import annotations

import hashlib
import io
import random
import re
import socket
import sys
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from fedward.download import DownloadError, RemoteFile, download, file_digest, verify
from fedward.errors import FedwardError

BODY = random.Random(0).randbytes(300_000)
MD5 = hashlib.md5(BODY).hexdigest()
SHA256 = hashlib.sha256(BODY).hexdigest()
CHUNK = 1 << 14  # small chunks so a transfer takes many reads


@dataclass
class ServerState:
    """How the test server behaves, and what it saw."""

    ignore_range: bool = False
    cut_after: int | None = None  # on the first request: announce the full length, send this many bytes, hang up
    ranges: list[str | None] = field(default_factory=list)  # the Range header of every request, in order
    url: str = ""  # http://127.0.0.1:PORT, set once the server listens


def _handler(state: ServerState) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            state.ranges.append(self.headers.get("Range"))
            if self.path != "/file.bin":
                self.send_error(404)
                return
            if state.cut_after is not None and len(state.ranges) == 1:
                self.send_response(200)
                self.send_header("Content-Length", str(len(BODY)))
                self.end_headers()
                self.wfile.write(BODY[:state.cut_after])
                self.close_connection = True
                return
            match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
            if match is None or state.ignore_range:
                self._send(200, BODY)
                return
            start = int(match.group(1))
            if start >= len(BODY):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(BODY)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self._send(206, BODY[start:], {"Content-Range": f"bytes {start}-{len(BODY) - 1}/{len(BODY)}"})

        def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
            self.send_response(status)
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:  # keep test output quiet
            pass

    return Handler


@pytest.fixture
def server():
    state = ServerState()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    # A short poll interval so shutdown() returns at once instead of after up to 0.5 s.
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield state
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=5)


def _remote(server, **overrides) -> RemoteFile:
    values = dict(name="file.bin", url=f"{server.url}/file.bin", md5_prefix=MD5[:8], sha256_prefix=SHA256[:8],
                  size=len(BODY))
    values.update(overrides)
    return RemoteFile(**values)


def test_full_download_verifies(server, tmp_path):
    path = download(_remote(server), tmp_path, progress=False, chunk_size=CHUNK)
    assert path == tmp_path / "file.bin"
    assert path.read_bytes() == BODY
    assert not (tmp_path / "file.bin.part").exists()
    assert server.ranges == [None]
    assert file_digest(path, "sha256") == SHA256
    verify(path, _remote(server))


def test_interrupted_transfer_resumes(server, tmp_path):
    server.cut_after = 100_000
    with pytest.raises(DownloadError, match="resume") as caught:
        download(_remote(server), tmp_path, progress=False, chunk_size=CHUNK)
    assert "100000 bytes" in str(caught.value) and server.url in str(caught.value)
    assert (tmp_path / "file.bin.part").stat().st_size == 100_000
    assert not (tmp_path / "file.bin").exists()

    path = download(_remote(server), tmp_path, progress=True, chunk_size=CHUNK)  # exercises the bar's offset
    assert server.ranges == [None, "bytes=100000-"]
    assert path.read_bytes() == BODY
    assert not (tmp_path / "file.bin.part").exists()


def test_server_ignoring_range_restarts_from_zero(server, tmp_path, capsys):
    server.ignore_range = True
    (tmp_path / "file.bin.part").write_bytes(b"x" * 50_000)  # wrong bytes: appending to them would fail
    path = download(_remote(server), tmp_path, progress=False, chunk_size=CHUNK)
    assert server.ranges == ["bytes=50000-"]
    assert path.read_bytes() == BODY
    assert "from zero" in capsys.readouterr().err


def test_complete_part_answered_416_is_verified_as_is(server, tmp_path):
    (tmp_path / "file.bin.part").write_bytes(BODY)
    path = download(_remote(server), tmp_path, progress=False)
    assert server.ranges == [f"bytes={len(BODY)}-"]
    assert path.read_bytes() == BODY


def test_wrong_checksum_keeps_corrupt_file(server, tmp_path):
    wrong = "0" * 8 if not MD5.startswith("0" * 8) else "f" * 8
    with pytest.raises(DownloadError) as caught:
        download(_remote(server, md5_prefix=wrong), tmp_path, progress=False, chunk_size=CHUNK)
    message = str(caught.value)
    assert wrong in message and MD5[:8] in message and f"{server.url}/file.bin" in message
    assert isinstance(caught.value, FedwardError)
    assert not (tmp_path / "file.bin").exists()
    assert not (tmp_path / "file.bin.part").exists()
    assert (tmp_path / "file.bin.corrupt").read_bytes() == BODY


def test_wrong_size_is_reported(server, tmp_path):
    with pytest.raises(DownloadError, match=f"expected {len(BODY) + 1} bytes"):
        download(_remote(server, size=len(BODY) + 1), tmp_path, progress=False)
    assert (tmp_path / "file.bin.corrupt").exists()


def test_verified_file_already_there_needs_no_request(server, tmp_path):
    (tmp_path / "file.bin").write_bytes(BODY)
    assert download(_remote(server), tmp_path, progress=False) == tmp_path / "file.bin"
    assert server.ranges == []


def test_wrong_file_already_there_is_not_replaced(server, tmp_path):
    (tmp_path / "file.bin").write_bytes(b"my own file")
    with pytest.raises(DownloadError, match="already there"):
        download(_remote(server), tmp_path, progress=False)
    assert server.ranges == []
    assert (tmp_path / "file.bin").read_bytes() == b"my own file"


def test_404_names_url_and_status(server, tmp_path):
    url = f"{server.url}/missing.bin"
    with pytest.raises(DownloadError, match="404") as caught:
        download(_remote(server, url=url), tmp_path, progress=False)
    assert url in str(caught.value)
    assert not (tmp_path / "file.bin").exists()


def test_unreachable_server_says_resume(tmp_path):
    with socket.socket() as probe:  # a port that was free a moment ago refuses connections
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    remote = RemoteFile(name="file.bin", url=f"http://127.0.0.1:{port}/file.bin")
    with pytest.raises(DownloadError, match="resume from the 0 bytes"):
        download(remote, tmp_path, progress=False, timeout=5)


def test_licence_needs_acceptance(server, tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))  # not a TTY
    remote = _remote(server, licence="CC-BY-NC 4.0, research use only")
    with pytest.raises(DownloadError, match="--accept-licence"):
        download(remote, tmp_path, progress=False)
    assert server.ranges == []
    assert download(remote, tmp_path, progress=False, accept_licence=True).read_bytes() == BODY
