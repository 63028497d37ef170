"""Running a paper table's grid of runs and writing the table (see the package docstring)."""

from __future__ import annotations

import csv
import multiprocessing
import os
import re
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from fedward.errors import ConfigError, FedwardError
from fedward.metrics import mean_and_std, mean_interval

METRICS = ("accuracy", "macro_f1", "balanced_accuracy")
# What a row reads from its run's final-round rows: (scope, model) of the per-client test rows.
SOURCES = {"local": ("client", "local"), "global": ("server", "global"), "finetuned": ("server", "finetuned")}
# How a run executes, not what it computes; a finished run is reused whatever they were. (The torch
# thread count does change a CPU run's last bits: a resumed run keeps its own.)
EXECUTION = ("threads", "keep_checkpoint")
# Where a run lives is not what it computed: a finished run's records moved to another folder (a
# table's records committed in one session, reused in the next) are the same run.
LOCATION = ("output",)


@dataclass(frozen=True)
class RunSpec:
    """One run of the grid: a label (its folder name is derived from it) and its settings."""

    label: str
    settings: dict[str, Any]

    @property
    def folder(self) -> str:
        return re.sub(r"[^a-z0-9]+", "-", self.label.lower()).strip("-")


@dataclass(frozen=True)
class Row:
    """One row of the table: ``run``'s ``source`` models (local, global or finetuned)."""

    label: str
    run: RunSpec
    source: str = "local"
    group: str = ""


@dataclass
class Table:
    name: str
    title: Callable[[dict[str, Any]], str]  # (command options) -> the table's title
    rows: list[Row]
    base: Callable[[dict[str, Any]], dict[str, Any]]  # (command options) -> the settings every run shares
    client_names: list[str]  # column names by client id; empty: the runs' own (config.yaml)
    paper: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # label -> metric -> per client + mean
    paper_note: str = ""
    comparisons: list[tuple[str, str]] = field(default_factory=list)  # (row, row | "best baseline")
    notes: list[str] = field(default_factory=list)
    # Per-client sections: (metric, heading); each client's model on its own test split.
    metrics: tuple[tuple[str, str], ...] = (("accuracy", "ACC"), ("macro_f1", "MF1"))
    # A section with the global model's balanced accuracy on the pooled test set, at the final
    # round and at the round chosen on the pooled validation split (rows reading a global model).
    pooled: bool = False
    # What the paired comparisons compare: a per-client metric's Average, or POOLED_FINAL.
    headline: str = "accuracy"
    # The options of `fedward reproduce` that ``title`` and ``base`` read (any other given is an error).
    accepts: tuple[str, ...] = ("data_dir", "rounds", "image_size")
    # More Markdown after the tables, from the runs: (folders by (run label, seed), rows, seeds) -> lines.
    extra: Callable[[dict[tuple[str, int], Path], list[Row], list[int]], list[str]] | None = None

    @property
    def runs(self) -> list[RunSpec]:
        seen: dict[str, RunSpec] = {}
        for row in self.rows:
            seen.setdefault(row.run.label, row.run)
        return list(seen.values())


TABLES: dict[str, Table] = {}


def register_table(table: Table) -> Table:
    if table.name in TABLES:
        raise ValueError(f"table {table.name!r} is registered twice")
    TABLES[table.name] = table
    return table


def run_settings(table: Table, spec: RunSpec, seed: int, options: dict[str, Any], out: Path) -> dict[str, Any]:
    from fedward.config import applicable_settings

    # A table reads only a finished run's metrics; its checkpoint (555 MB for ResNet-18 with Adam and
    # six clients) would fill the disk over a table's 100+ runs.
    values = {**table.base(options), **spec.settings, "seed": seed, "data_seed": seed, "progress": False,
              "keep_checkpoint": False, "output": str(out / spec.folder / f"seed{seed}")}
    return applicable_settings(values)


