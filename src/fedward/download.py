"""Resumable, verified HTTP downloads of single files (checkpoints, data sets).

A file is written to ``<folder>/<name>.part`` and moved to ``<folder>/<name>`` with an atomic
``os.replace`` only after it verifies, so the final name never holds a half-written or wrong file.

Resume: a ``.part`` left by a dropped transfer is kept. The next call asks the server for the rest
with ``Range: bytes=N-``; a ``206`` answer is appended, a ``200`` (server without range support)
starts again from zero, and a ``416`` (nothing left to send) means the part is checked as it is.

Verification: the expected size when known, and published checksum *prefixes* (the MoCo README gives
the first 8 hex digits of the md5, torchvision file names carry the first 8 hex digits of the
sha256): the file's digest must start with the prefix. A file that fails is renamed ``<name>.corrupt``
(kept, never deleted) and a :class:`DownloadError` says what was expected and what was found.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from tqdm.auto import tqdm

from fedward.errors import FedwardError

Opener = Callable[..., Any]  # urllib.request.urlopen or a stand-in with the same call signature

# Errors that mean "the network let us down" while connecting or reading, not a bug or a full disk.
_NETWORK_ERRORS = (OSError, http.client.HTTPException)


# Downloads off: `--offline` sets it for the run and the processes it starts; tests set it too.
OFFLINE_ENV = "FEDWARD_OFFLINE"


def offline() -> bool:
    """Whether weight files must not be downloaded (``FEDWARD_OFFLINE`` set to anything but 0)."""
    return os.environ.get(OFFLINE_ENV, "") not in ("", "0")


def go_offline(flag: bool) -> None:
    """``--offline``: turn downloads off for this process and the processes it starts."""
    if flag:
        os.environ[OFFLINE_ENV] = "1"


class DownloadError(FedwardError):
    """A download failed or the downloaded file does not match its published size or checksum."""


@dataclass(frozen=True)
class RemoteFile:
    """One file to download: where it comes from, the name it gets, and how to check it."""

    name: str
    url: str
    md5_prefix: str | None = None
    sha256_prefix: str | None = None
    size: int | None = None
    licence: str | None = None


def file_digest(path: str | Path, algorithm: str, chunk_size: int = 1 << 20) -> str:
    """Hex digest of a file, read in chunks so multi-GB checkpoints never sit in memory."""
    # usedforsecurity=False: md5 here is an integrity check, and FIPS builds refuse it otherwise.
    digest = hashlib.new(algorithm, usedforsecurity=False)
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def verify(path: str | Path, remote: RemoteFile) -> None:
    """Raise :class:`DownloadError` unless ``path`` has the size and checksum prefixes of ``remote``."""
    path = Path(path)
    actual_size = path.stat().st_size
    if remote.size is not None and actual_size != remote.size:
        # A wrong size already proves the file wrong; hashing gigabytes would add nothing.
        raise DownloadError(f"{path}: {actual_size} bytes, expected {remote.size} bytes (from {remote.url})")
    for algorithm, prefix in (("md5", remote.md5_prefix), ("sha256", remote.sha256_prefix)):
        if not prefix:
            continue
        actual = file_digest(path, algorithm)
        if not actual.startswith(prefix.lower()):
            raise DownloadError(f"{path}: {algorithm} is {actual}, expected it to start with {prefix.lower()} "
                                f"(from {remote.url})")


def download(remote: RemoteFile, folder: str | Path, *, progress: bool = True, accept_licence: bool = False,
             timeout: float = 60.0, chunk_size: int = 1 << 20, opener: Opener | None = None) -> Path:
    """Download ``remote`` into ``folder`` (resuming a ``.part`` left by an earlier try) and verify it.

    Returns the path of the verified file. A file already there that verifies costs no network access.
    """
    folder = Path(folder)
    target = folder / remote.name
    if target.exists():
        try:
            verify(target, remote)
        except DownloadError as err:
            # The file may be the user's own; replacing it silently could destroy work.
            raise DownloadError(f"{err}; it was already there before this download: move it away or delete "
                                f"it to download {remote.name} again") from None
        _say(f"{target} is already there")
        return target

    _check_licence(remote, accept_licence)
    folder.mkdir(parents=True, exist_ok=True)
    part = target.with_name(remote.name + ".part")
    _fetch(remote, part, progress=progress, timeout=timeout, chunk_size=chunk_size,
           opener=opener or urllib.request.urlopen)
    try:
        verify(part, remote)
    except DownloadError as err:
        corrupt = target.with_name(remote.name + ".corrupt")
        # Kept for inspection rather than deleted; an older .corrupt of the same file is replaced.
        os.replace(part, corrupt)
        raise DownloadError(f"{err}; kept as {corrupt}; rerun to download it again") from None
    os.replace(part, target)  # atomic: the final name only ever holds a verified file
    return target


def _say(message: str) -> None:
    print(f"fedward: {message}", file=sys.stderr, flush=True)


def _check_licence(remote: RemoteFile, accepted: bool) -> None:
    """Show the licence note and require acceptance: a flag, or a yes typed at a terminal."""
    if remote.licence is None:
        return
    _say(f"{remote.name} licence: {remote.licence}")
    if accepted:
        return
    if sys.stdin is None or not sys.stdin.isatty():
        raise DownloadError(f"{remote.name} is under a licence ({remote.licence}); "
                            "pass --accept-licence to accept it and download")
    try:
        answer = input("Accept? [y/N] ")
    except EOFError:
        answer = ""
    if answer.strip().lower() not in ("y", "yes"):
        raise DownloadError(f"licence of {remote.name} not accepted; nothing downloaded")


def _network_error(remote: RemoteFile, part: Path, saved: int, reason: object) -> DownloadError:
    return DownloadError(f"download of {remote.url} failed ({reason}); rerun the same command to resume "
                         f"from the {saved} bytes already saved in {part}")


def _range_start(content_range: str | None) -> int | None:
    """First byte of a ``Content-Range: bytes START-END/TOTAL`` header, or None if it cannot be read."""
    match = re.match(r"\s*bytes\s+(\d+)-", content_range or "")
    return int(match.group(1)) if match else None


def _fetch(remote: RemoteFile, part: Path, *, progress: bool, timeout: float, chunk_size: int,
           opener: Opener) -> None:
    """Bring ``part`` up to the whole file as the server sends it; verification is the caller's job."""
    offset = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(remote.url, headers={"User-Agent": "fedward"})
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    try:
        response = opener(request, timeout=timeout)
    except urllib.error.HTTPError as err:
        err.close()
        if err.code == 416 and offset:
            return  # nothing after byte `offset`: the part is complete (or too long, which verify reports)
        raise DownloadError(f"download of {remote.url} failed: HTTP {err.code} {err.reason}") from None
    except _NETWORK_ERRORS as err:
        raise _network_error(remote, part, offset, getattr(err, "reason", err)) from None

    with response:
        if offset and getattr(response, "status", 200) == 206:
            start = _range_start(response.headers.get("Content-Range"))
            if start != offset:
                raise DownloadError(f"download of {remote.url}: asked for bytes from {offset}, the server sent "
                                    f"them from {start}; delete {part} and rerun")
            mode = "ab"
        else:
            if offset:
                _say(f"{remote.url} does not support resuming; downloading {remote.name} again from zero")
            offset, mode = 0, "wb"
        length_header = response.headers.get("Content-Length")
        length = int(length_header) if length_header and length_header.isdigit() else None
        total = offset + length if length is not None else remote.size
        received = 0
        with open(part, mode) as out, tqdm(total=total, initial=offset, unit="B", unit_scale=True,
                                           unit_divisor=1024, desc=remote.name, disable=not progress,
                                           leave=False) as bar:
            while True:
                try:
                    chunk = response.read(chunk_size)
                except _NETWORK_ERRORS as err:
                    out.flush()
                    raise _network_error(remote, part, offset + received, err) from None
                if not chunk:
                    break
                out.write(chunk)
                received += len(chunk)
                bar.update(len(chunk))
        # http.client returns b"" when the peer closes early instead of raising, so count the bytes.
        if length is not None and received < length:
            raise _network_error(remote, part, offset + received,
                                 f"connection closed after {received} of {length} bytes")
