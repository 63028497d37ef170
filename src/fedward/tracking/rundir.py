"""The run directory: resolved config, metrics.jsonl, TensorBoard events, checkpoints, results.

Layout::

    config.yaml        resolved config, written once at the start
    data.json          the data the run trained on: clients, class counts, skipped images
    metrics.jsonl      one JSON object per line; appended after every round
    tensorboard/       the same numbers as TensorBoard scalars (step = round)
    checkpoints/       last.pt: the last completed round's checkpoint, written atomically
    final_model.pt     (or final_model_client_<k>.pt for personalised methods)
    results.json       the summary of the run
    report.html        self-contained report (see ``fedward.tracking.report``)
    .lock              the pid of the process writing the run (see ``RunDirectory.writing``)
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Iterator

import yaml

from fedward.errors import FedwardError

CONFIG_NAME = "config.yaml"
DATA_NAME = "data.json"
METRICS_NAME = "metrics.jsonl"
CHECKPOINTS_NAME = "checkpoints"
TENSORBOARD_NAME = "tensorboard"
FINAL_MODEL_NAME = "final_model.pt"
RESULTS_NAME = "results.json"
REPORT_NAME = "report.html"
LOCK_NAME = ".lock"

EVAL_SCOPES = ("server", "client")
# Keys every evaluation row must carry (the metrics.jsonl contract).
EVAL_ROW_KEYS = ("round", "scope", "client", "split", "balanced_accuracy", "accuracy", "macro_f1", "loss", "n")
# Identifying fields: never written to TensorBoard as scalars.
_ID_KEYS = frozenset({"round", "scope", "client", "clients", "model", "data", "split", "n"})
# Read once at import (os.umask can only be read by setting it, which is not thread-safe later).
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def new_run_folder(base: str | os.PathLike[str]) -> Path:
    """A new, empty folder ``base`` (or ``base-2``, ``base-3``, ...), created here: ``mkdir`` is
    atomic, so two runs started in the same second never get the same default name."""
    base = Path(base)
    _make_folder(base.parent)
    for index in range(1, 10_000):
        path = base if index == 1 else base.with_name(f"{base.name}-{index}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
        except OSError as err:
            raise FedwardError(f"cannot create run directory {path}: {err.strerror}; choose another --output") from None
    raise FedwardError(f"no free run folder name next to {base}; give --output")


def _make_folder(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise FedwardError(f"cannot create run directory {path}: {err.strerror}; choose another --output") from None


# --------------------------------------------------------------------------------------------
# atomic writes


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` via a temporary file in the same folder and ``os.replace``.

    A crash leaves either the old file or the new one, never half of one.
    """
    target = Path(path)
    with _atomic_target(target) as handle:
        handle.write(data)
    return target


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """``atomic_write_bytes`` for UTF-8 text."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_torch_save(obj: Any, path: str | os.PathLike[str]) -> Path:
    """``torch.save`` that never leaves a half-written file (temporary file + ``os.replace``).

    The zip records' CRC-32 is skipped: it is most of the CPU cost of saving (1.8 s vs 0.4 s for a
    570 MB checkpoint on our 2-core machine), and the atomic replace already rules out torn files.
    """
    import torch

    target = Path(path)
    save_config = _torch_save_config()
    previous = save_config.compute_crc32 if save_config is not None else None
    try:
        if save_config is not None:
            save_config.compute_crc32 = False
        with _atomic_target(target) as handle:
            torch.save(obj, handle)
    finally:
        if save_config is not None:
            save_config.compute_crc32 = previous
    return target


def _torch_save_config() -> Any:
    """torch's serialization save settings (torch >= 2.6), or None on older versions."""
    try:
        from torch.utils.serialization import config
    except ImportError:
        return None
    return config.save if hasattr(config.save, "compute_crc32") else None