def _same_settings(saved: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """The settings that differ; a setting the saved config predates counts at its default."""
    from fedward.config import completed_settings

    saved = completed_settings(saved)
    return sorted(k for k in set(saved) | set(wanted) if k not in EXECUTION + LOCATION and saved.get(k) != wanted.get(k))


def ensure_run(values: dict[str, Any], log: Callable[[str], None]) -> Path:
    """The finished run directory for ``values``: reused, resumed or trained now."""
    from fedward.algorithms import get_algorithm
    from fedward.config import build_config
    from fedward.engine.simulation import prepare, run
    from fedward.tracking import RunDirectory

    cfg = build_config(values)
    folder = Path(cfg.output)
    wanted = {**cfg.to_dict(), **get_algorithm(cfg.method).resolved_settings(cfg)}
    if (folder / "config.yaml").is_file():
        run_dir = RunDirectory.open_existing(folder)
        differ = _same_settings(run_dir.read_config(), wanted)
        if differ:
            raise ConfigError(f"{folder} holds a run with other settings ({', '.join(differ)}); give another --out "
                              f"or delete it")
        if run_dir.results_path.is_file():
            return folder
        if (run_dir.checkpoints_dir / "last.pt").is_file():
            log(f"resuming {folder}")
            saved = run_dir.read_config()
            run(build_config({**values, **{k: saved[k] for k in EXECUTION if k in saved}}), run_dir, resume=True)
            return folder
    run_dir, data = prepare(cfg, overwrite=True)
    run(cfg, run_dir, data=data)
    return folder


POOLED_FINAL = "pooled_final"
BOUND = "bound"  # the group of rows that bound the comparison (local, centralized): never the "best baseline"


def pooled_results(folder: Path) -> dict[str, float]:
    """The global model's pooled-test balanced accuracy at the final and the validation-selected round."""
    import json

    summary = json.loads((folder / "results.json").read_text())
    if summary.get("mode") != "global":
        raise FedwardError(f"{folder}: a {summary.get('mode')} run has no pooled global-model results")
    return {"final": float(summary["final"]["balanced_accuracy"]),
            "selected": float(summary["selected"]["balanced_accuracy"])}


def client_results(folder: Path, source: str) -> dict[int, dict[str, float]]:
    """Each client's metrics on its own test split at the run's final round, from ``source`` models."""
    from fedward.tracking import RunDirectory

    scope, model = SOURCES[source]
    rows = RunDirectory.open_existing(folder).read_rows()
    wanted = [r for r in rows if (r.get("scope"), r.get("model"), r.get("data"), r.get("split")) ==
              (scope, model, "client", "test")]
    if not wanted:
        raise FedwardError(f"{folder}: no {model} test rows per client (scope {scope}) to read")
    final = max(r["round"] for r in wanted)
    return {int(r["client"]): {m: float(r[m]) for m in (*METRICS, "n")} for r in wanted if r["round"] == final}


def _ensure_run_in_worker(values: dict[str, Any]) -> Path:
    return ensure_run(values, lambda line: print(f"fedward: {line}", file=sys.stderr, flush=True))


def _exit_with_parent(parent: int) -> None:
    """A job process's initializer: exit when the ``fedward reproduce`` process that started it is
    gone (killed, not interrupted), so no orphan goes on writing a run directory a restarted
    command would resume too. The run it was training resumes from its last checkpoint."""
    import threading

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="exit-with-parent").start()


