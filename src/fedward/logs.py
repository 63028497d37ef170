"""fedward's log lines: timestamped, on stderr whatever the terminal (tables stay on stdout), and
in the run directory's ``log.txt`` while a run writes it.

Python's ``logging`` under the ``fedward`` logger: ``--quiet`` shows warnings only, ``--verbose``
adds a line per client and round. Lines go through ``tqdm.write`` so that they never break a
progress bar on a terminal, and look ``sys.stderr`` up when written (a caller that swaps it, as
pytest does, gets them).
"""

from __future__ import annotations

import logging
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from tqdm.auto import tqdm

LOGGER = logging.getLogger("fedward")
FORMAT = "%(asctime)s fedward: %(message)s"
DATE_FORMAT = "%H:%M:%S"


class _StderrHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
            sys.stderr.flush()
        except Exception:  # a closed stream must not kill a run
            self.handleError(record)


def _stderr_handler() -> _StderrHandler:
    for handler in LOGGER.handlers:
        if isinstance(handler, _StderrHandler):
            return handler
    handler = _StderrHandler(logging.INFO)
    handler.setFormatter(logging.Formatter(FORMAT, DATE_FORMAT))
    LOGGER.addHandler(handler)
    LOGGER.setLevel(logging.DEBUG)  # each handler filters: stderr by verbosity, log.txt keeps everything
    LOGGER.propagate = False
    return handler


def _configure() -> None:
    _stderr_handler()


def set_verbosity(*, quiet: bool = False, verbose: bool = False) -> None:
    """Warnings only (quiet), every line (verbose), or the usual lines, on stderr."""
    _stderr_handler().setLevel(logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO)


def info(message: str) -> None:
    _configure()
    LOGGER.info(message)


def detail(message: str) -> None:
    """A line shown with --verbose only (one per client and round)."""
    _configure()
    LOGGER.debug(message)


def warning(message: str) -> None:
    _configure()
    LOGGER.warning(message)


@contextmanager
def run_log(path: Path) -> Iterator[None]:
    """Append every line logged inside the block to ``path`` (the run's log.txt), at every level."""
    _configure()
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    handler.setLevel(logging.DEBUG)  # every line, whatever --quiet or --verbose say for stderr
    LOGGER.addHandler(handler)
    try:
        yield
    finally:
        LOGGER.removeHandler(handler)
        handler.close()