@contextlib.contextmanager
def _atomic_target(target: Path) -> Iterator[BinaryIO]:
    """A binary handle on a temporary file beside ``target`` that replaces it on success."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    tmp_path = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), 0o666 & ~_UMASK)  # mkstemp makes 0600; give the usual mode
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():  # only after a failure
            tmp_path.unlink()


# --------------------------------------------------------------------------------------------
# conversion helpers


def _json_default(value: Any) -> Any:
    """Turn numpy/torch scalars and arrays (and paths) into plain JSON values."""
    if hasattr(value, "tolist"):  # numpy arrays and scalars, torch tensors
        return value.tolist()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"metrics value of type {type(value).__name__} is not JSON-serialisable")


def _plain(value: Any) -> Any:
    """Config values as plain YAML types: tuples -> lists, paths -> str, numpy -> python."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        return value.tolist()
    return value


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _parse_jsonl(text: str, source: Path, *, drop_partial_tail: bool) -> list[dict]:
    """Parse JSON lines; a bad line raises FedwardError naming ``source`` and the line number.

    With ``drop_partial_tail`` a last line without its newline that does not parse is dropped:
    that is what a crash in the middle of a write leaves behind.
    """
    rows: list[dict] = []
    lines = text.split("\n")
    for index, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            is_tail = index == len(lines)  # no newline after it
            if drop_partial_tail and is_tail:
                break
            raise FedwardError(f"{source} line {index}: not valid JSON ({err.msg}); expected one JSON object per line") from None
        if not isinstance(row, dict):
            raise FedwardError(f"{source} line {index}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
    return rows


def check_row(row: Any) -> None:
    """Raise ValueError when a row breaks the metrics.jsonl contract (a bug in the caller)."""
    if not isinstance(row, dict):
        raise ValueError(f"metrics row must be a dict, got {type(row).__name__}")
    if "scope" not in row or "round" not in row:
        raise ValueError(f"metrics row needs 'round' and 'scope', got keys {sorted(row)}")
    if row["scope"] in EVAL_SCOPES:
        missing = [key for key in EVAL_ROW_KEYS if key not in row]
        if missing:
            raise ValueError(f"evaluation row (scope {row['scope']!r}, round {row['round']}) lacks {missing}")
    elif row["scope"] == "aggregation" and not isinstance(row.get("weights"), list):
        raise ValueError(f"aggregation row (round {row['round']}) needs a 'weights' list")


# --------------------------------------------------------------------------------------------
# TensorBoard tags


def row_kind(row: dict) -> tuple[str, str]:
    """(model, data) of an evaluation row, filling the defaults when the row omits them.

    Server rows evaluate the global model, client rows a local one; rows without a client are
    on the pooled data, rows with one on that client's own split.
    """
    model = row.get("model") or ("global" if row.get("scope") == "server" else "local")
    data = row.get("data") or ("pooled" if row.get("client") is None else "client")
    return str(model), str(data)


def _label(index: Any, names: list[str] | None, kind: str) -> str:
    """``client_3_MSK`` / ``MEL``: the name after the index (clients keep their order in TensorBoard's
    list); the index alone when the run names none."""
    if names and isinstance(index, int) and 0 <= index < len(names):
        return f"{kind}_{index}_{names[index]}" if kind == "client" else str(names[index])
    return f"{kind}_{index}"


def tensorboard_scalars(row: dict, client_names: list[str] | None = None,
                        class_names: list[str] | None = None) -> list[tuple[str, float]]:
    """The (tag, value) pairs one metrics row becomes in TensorBoard; hospitals and classes by name
    when the run's config names them."""
    scope = row.get("scope")
    if scope == "aggregation":
        return _aggregation_scalars(row, client_names)
    if scope == "participation":  # 1: its reply was used; 0: dropped or rejected (the reason is in metrics.jsonl)
        return [(f"participation/{_label(row['client'], client_names, 'client')}", float(row.get("status") == "ok"))]
    if scope in EVAL_SCOPES:
        model, data = row_kind(row)
        client = row.get("client")
        if client is None:
            prefix = f"{scope}/{data}"
        else:
            prefix = f"{_label(client, client_names, 'client')}/{model}" + ("" if data == "client" else f"_on_{data}")
        prefix = f"{prefix}/{row.get('split')}"
    else:
        prefix = str(scope) if row.get("client") is None else f"{scope}/{_label(row['client'], client_names, 'client')}"
    scalars = [(f"{prefix}/{key}", float(value)) for key, value in row.items() if key not in _ID_KEYS and _is_number(value)]
    recall = row.get("per_class_recall")
    if isinstance(recall, list):
        scalars += [(f"{prefix}/recall/{_label(i, class_names, 'class')}", float(v)) for i, v in enumerate(recall)
                    if _is_number(v)]
    return scalars


def _aggregation_scalars(row: dict, client_names: list[str] | None) -> list[tuple[str, float]]:
    weights = row.get("weights") or []
    clients = row.get("clients") or list(range(len(weights)))
    scalars: list[tuple[str, float]] = []
    for key, value in row.items():
        if key in _ID_KEYS:
            continue
        if _is_number(value):
            scalars.append((f"aggregation/{key}", float(value)))
        elif isinstance(value, list) and len(value) == len(clients):
            name = "weight" if key == "weights" else key
            scalars += [(f"aggregation/{name}/{_label(c, client_names, 'client')}", float(v))
                        for c, v in zip(clients, value) if _is_number(v)]
    return scalars


# --------------------------------------------------------------------------------------------
# the run directory


class RunDirectory:
    """One run's folder. Build it with ``create`` (new run) or ``open_existing`` (resume, report)."""

    def __init__(self, path: str | os.PathLike[str], *, tensorboard: bool = True) -> None:
        self._path = Path(path)
        self._tensorboard = tensorboard
        self._writer: Any = None  # SummaryWriter, created on first log_rows
        self._purge_step: int | None = None
        self._tensorboard_names: tuple[list[str] | None, list[str] | None] | None = None

    # ---- construction

    @classmethod
    def create(cls, path: str | os.PathLike[str], *, overwrite: bool = False, tensorboard: bool = True) -> RunDirectory:
        """A new run directory at ``path``.

        An existing non-empty folder is refused unless ``overwrite``; even then only a folder that
        looks like a fedward run (has config.yaml or metrics.jsonl) is emptied, so a mistyped
        ``--output`` can never wipe an unrelated folder.
        """
        root = Path(path)
        if root.exists() and not root.is_dir():
            raise FedwardError(f"run directory {root} exists and is a file; expected a folder or a new path")
        if root.is_dir() and any(root.iterdir()):
            if not overwrite:
                raise FedwardError(f"run directory {root} exists and is not empty; choose another --output, or continue it with --resume")
            if not ((root / CONFIG_NAME).exists() or (root / METRICS_NAME).exists()):
                raise FedwardError(
                    f"run directory {root} is not empty and holds no {CONFIG_NAME} or {METRICS_NAME}; "
                    "refusing to overwrite a folder that is not a fedward run"
                )
            with cls(root).writing():  # never empty a run another process is writing
                _empty_folder(root)
        _make_folder(root)
        run = cls(root, tensorboard=tensorboard)
        run.checkpoints_dir.mkdir(exist_ok=True)
        return run

    @classmethod
    def open_existing(cls, path: str | os.PathLike[str], *, tensorboard: bool = True) -> RunDirectory:
        """An existing run directory (for --resume or report); it must hold config.yaml."""
        root = Path(path)
        if not root.is_dir():
            raise FedwardError(f"run directory {root} does not exist; expected a folder written by 'fedward run'")
        if not (root / CONFIG_NAME).is_file():
            raise FedwardError(f"run directory {root} has no {CONFIG_NAME}; expected a folder written by 'fedward run'")
        return cls(root, tensorboard=tensorboard)

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        """Hold the run's lock while this process writes it: a second writer (a ``--resume`` of a
        run that is still going) is refused, naming the holder's pid. The lock is the kernel's
        (``flock``), so a killed writer never leaves a stale one."""
        import fcntl

        path = self._path / LOCK_NAME
        handle = path.open("a+")
        try:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read().strip() or "unknown"
                raise FedwardError(f"run directory {self._path} is being written by another process (pid {holder}); "
                                   "wait for it to finish or stop it first") from None
            handle.seek(0)
            handle.truncate()
            handle.write(f"{os.getpid()}\n")
            handle.flush()
            yield
        finally:
            handle.close()

    # ---- paths

    @property
    def path(self) -> Path:
        return self._path

    @property
    def name(self) -> str:
        return self._path.resolve().name

    @property
    def config_path(self) -> Path:
        return self._path / CONFIG_NAME

    @property
    def metrics_path(self) -> Path:
        return self._path / METRICS_NAME

    @property
    def checkpoints_dir(self) -> Path:
        return self._path / CHECKPOINTS_NAME

    @property
    def tensorboard_dir(self) -> Path:
        return self._path / TENSORBOARD_NAME

    @property
    def final_model_path(self) -> Path:
        return self._path / FINAL_MODEL_NAME

    @property
    def results_path(self) -> Path:
        return self._path / RESULTS_NAME

    @property
    def report_path(self) -> Path:
        return self._path / REPORT_NAME

    def client_model_path(self, client: int) -> Path:
        """Final model of one client, for personalised methods."""
        return self._path / f"final_model_client_{client}.pt"

    # ---- config

    def write_config(self, config: dict) -> None:
        """Write the resolved config as YAML, keys in the given order."""
        if not isinstance(config, dict):
            raise TypeError(f"config must be a dict, got {type(config).__name__}")
        text = yaml.safe_dump(_plain(config), sort_keys=False, default_flow_style=False, allow_unicode=True)
        atomic_write_text(self.config_path, text)
        self._tensorboard_names = None

    def read_config(self) -> dict:
        """The config written by ``write_config``."""
        if not self.config_path.is_file():
            raise FedwardError(f"{self.config_path} does not exist; expected the run's resolved config")
        try:
            config = yaml.safe_load(self.config_path.read_text(encoding="utf-8"))
        except yaml.YAMLError as err:
            raise FedwardError(f"{self.config_path}: not valid YAML ({err.__class__.__name__})") from None
        if config is None:
            return {}
        if not isinstance(config, dict):
            raise FedwardError(f"{self.config_path}: expected a mapping at the top level, got {type(config).__name__}")
        return config

    # ---- data facts

    @property
    def data_path(self) -> Path:
        return self._path / DATA_NAME

    def write_data(self, facts: dict) -> None:
        atomic_write_text(self.data_path, json.dumps(facts, default=_json_default, indent=1) + "\n")

    def read_data(self) -> dict | None:
        """The facts ``write_data`` wrote, or None for a run without them (a deployment's server
        never sees the data)."""
        if not self.data_path.is_file():
            return None
        try:
            return json.loads(self.data_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise FedwardError(f"{self.data_path}: not valid JSON ({err})") from None

    # ---- metrics

    def log_rows(self, rows: Iterable[dict]) -> None:
        """Append rows to metrics.jsonl and write them as TensorBoard scalars (step = round)."""
        lines = [json.dumps(row, default=_json_default) for row in rows]
        # Checked and logged as read back, so numpy/torch values are plain numbers by then.
        rows = [json.loads(line) for line in lines]
        for row in rows:
            check_row(row)
        if not rows:
            return
        text = "".join(line + "\n" for line in lines)
        with open(self.metrics_path, "a", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
        if self._tensorboard:
            self._write_scalars(rows)

    def read_rows(self) -> list[dict]:
        """Every row of metrics.jsonl (empty when there is none yet)."""
        if not self.metrics_path.is_file():
            return []
        return _parse_jsonl(self.metrics_path.read_text(encoding="utf-8"), self.metrics_path, drop_partial_tail=False)

    def truncate_rounds_after(self, round_: int) -> None:
        """Keep only rows with round <= ``round_`` (resume from that round's checkpoint).

        A half-written last line (a crash during a write) is dropped too. TensorBoard events
        from later rounds are hidden by the next writer's ``purge_step``.
        """
        if self.metrics_path.is_file():
            text = self.metrics_path.read_text(encoding="utf-8")
            rows = _parse_jsonl(text, self.metrics_path, drop_partial_tail=True)
            kept = [row for row in rows if not _is_number(row.get("round")) or row["round"] <= round_]
            atomic_write_text(self.metrics_path, "".join(json.dumps(row) + "\n" for row in kept))
        self._close_writer()
        self._purge_step = round_ + 1

    # ---- results

    def write_results(self, summary: dict) -> None:
        """Write the run's summary to results.json."""
        atomic_write_text(self.results_path, json.dumps(summary, indent=2, default=_json_default) + "\n")

    def read_results(self) -> dict:
        """The summary written by ``write_results``."""
        if not self.results_path.is_file():
            raise FedwardError(f"{self.results_path} does not exist; the run has not finished")
        try:
            return json.loads(self.results_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise FedwardError(f"{self.results_path}: not valid JSON ({err.msg})") from None

    # ---- lifetime

    def close(self) -> None:
        """Flush and close the TensorBoard writer (metrics.jsonl is flushed on every write)."""
        self._close_writer()

    def __enter__(self) -> RunDirectory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"RunDirectory({str(self._path)!r})"

    # ---- internals

    def write_hparams(self, settings: dict, metrics: dict[str, float | None]) -> None:
        """The run's settings and its final numbers in TensorBoard's HPARAMS tab, so that runs can be
        filtered and compared by setting (settings that are not a number, a flag or a string are
        left out, as TensorBoard takes no others)."""
        if not self._tensorboard:
            return
        from torch.utils.tensorboard.summary import hparams

        plain = {k: v for k, v in settings.items() if isinstance(v, (bool, int, float, str))}
        numbers = {f"hparam/{k}": float(v) for k, v in metrics.items() if _is_number(v)}
        writer = self._get_writer()
        for summary in hparams(plain, numbers):
            writer.file_writer.add_summary(summary)
        for tag, value in numbers.items():
            writer.add_scalar(tag, value)
        writer.flush()

    def _names(self) -> tuple[list[str] | None, list[str] | None]:
        """The run's hospital and class names (config.yaml), read once."""
        if self._tensorboard_names is None:
            config = self.read_config() if self.config_path.is_file() else {}
            self._tensorboard_names = (config.get("client_names"), config.get("class_names"))
        return self._tensorboard_names

    def _write_scalars(self, rows: list[dict]) -> None:
        writer = self._get_writer()
        client_names, class_names = self._names()
        for row in rows:
            step = row.get("round")
            if not _is_number(step):
                continue
            for tag, value in tensorboard_scalars(row, client_names, class_names):
                writer.add_scalar(tag, value, global_step=int(step))
        writer.flush()

    def _get_writer(self) -> Any:
        if self._writer is None:
            # Imported here: tensorboard costs ~2 s to import and most callers never log.
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard_dir.mkdir(parents=True, exist_ok=True)
            self._writer = SummaryWriter(log_dir=str(self.tensorboard_dir), purge_step=self._purge_step)
            self._purge_step = None
        return self._writer

    def _close_writer(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _empty_folder(root: Path) -> None:
    """Remove everything inside ``root`` (not ``root`` itself)."""
    for entry in root.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