def reproduce(table: Table, *, out: Path, seeds: list[int], options: dict[str, Any], only: list[str] | None = None,
              jobs: int = 1, log: Callable[[str], None] | None = None) -> dict[str, Path]:
    """Run (or reuse) every run of the table for every seed, then write the table; returns the files.
    ``jobs`` > 1 trains that many runs at once, in separate processes with the cores shared out
    (``threads`` = cores // jobs each): at the built-in table's batch 8 one run cannot keep two
    cores busy."""
    log = log or (lambda line: print(f"fedward: {line}", file=sys.stderr, flush=True))
    rows = [r for r in table.rows if only is None or r.label in only or r.run.label in only]
    if only is not None:
        unknown = sorted(set(only) - {r.label for r in table.rows} - {r.run.label for r in table.rows})
        if unknown:
            raise ConfigError(f"--only {', '.join(unknown)}: not rows of {table.name}; its rows: "
                              f"{', '.join(r.label for r in table.rows)}")
    runs = list({r.run.label: r.run for r in rows}.values())
    out.mkdir(parents=True, exist_ok=True)
    total, done = len(runs) * len(seeds), 0
    # Every configuration is checked before anything trains, so a bad one fails at once. Seed by seed,
    # so that an interrupted command has every row for its first seeds.
    grid = [(spec, seed, run_settings(table, spec, seed, options, out)) for seed in seeds for spec in runs]
    from fedward.config import build_config

    if jobs > 1:
        from fedward.engine.setup import cpu_cores

        threads = max(1, cpu_cores() // jobs)
        grid = [(spec, seed, {**values, "threads": threads}) for spec, seed, values in grid]
    for _, _, values in grid:
        build_config(values)
    folders: dict[tuple[str, int], Path] = {}
    start = time.perf_counter()
    if jobs > 1:
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=jobs, mp_context=context, initializer=_exit_with_parent,
                                 initargs=(os.getpid(),)) as pool:
            futures = {pool.submit(_ensure_run_in_worker, values): (spec, seed) for spec, seed, values in grid}
            for future in as_completed(futures):
                if future.exception() is not None:
                    pool.shutdown(cancel_futures=True)  # stop at the first failure, not after the whole grid
                spec, seed = futures[future]
                folders[spec.label, seed] = future.result()
                done += 1
                log(f"[{done}/{total}] {spec.label}, seed {seed} done after {time.perf_counter() - start:.0f} s "
                    f"({folders[spec.label, seed]})")
    else:
        for spec, seed, values in grid:
            run_start = time.perf_counter()
            folders[spec.label, seed] = ensure_run(values, log)
            done += 1
            log(f"[{done}/{total}] {spec.label}, seed {seed}: {time.perf_counter() - run_start:.0f} s "
                f"({folders[spec.label, seed]})")
    results = {(row.label, seed): client_results(folders[row.run.label, seed], row.source)
               for row in rows for seed in seeds}
    pooled = ({(row.label, seed): pooled_results(folders[row.run.label, seed])
               for row in rows if row.source == "global" for seed in seeds} if table.pooled else {})
    names = table.client_names or _run_client_names(next(iter(folders.values())))
    extra = table.extra(folders, rows, seeds) if table.extra else []
    return write_table(table, rows, seeds, results, out, options, pooled, names, extra)


def _cell(values: list[float]) -> str:
    mean, std = mean_and_std(values)
    return f"{mean:.3f} ± {std:.3f}" if len(values) > 1 else f"{mean:.3f}"  # one seed: no spread to show


def _interval(low: float, high: float, n: int, sign: str = "") -> str:
    return f"[{low:{sign}.3f}, {high:{sign}.3f}]" if n > 1 else "–"


def average_over_clients(per_client: dict[int, dict[str, float]], metric: str) -> float:
    """The paper's "Average": the unweighted mean over clients."""
    return sum(c[metric] for c in per_client.values()) / len(per_client)


def _run_client_names(folder: Path) -> list[str]:
    from fedward.tracking import RunDirectory

    return list(RunDirectory.open_existing(folder).read_config().get("client_names") or [])


def write_table(table: Table, rows: list[Row], seeds: list[int], results: dict, out: Path,
                options: dict[str, Any], pooled: dict | None = None,
                client_names: list[str] | None = None, extra: list[str] | None = None) -> dict[str, Path]:
    """``results``: (row, seed) -> client -> metrics; ``pooled``: (row, seed) -> final/selected
    pooled balanced accuracy, for the rows that have it; ``client_names`` by client id (default:
    the table's)."""
    pooled = pooled or {}
    known = client_names if client_names is not None else table.client_names
    clients = sorted({k for per in results.values() for k in per})
    names = [known[k] if k < len(known) else str(k) for k in clients]
    long_rows, summary_rows = [], []
    for row in rows:
        for seed in seeds:
            for k, metrics in sorted(results[row.label, seed].items()):
                long_rows.append({"row": row.label, "method": row.run.settings.get("method", ""), "seed": seed,
                                  "client": k, **metrics, **{f"pooled_{key}": value for key, value in
                                                             pooled.get((row.label, seed), {}).items()}})
    lines = [f"# {table.title(options)}", "",
             f"{len(seeds)} seed(s) ({', '.join(map(str, seeds))}); each cell: mean ± std over seeds; "
             f"Average: the unweighted mean over clients (the paper's), with the 95% t-interval of its mean"
             + (" (one seed: no spread and no interval yet)." if len(seeds) < 2 else "."), ""]

    def summary_row(label: str, metric: str, client: str, values: list[float]) -> None:
        mean, low, high = mean_interval(values)
        summary_rows.append({"row": label, "metric": metric, "client": client, "mean": mean,
                             "std": mean_and_std(values)[1], "ci_low": low, "ci_high": high, "seeds": len(values)})

    if table.pooled:
        lines += ["## Pooled test set: the global model's balanced accuracy", "",
                  "| method | final round | 95% interval | validation-selected round | 95% interval |",
                  "| --- | --- | --- | --- | --- |"]
        for row in rows:
            if (row.label, seeds[0]) not in pooled:
                continue
            cells = []
            for key in ("final", "selected"):
                values = [pooled[row.label, seed][key] for seed in seeds]
                _, low, high = mean_interval(values)
                cells += [_cell(values), _interval(low, high, len(values))]
                summary_row(row.label, f"pooled_balanced_accuracy_{key}", "pooled", values)
            lines.append(f"| {row.label} | " + " | ".join(cells) + " |")
        lines.append("")
    for metric, heading in table.metrics:
        lines += [f"## {heading}" + (", each client's model on its own test split" if table.pooled else ""), "",
                  "| method | " + " | ".join(names) + " | Average | 95% interval |",
                  "| --- | " + " | ".join("---" for _ in names) + " | --- | --- |"]
        for row in rows:
            per_seed = [results[row.label, seed] for seed in seeds]
            cells = [_cell([p[k][metric] for p in per_seed]) for k in clients]
            averages = [average_over_clients(p, metric) for p in per_seed]
            _, low, high = mean_interval(averages)
            lines.append(f"| {row.label} | " + " | ".join(cells) + f" | {_cell(averages)} | "
                         f"{_interval(low, high, len(averages))} |")
            for k, name in zip(clients, names):
                summary_row(row.label, metric, name, [p[k][metric] for p in per_seed])
            summary_row(row.label, metric, "Average", averages)
        for label, numbers in table.paper.items():
            if metric in numbers:
                lines.append(f"| {label} | " + " | ".join(f"{v:.3f}" for v in numbers[metric][:-1])
                             + f" | {numbers[metric][-1]:.3f} | |")
        lines.append("")
    if table.paper_note:
        lines += [table.paper_note, ""]
    comparisons = paired_comparisons(table, rows, seeds, results, pooled)
    if comparisons:
        what = ("pooled test balanced accuracy, final round" if table.headline == POOLED_FINAL else
                f"Average {dict(table.metrics).get(table.headline, table.headline)}")
        lines += [f"## Paired comparisons ({what}, same seeds)", "",
                  "| comparison | mean difference | 95% interval | seeds |", "| --- | --- | --- | --- |"]
        lines += [f"| {c['comparison']} | {c['mean']:+.3f} | {_interval(c['ci_low'], c['ci_high'], c['seeds'], '+')} | "
                  f"{c['seeds']} |" for c in comparisons]
        lines.append("")
    lines += extra or []
    lines += [f"- {note}" for note in table.notes]
    files = {"markdown": out / "table.md", "csv": out / "table.csv", "runs": out / "runs.csv"}
    files["markdown"].write_text("\n".join(lines).rstrip() + "\n")
    _write_csv(files["csv"], summary_rows)
    _write_csv(files["runs"], long_rows)
    return files


def paired_comparisons(table: Table, rows: list[Row], seeds: list[int], results: dict,
                       pooled: dict | None = None) -> list[dict[str, Any]]:
    """Per-seed differences of the table's headline quantity between two rows, for each of the
    table's pairs; "best baseline" is the other row (not of the first row's group) with the
    highest mean. Rows without the quantity (no pooled results) take no part."""
    pooled = pooled or {}

    def headline(label: str) -> list[float] | None:
        if table.headline == POOLED_FINAL:
            return [pooled[label, s]["final"] for s in seeds] if (label, seeds[0]) in pooled else None
        return [average_over_clients(results[label, s], table.headline) for s in seeds]

    values = {r.label: headline(r.label) for r in rows}
    labels = {r.label: r for r in rows if values[r.label] is not None}
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for first, second in table.comparisons:
        if first not in labels:
            continue
        best = second == "best baseline"
        if best:
            others = [r for r in labels.values() if r.group not in (labels[first].group, BOUND)]
            if not others:
                continue
            second = max(others, key=lambda r: mean_and_std(values[r.label])[0]).label
        if second not in labels:
            continue
        if (first, second) not in out:  # the best baseline may be a row the table already compares with
            differences = [a - b for a, b in zip(values[first], values[second])]
            mean, low, high = mean_interval(differences)
            out[first, second] = {"comparison": f"{first} − {second}", "mean": mean, "ci_low": low, "ci_high": high,
                                  "seeds": len(seeds)}
        if best:
            out[first, second]["comparison"] += " (the best baseline)"
    return list(out.values())


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    with path.open("w", newline="") as handle:
        if not rows:
            return
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
