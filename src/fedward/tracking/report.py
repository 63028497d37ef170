"""Summaries, plots and the HTML report of a run, and a comparison across runs.

Evaluation that does not cheat: the reference codebases report the best round on the test set.
Here ``final`` is the last round and ``selected`` is the round chosen by validation balanced
accuracy; no number is ever chosen by looking at the test set.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import math
import os
from pathlib import Path
from typing import Any, Iterable

import yaml

from fedward.errors import FedwardError
from fedward.tracking.rundir import EVAL_SCOPES, RunDirectory, atomic_write_bytes, atomic_write_text, row_kind

METRIC_KEYS = ("balanced_accuracy", "accuracy", "macro_f1")
METRIC_LABELS = {"balanced_accuracy": "bal. acc.", "accuracy": "accuracy", "macro_f1": "macro-F1"}
LEARNING_CURVES_PNG = "learning_curves.png"
LOSS_CURVES_PNG = "loss_curves.png"
CONFUSION_MATRIX_PNG = "confusion_matrix.png"
AGGREGATION_WEIGHTS_PNG = "aggregation_weights.png"
ROBUST_FACTORS_PNG = "robust_factors.png"
COMPARISON_PNG = "comparison.png"
COMPARISON_CSV = "comparison.csv"
RESULTS_CSV = "results.csv"
RESULTS_COLUMNS = ("round", "scope", "model", "data", "client", "client_name", "split", "n", "metric", "value")
COMPARISON_HTML = "comparison.html"

# {round: row} for one (scope, model, data, split, client) series
Series = dict[int, dict]


# --------------------------------------------------------------------------------------------
# selecting rows


def _evaluation_rows(rows: Iterable[dict]) -> list[dict]:
    """Evaluation rows, checked for the fields the summary needs."""
    found = []
    for index, row in enumerate(rows, start=1):
        if not isinstance(row, dict) or row.get("scope") not in EVAL_SCOPES:
            continue
        for key in ("round", "split", "balanced_accuracy"):
            if key not in row:
                raise FedwardError(f"metrics row {index} (scope {row['scope']!r}) lacks {key!r}; expected the metrics.jsonl fields")
        if not isinstance(row["round"], int) or isinstance(row["round"], bool):
            raise FedwardError(f"metrics row {index}: 'round' is {row['round']!r}; expected an integer")
        found.append(row)
    return found


def _series(rows: list[dict], *, scope: str, model: str, data: str, split: str, client: int | None) -> Series:
    """Rows of one kind by round; a later duplicate of a round replaces an earlier one."""
    picked: Series = {}
    for row in rows:
        if row["scope"] == scope and row["split"] == split and row.get("client") == client and row_kind(row) == (model, data):
            picked[row["round"]] = row
    return picked


def _clients(rows: list[dict], *, scope: str, model: str, data: str) -> list[int]:
    return sorted({row["client"] for row in rows if row["scope"] == scope and row.get("client") is not None and row_kind(row) == (model, data)})


def _value(row: dict, key: str) -> float | None:
    value = row.get(key)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _metrics(row: dict) -> dict[str, float | None]:
    return {key: _value(row, key) for key in METRIC_KEYS}


def _interval(rows: list[dict]) -> dict[str, list[float]] | None:
    """95% bootstrap intervals of BA, accuracy and macro-F1 from the rows' confusion matrices (of
    their mean when several clients' rows are given); None when a row has no matrix (a run written
    before rows carried one)."""
    from fedward.metrics import bootstrap_intervals

    matrices = [row.get("confusion_matrix") for row in rows]
    if not matrices or any(not m or not sum(map(sum, m)) for m in matrices):
        return None
    return {key: [low, high] for key, (low, high) in bootstrap_intervals(matrices).items()}


def _detail(row: dict) -> dict[str, Any]:
    """What the per-hospital table shows besides BA: the test images, the AUROC and the intervals."""
    return {"n": row.get("n"), "auroc": _value(row, "auroc"), "interval": _interval([row])}


def _mean(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def _select_by_validation(val: Series, test: Series) -> int | None:
    """Round with the highest validation balanced accuracy among rounds that also have a test row.

    Ties go to the earliest round; NaN scores never win. None when no round qualifies.
    """
    best_round, best_score = None, -math.inf
    for round_ in sorted(set(val) & set(test)):
        score = _value(val[round_], "balanced_accuracy")
        if score is not None and not math.isnan(score) and score > best_score:
            best_round, best_score = round_, score
    return best_round


# --------------------------------------------------------------------------------------------
# summary


def summarize(rows: list[dict]) -> dict:
    """Final-round and validation-selected metrics of a run.

    With server rows (a global model): ``final`` is the pooled-test metrics at the last round,
    ``selected`` those at the round of highest pooled validation balanced accuracy (earliest on
    ties; None without validation rows), ``per_client_final`` the global model's balanced
    accuracy on each client's test split at the final round. Without server rows (local or
    personalised methods) the same is computed per client from each local model's own splits and
    averaged over clients, FLamby's "local i" style.
    """
    evals = _evaluation_rows(rows)
    if not evals:
        raise FedwardError("metrics hold no evaluation rows; expected rows with scope 'server' or 'client' (has the run evaluated yet?)")
    pooled_test = _series(evals, scope="server", model="global", data="pooled", split="test", client=None)
    if pooled_test:
        return _summarize_global(evals, pooled_test)
    return _summarize_local(evals)


def _summarize_global(evals: list[dict], pooled_test: Series) -> dict:
    pooled_val = _series(evals, scope="server", model="global", data="pooled", split="val", client=None)
    final_round = max(pooled_test)
    selected_round = _select_by_validation(pooled_val, pooled_test)

    per_client_final: dict[int, float | None] = {}
    per_client_detail: dict[int, dict[str, Any]] = {}
    for client in _clients(evals, scope="server", model="global", data="client"):
        row = _series(evals, scope="server", model="global", data="client", split="test", client=client).get(final_round)
        if row is not None:
            per_client_final[client] = _value(row, "balanced_accuracy")
            per_client_detail[client] = _detail(row)

    # Personalised methods that also keep a global model: each client's local model at its last round.
    per_client_local_final: dict[int, float | None] = {}
    per_client_local_detail: dict[int, dict[str, Any]] = {}
    for client in _clients(evals, scope="client", model="local", data="client"):
        test = _series(evals, scope="client", model="local", data="client", split="test", client=client)
        if test:
            per_client_local_final[client] = _value(test[max(test)], "balanced_accuracy")
            per_client_local_detail[client] = _detail(test[max(test)])

    if selected_round is None:
        chosen = "selected: none (no pooled validation rows, so no round was chosen by validation balanced accuracy)"
    else:
        chosen = (
            f"selected: pooled-test metrics at the round chosen by validation balanced accuracy "
            f"on the pooled validation split (round {selected_round})"
        )
    summary: dict[str, Any] = {
        "mode": "global",
        "final_round": final_round,
        "final": _metrics(pooled_test[final_round]),
        "final_n": pooled_test[final_round].get("n"),
        "final_interval": _interval([pooled_test[final_round]]),
        "selected_round": selected_round,
        "selected": None if selected_round is None else _metrics(pooled_test[selected_round]),
        "per_client_final": per_client_final,
        "per_client_final_detail": per_client_detail,
        "mean_client_final": _mean(per_client_final.values()),
        "selection": (
            f"final: pooled-test metrics of the global model at the final round ({final_round}); {chosen}; "
            "no number is chosen on the test set"
        ),
    }
    if per_client_local_final:
        summary["per_client_local_final"] = per_client_local_final
        summary["per_client_local_final_detail"] = per_client_local_detail
        summary["mean_client_local_final"] = _mean(per_client_local_final.values())
    # +FT: the final global model fine-tuned at each client, on that client's test split.
    per_client_finetuned_final: dict[int, float | None] = {}
    for client in _clients(evals, scope="server", model="finetuned", data="client"):
        test = _series(evals, scope="server", model="finetuned", data="client", split="test", client=client)
        if test:
            per_client_finetuned_final[client] = _value(test[max(test)], "balanced_accuracy")
    if per_client_finetuned_final:
        summary["per_client_finetuned_final"] = per_client_finetuned_final
        summary["mean_client_finetuned_final"] = _mean(per_client_finetuned_final.values())
    return summary


def _summarize_local(evals: list[dict]) -> dict:
    finals: dict[int, dict] = {}
    selections: dict[int, int | None] = {}
    selected_rows: dict[int, dict] = {}
    pooled_final: dict[int, float | None] = {}
    final_round = 0
    for client in _clients(evals, scope="client", model="local", data="client"):
        test = _series(evals, scope="client", model="local", data="client", split="test", client=client)
        if not test:
            continue
        val = _series(evals, scope="client", model="local", data="client", split="val", client=client)
        finals[client] = test[max(test)]
        final_round = max(final_round, max(test))
        selections[client] = _select_by_validation(val, test)
        if selections[client] is not None:
            selected_rows[client] = test[selections[client]]
        pooled = _series(evals, scope="client", model="local", data="pooled", split="test", client=client)
        if pooled:
            pooled_final[client] = _value(pooled[max(pooled)], "balanced_accuracy")
    if not finals:
        raise FedwardError("metrics hold no test rows of the global model or of any local model; expected rows with split 'test'")

    all_selected = len(selected_rows) == len(finals)
    final = {key: _mean(_value(row, key) for row in finals.values()) for key in METRIC_KEYS}
    selected = {key: _mean(_value(row, key) for row in selected_rows.values()) for key in METRIC_KEYS} if all_selected else None
    per_client_final = {client: _value(row, "balanced_accuracy") for client, row in finals.items()}
    if all_selected:
        chosen = (
            "selected: the same mean at each client's round chosen by validation balanced accuracy "
            "on its own validation split (per_client_selected_round)"
        )
    else:
        chosen = "selected: none (some clients have no validation rows, so no round was chosen by validation balanced accuracy)"
    summary: dict[str, Any] = {
        "mode": "local",
        "final_round": final_round,
        "final": final,
        "final_n": sum(row.get("n") or 0 for row in finals.values()),
        "final_interval": _interval(list(finals.values())),
        "selected_round": None,  # chosen per client, see per_client_selected_round
        "selected": selected,
        "per_client_selected_round": selections,
        "per_client_final": per_client_final,
        "per_client_final_detail": {client: _detail(row) for client, row in finals.items()},
        "mean_client_final": _mean(per_client_final.values()),
        "selection": (
            "no global model: final: mean over clients of each local model's metrics on its own test split "
            f"at the final round (round {final_round}); {chosen}; no number is chosen on the test set"
        ),
    }
    if pooled_final:
        summary["pooled_final"] = pooled_final
        summary["mean_pooled_final"] = _mean(pooled_final.values())
    return summary


# --------------------------------------------------------------------------------------------
# text tables


def format_table(header: list[str], body: list[list[str]], *, left_columns: int = 1) -> str:
    """Plain-text table: the first ``left_columns`` columns (text) left-aligned, the rest right-aligned."""
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]

    def render(line: list[str]) -> str:
        cells = [cell.ljust(widths[i]) if i < left_columns else cell.rjust(widths[i]) for i, cell in enumerate(line)]
        return "  ".join(cells).rstrip()

    rule = "  ".join("-" * width for width in widths)
    return "\n".join([render(header), rule, *(render(line) for line in body)])


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def format_summary_table(summary: dict, client_names: list[str] | None = None) -> str:
    """The short table printed at the end of ``fedward run``."""
    local = summary.get("mode") == "local"
    header = ["", *(METRIC_LABELS[key] for key in METRIC_KEYS)]
    final_label = f"final (round {summary['final_round']})" + (", mean of local models" if local else "")
    body = [[final_label, *(_fmt(summary["final"][key]) for key in METRIC_KEYS)]]
    if summary.get("selected") is not None:
        where = "per client" if local else f"round {summary['selected_round']}"
        body.append([f"val-selected ({where})", *(_fmt(summary["selected"][key]) for key in METRIC_KEYS)])
    else:
        body.append(["val-selected", *("-" for _ in METRIC_KEYS)])
    parts = [format_table(header, body)]
    if interval_line(summary):
        parts[0] += "\n" + interval_line(summary)

    client_header, client_body = _client_table(summary, client_names)
    if client_body:
        parts.append(format_table(client_header, client_body))
    detail_header, detail_body = client_interval_table(summary, client_names)
    if detail_body:
        parts.append(format_table(detail_header, detail_body))
    parts.append(f"selection: {summary['selection']}")
    return "\n\n".join(parts)


def _fmt_interval(interval: list[float] | None) -> str:
    return "" if interval is None else f"[{interval[0]:.3f}, {interval[1]:.3f}]"


def interval_line(summary: dict) -> str:
    """The final numbers' 95% bootstrap intervals in one line ('' without confusion matrices)."""
    from fedward.metrics import BOOTSTRAP_RESAMPLES

    interval = summary.get("final_interval")
    if not interval:
        return ""
    over = ("each client's own test images resampled on its own, the mean over clients"
            if summary.get("mode") == "local" else "the pooled test images")
    cells = ", ".join(f"{METRIC_LABELS[key]} {_fmt_interval(interval[key])}" for key in METRIC_KEYS)
    return (f"95% interval of the final numbers: {cells} (bootstrap, {BOOTSTRAP_RESAMPLES} resamples of "
            f"{over}; n = {summary.get('final_n')})")


def client_interval_table(summary: dict, client_names: list[str] | None = None) -> tuple[list[str], list[list[str]]]:
    """Each hospital's final numbers on its own test split (the global model's, or its own model's
    for personalised methods) with their test images, 95% bootstrap intervals and macro AUROC."""
    details = summary.get("per_client_local_final_detail") or summary.get("per_client_final_detail") or {}
    if not any(d.get("interval") or d.get("auroc") is not None for d in details.values()):
        return [], []  # a run written before rows carried matrices and AUROC
    model = "local" if (summary.get("mode") == "local" or summary.get("per_client_local_final_detail")) else "global"
    header = [f"client ({model} model, own test)", "n", "bal. acc. 95%", "accuracy 95%", "macro-F1 95%", "AUROC"]
    body = []
    for client in sorted(details, key=int):
        detail = details[client]
        interval = detail.get("interval") or {}
        name = client_names[int(client)] if client_names and 0 <= int(client) < len(client_names) else None
        body.append([f"{client} {name}" if name else str(client), str(detail.get("n") or "-"),
                     *(_fmt_interval(interval.get(key)) or "-" for key in METRIC_KEYS),
                     _fmt(detail.get("auroc"))])
    return header, body


def _client_table(summary: dict, client_names: list[str] | None = None) -> tuple[list[str], list[list[str]]]:
    """Per-client balanced accuracy columns present in the summary, with a mean row."""
    columns: list[tuple[str, dict]] = []
    if summary.get("mode") == "local":
        columns.append(("local BA, own test", summary.get("per_client_final") or {}))
        if summary.get("per_client_selected_round"):
            columns.append(("val-selected round", summary["per_client_selected_round"]))
        if summary.get("pooled_final"):
            columns.append(("local BA, pooled test", summary["pooled_final"]))
    else:
        if summary.get("per_client_final"):
            columns.append(("global BA, client test", summary["per_client_final"]))
        if summary.get("per_client_local_final"):
            columns.append(("local BA, client test", summary["per_client_local_final"]))
    if not columns:
        return [], []
    clients = sorted({int(c) for _, values in columns for c in values})
    header = ["client", *(name for name, _ in columns)]

    def cell(name: str, values: dict, client: int) -> str:
        value = values.get(client, values.get(str(client)))
        if name == "val-selected round":
            return "-" if value is None else str(value)
        return _fmt(value)

    def label(client: int) -> str:
        if client_names and 0 <= client < len(client_names):
            return f"{client} {client_names[client]}"
        return str(client)

    body = [[label(c), *(cell(name, values, c) for name, values in columns)] for c in clients]
    body.append(["mean", *("" if name == "val-selected round" else _fmt(_mean(values.values())) for name, values in columns)])
    return header, body


# --------------------------------------------------------------------------------------------
# figures


def _figure(width: float, height: float) -> Any:
    # The object-oriented API (no pyplot) keeps matplotlib's global backend and state untouched.
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100)


def _png_bytes(figure: Any) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", bbox_inches="tight")
    return buffer.getvalue()


def _integer_rounds(ax: Any) -> None:
    from matplotlib.ticker import MaxNLocator

    low, high = ax.get_xlim()
    if high - low < 2:  # a single round: MaxNLocator would fall back to fractional ticks
        ax.set_xticks(range(math.ceil(low), math.floor(high) + 1))
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _plot_series(ax: Any, series: Series, label: str, **style: Any) -> None:
    rounds = sorted(series)
    values = [_value(series[r], "balanced_accuracy") for r in rounds]
    ax.plot(rounds, [math.nan if v is None else v for v in values], marker="o", markersize=3, label=label, **style)


def learning_curves_figure(rows: list[dict], summary: dict, client_names: list[str] | None = None) -> Any:
    """(left) pooled test/val BA of the global model, or the clients' mean for local runs;
    (right) each client's test BA: global model on its split (solid), local model (dashed)."""

    def name(client: int) -> str:
        return client_names[client] if client_names and 0 <= client < len(client_names) else f"client {client}"

    evals = _evaluation_rows(rows)
    figure = _figure(11, 4)
    left, right = figure.subplots(1, 2)
    if summary["mode"] == "global":
        for split, style in (("test", "-"), ("val", "--")):
            series = _series(evals, scope="server", model="global", data="pooled", split=split, client=None)
            if series:
                _plot_series(left, series, f"pooled {split}", linestyle=style)
        left.set_title("Global model, pooled data")
        if summary.get("selected_round") is not None:
            left.axvline(summary["selected_round"], color="grey", linestyle=":", label="val-selected round")
    else:
        for split, style in (("test", "-"), ("val", "--")):
            per_round: dict[int, list[float]] = {}
            for row in evals:
                if row["scope"] == "client" and row["split"] == split and row_kind(row) == ("local", "client"):
                    value = _value(row, "balanced_accuracy")
                    if value is not None:
                        per_round.setdefault(row["round"], []).append(value)
            if per_round:
                rounds = sorted(per_round)
                means = [sum(per_round[r]) / len(per_round[r]) for r in rounds]
                left.plot(rounds, means, marker="o", markersize=3, linestyle=style, label=f"mean {split}")
        left.set_title("Local models, mean over clients (own splits)")

    global_clients = _clients(evals, scope="server", model="global", data="client")
    local_clients = _clients(evals, scope="client", model="local", data="client")
    for index, client in enumerate(sorted(set(global_clients) | set(local_clients))):
        colour = f"C{index % 10}"
        glob = _series(evals, scope="server", model="global", data="client", split="test", client=client)
        if glob:
            _plot_series(right, glob, f"{name(client)}, global", color=colour, linestyle="-")
        loc = _series(evals, scope="client", model="local", data="client", split="test", client=client)
        if loc:
            _plot_series(right, loc, f"{name(client)}, local", color=colour, linestyle="--")
    right.set_title("Per client, own test split")
    if not (global_clients or local_clients):
        right.text(0.5, 0.5, "no per-client rows", ha="center", va="center", transform=right.transAxes)

    for ax in (left, right):
        _integer_rounds(ax)
        ax.set_xlabel("round")
        ax.set_ylabel("balanced accuracy")
        ax.set_ylim(0.0, 1.02)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small", loc="best")
    return figure


def loss_series(rows: list[dict]) -> dict[int, dict[str, dict[int, float]]]:
    """Per client: ``train`` (the mean training loss its reply reported, by round) and ``val`` (the
    cross-entropy on its own validation split of the model it is evaluated with: the global model,
    or its own for methods without one)."""
    out: dict[int, dict[str, dict[int, float]]] = {}
    for row in rows:
        if row.get("scope") == "aggregation" and isinstance(row.get("train_loss"), list):
            for client, loss in zip(row.get("clients") or [], row["train_loss"]):
                if _is_finite(loss):
                    out.setdefault(int(client), {}).setdefault("train", {})[row["round"]] = float(loss)
    evals = _evaluation_rows(rows)
    model = "global" if any(row_kind(r) == ("global", "client") for r in evals) else "local"
    for row in evals:
        if row.get("client") is not None and row["split"] == "val" and row_kind(row) == (model, "client") \
                and _is_finite(row.get("loss")):
            out.setdefault(int(row["client"]), {}).setdefault("val", {})[row["round"]] = float(row["loss"])
    return out


def _is_finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def loss_curves_figure(found: dict[int, dict[str, dict[int, float]]], client_names: list[str] | None = None) -> Any:
    """Each hospital's training loss (solid) and validation loss (dashed) by round."""
    figure = _figure(7, 4)
    ax = figure.subplots()
    for index, client in enumerate(sorted(found)):
        label = client_names[client] if client_names and 0 <= client < len(client_names) else f"client {client}"
        for kind, style in (("train", "-"), ("val", "--")):
            series = found[client].get(kind)
            if series:
                rounds = sorted(series)
                ax.plot(rounds, [series[r] for r in rounds], linestyle=style, marker="o", markersize=3,
                        color=f"C{index % 10}", label=f"{label}, {kind}")
    _integer_rounds(ax)
    ax.set_xlabel("round")
    ax.set_ylabel("loss (train: the method's objective; val: cross-entropy)")
    ax.set_title("Loss per hospital: training (solid), own validation split (dashed)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="x-small", ncol=2, loc="best")
    return figure


def last_confusion_matrix(rows: list[dict]) -> tuple[int, list[list[float]]] | None:
    """(round, matrix) of the latest pooled-test row of the global model carrying a matrix."""
    evals = _evaluation_rows(rows)
    series = _series(evals, scope="server", model="global", data="pooled", split="test", client=None)
    for round_ in sorted(series, reverse=True):
        matrix = series[round_].get("confusion_matrix")
        if matrix:
            if not all(isinstance(line, list) and len(line) == len(matrix) for line in matrix):
                raise FedwardError(f"metrics row of round {round_}: confusion_matrix is not square; expected K lists of K counts")
            return round_, matrix
    return None


def normalise_rows(matrix: list[list[float]]) -> list[list[float]]:
    """Each row divided by its sum (recall per true class); an all-zero row stays zero."""
    normalised = []
    for line in matrix:
        total = float(sum(line))
        normalised.append([float(v) / total if total > 0 else 0.0 for v in line])
    return normalised


def confusion_matrix_figure(matrix: list[list[float]], round_: int, class_names: list[str] | None) -> Any:
    """Row-normalised confusion matrix (rows = true class)."""
    size = len(matrix)
    names = [str(n) for n in class_names] if class_names and len(class_names) == size else [str(i) for i in range(size)]
    values = normalise_rows(matrix)
    row_names = [f"{name} (n={int(sum(line))})" for name, line in zip(names, matrix)]
    side = max(4.0, 0.6 * size + 2)
    figure = _figure(side, side)
    ax = figure.subplots()
    image = ax.imshow(values, cmap="Blues", vmin=0.0, vmax=1.0)
    figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    ax.set_xticks(range(size), labels=names, rotation=45, ha="right")
    ax.set_yticks(range(size), labels=row_names)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class (test images)")
    ax.set_title(f"Pooled test, round {round_} (share of each true class; count below)")
    if size <= 12:
        for i in range(size):
            for j in range(size):
                ax.text(j, i, f"{values[i][j]:.2f}\n{int(matrix[i][j])}", ha="center", va="center", fontsize=7,
                        color="white" if values[i][j] > 0.5 else "black")
    return figure


def aggregation_weights(rows: list[dict]) -> tuple[list[int], list[int], list[list[float]]]:
    """(rounds, clients, weights[round][client]); a client absent from a round has weight 0."""
    by_round: dict[int, dict[int, float]] = {}
    for row in rows:
        if row.get("scope") != "aggregation" or not isinstance(row.get("round"), int):
            continue
        weights = row.get("weights") or []
        clients = row.get("clients") or list(range(len(weights)))
        if len(clients) != len(weights):
            raise FedwardError(f"aggregation row of round {row['round']}: {len(clients)} clients but {len(weights)} weights; expected one weight per client")
        by_round[row["round"]] = {int(c): float(w) for c, w in zip(clients, weights)}
    rounds = sorted(by_round)
    clients = sorted({c for weights in by_round.values() for c in weights})
    return rounds, clients, [[by_round[r].get(c, 0.0) for c in clients] for r in rounds]


def aggregation_weights_figure(rounds: list[int], clients: list[int], weights: list[list[float]]) -> Any:
    """Stacked bars: each client's share of the aggregate, per round."""
    figure = _figure(8, 4)
    ax = figure.subplots()
    bottoms = [0.0] * len(rounds)
    width = 0.8 if len(rounds) < 50 else 1.0
    for index, client in enumerate(clients):
        heights = [weights[r][index] for r in range(len(rounds))]
        ax.bar(rounds, heights, bottom=bottoms, width=width, label=f"client {client}", color=f"C{index % 10}")
        bottoms = [b + h for b, h in zip(bottoms, heights)]
    _integer_rounds(ax)
    ax.set_xlabel("round")
    ax.set_ylabel("aggregation weight")
    ax.set_title("Aggregation weights per client")
    ax.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.0, 0.5))
    return figure


def robust_factors(rows: list[dict]) -> dict:
    """Fed-MAS's per-client robust factors RF_k per round and the last round's class-wise
    divergences w_k (before training) normalised per client; empty when the run has none."""
    found = [r for r in rows if r.get("scope") == "aggregation" and r.get("robust_factor") is not None]
    if not found:
        return {}
    found.sort(key=lambda r: r["round"])
    clients = sorted({int(c) for r in found for c in r.get("clients", [])})
    factors = {c: [] for c in clients}
    for row in found:
        for c, value in zip(row["clients"], row["robust_factor"]):
            factors[int(c)].append((row["round"], float(value)))
    last = found[-1]
    classes = sorted(int(k.rsplit("_", 1)[1]) for k in last if k.startswith("divergence_before_"))
    share = []
    for index, _client in enumerate(last["clients"]):
        values = [last[f"divergence_before_{c}"][index] for c in classes]
        total = sum(v for v in values if v > 0)
        share.append([v / total if total > 0 else 0.0 for v in values])
    return {"factors": factors, "last_round": last["round"], "classes": classes, "clients": last["clients"], "share": share}


def divergence_spread(rows: list[dict]) -> dict[str, float]:
    """How uneven Fed-MAS's class-wise divergences w_kc (before training) are at the last round:
    the coefficient of variation (std / mean) over a client's present classes (0: flat, so RF_k =
    1 / |classes of k| whatever the data), and over the clients that have a class; each the median.
    Empty when the run logs no divergences."""
    found = [r for r in rows if r.get("scope") == "aggregation" and r.get("robust_factor") is not None]
    if not found:
        return {}
    last = max(found, key=lambda r: r["round"])
    classes = sorted(int(k.rsplit("_", 1)[1]) for k in last if k.startswith("divergence_before_"))
    table = [[float(last[f"divergence_before_{c}"][i]) for c in classes] for i in range(len(last["clients"]))]

    def cv(values: list[float]) -> float | None:
        values = [v for v in values if v > 0]
        if len(values) < 2:
            return None
        mean = sum(values) / len(values)
        return (sum((v - mean) ** 2 for v in values) / len(values)) ** 0.5 / mean

    def median(values: list[float | None]) -> float:
        kept = sorted(v for v in values if v is not None)
        return kept[len(kept) // 2] if len(kept) % 2 else 0.5 * (kept[len(kept) // 2 - 1] + kept[len(kept) // 2])

    return {"across_classes": median([cv(row) for row in table]),
            "across_clients": median([cv([row[j] for row in table]) for j in range(len(classes))]),
            "round": last["round"]}


def robust_factors_figure(found: dict, client_names: list[str] | None = None, class_names: list[str] | None = None) -> Any:
    """Left: RF_k per round (MAS weights are RF_k / sum RF). Right: w_k[c] / sum_c w_k[c] at the
    last round; a client's RF is large when its divergence is spread over few classes."""
    figure = _figure(12, 4)
    left, right = figure.subplots(1, 2, gridspec_kw={"width_ratios": [3, 2]})
    name = lambda c: client_names[c] if client_names and c < len(client_names) else f"client {c}"  # noqa: E731
    for index, (client, points) in enumerate(found["factors"].items()):
        left.plot([r for r, _ in points], [v for _, v in points], marker="o", markersize=3, color=f"C{index % 10}",
                  label=name(client))
    _integer_rounds(left)
    left.set_xlabel("round")
    left.set_ylabel("robust factor RF_k")
    left.set_title("Robust factors per client")
    left.legend(fontsize="small")
    share = found["share"]
    image = right.imshow(share, cmap="viridis", vmin=0, aspect="auto")
    labels = [class_names[c] if class_names and c < len(class_names) else str(c) for c in found["classes"]]
    right.set_xticks(range(len(labels)), labels, rotation=45, fontsize=8)
    right.set_yticks(range(len(found["clients"])), [name(int(c)) for c in found["clients"]], fontsize=8)
    right.set_title(f"w_k per class / sum (round {found['last_round']}; 0 = class absent)")
    figure.colorbar(image, ax=right)
    return figure


# --------------------------------------------------------------------------------------------
# report


def config_value(config: dict, key: str) -> Any:
    """``config[key]``, or the first value under ``key`` in a nested section; None if absent."""
    if key in config:
        return config[key]
    for value in config.values():
        if isinstance(value, dict):
            found = config_value(value, key)
            if found is not None:
                return found
    return None


def _as_run(run_dir: RunDirectory | str | os.PathLike[str]) -> RunDirectory:
    if isinstance(run_dir, RunDirectory):
        return run_dir
    return RunDirectory.open_existing(run_dir, tensorboard=False)


def write_report(run_dir: RunDirectory | str | os.PathLike[str]) -> Path:
    """Write the PNG figures and a self-contained report.html into the run directory."""
    run = _as_run(run_dir)
    config = run.read_config() if run.config_path.is_file() else {}
    rows = run.read_rows()
    summary = summarize(rows)

    figures: list[tuple[str, bytes]] = []

    def add(title: str, name: str, figure: Any) -> None:
        data = _png_bytes(figure)
        atomic_write_bytes(run.path / name, data)
        figures.append((title, data))

    add("Learning curves", LEARNING_CURVES_PNG,
        learning_curves_figure(rows, summary, config_value(config, "client_names")))
    losses = loss_series(rows)
    if losses:
        add("Loss curves", LOSS_CURVES_PNG, loss_curves_figure(losses, config_value(config, "client_names")))
    found = last_confusion_matrix(rows)
    if found is not None:
        class_names = config_value(config, "class_names")
        add("Confusion matrix", CONFUSION_MATRIX_PNG, confusion_matrix_figure(found[1], found[0], class_names))
    rounds, clients, weights = aggregation_weights(rows)
    if rounds:
        add("Aggregation weights", AGGREGATION_WEIGHTS_PNG, aggregation_weights_figure(rounds, clients, weights))
    factors = robust_factors(rows)
    if factors:
        add("Fed-MAS robust factors and class-wise divergence", ROBUST_FACTORS_PNG,
            robust_factors_figure(factors, config_value(config, "client_names"), config_value(config, "class_names")))

    write_results_csv(run.path / RESULTS_CSV, rows, config_value(config, "client_names"),
                      config_value(config, "class_names"))
    atomic_write_text(run.report_path, _render_html(run, config, summary, figures, rows))
    return run.report_path


def results_records(rows: list[dict], client_names: list[str] | None = None,
                    class_names: list[str] | None = None) -> list[dict[str, Any]]:
    """metrics.jsonl in long format, one number a line (for pandas, R or a spreadsheet): every
    evaluation row's metrics (recall per class as ``recall_<class>``) and every aggregation
    weight; ``client`` empty for the pooled data."""
    def name(client: Any) -> str:
        return client_names[client] if isinstance(client, int) and client_names and client < len(client_names) else ""

    out: list[dict[str, Any]] = []
    for row in _evaluation_rows(rows):
        model, data = row_kind(row)
        head = {"round": row["round"], "scope": row["scope"], "model": model, "data": data, "client": row.get("client"),
                "client_name": name(row.get("client")), "split": row["split"], "n": row.get("n")}
        for key in (*METRIC_KEYS, "auroc", "loss"):
            if _value(row, key) is not None:
                out.append({**head, "metric": key, "value": _value(row, key)})
        for c, value in enumerate(row.get("per_class_recall") or []):
            if value is not None:
                label = class_names[c] if class_names and c < len(class_names) else str(c)
                out.append({**head, "metric": f"recall_{label}", "value": float(value)})
    for row in rows:
        if row.get("scope") == "aggregation":
            for client, weight in zip(row.get("clients") or [], row.get("weights") or []):
                out.append({"round": row["round"], "scope": "aggregation", "model": "", "data": "", "client": client,
                            "client_name": name(client), "split": "", "n": "", "metric": "weight", "value": float(weight)})
    return out


def write_results_csv(path: Path, rows: list[dict], client_names: list[str] | None = None,
                      class_names: list[str] | None = None) -> Path:
    with io.StringIO() as text:
        writer = csv.DictWriter(text, fieldnames=list(RESULTS_COLUMNS), lineterminator="\n")
        writer.writeheader()
        writer.writerows({k: "" if v is None else v for k, v in record.items()}
                         for record in results_records(rows, client_names, class_names))
        return atomic_write_text(path, text.getvalue())


def _html_table(header: list[str], body: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(cell)}</th>" for cell in header)
    lines = "".join("<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in line) + "</tr>" for line in body)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{lines}</tbody></table>"


_STYLE = (
    "body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
    "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 10px;text-align:right}"
    "td:first-child,th:first-child{text-align:left}img{max-width:100%}"
    "pre{background:#f6f6f6;padding:1em;overflow:auto}.note{color:#555}"
)


def _when(run: RunDirectory, config: dict) -> str:
    """fedward's version, when the run started (its config.yaml was written) and when this report
    was written, and the wall time between (interruptions included)."""
    import datetime as dt

    version = config_value(config, "fedward_version") or "unknown"
    if not run.config_path.is_file():
        return f"fedward {version}"
    started = dt.datetime.fromtimestamp(run.config_path.stat().st_mtime).astimezone()
    written = dt.datetime.now().astimezone()
    seconds = max(0, int((written - started).total_seconds()))
    duration = f"{seconds // 3600} h {seconds % 3600 // 60:02d} min" if seconds >= 3600 else f"{seconds // 60} min {seconds % 60:02d} s"
    return (f"fedward {version}; started {started:%Y-%m-%d %H:%M %Z}, report written {written:%Y-%m-%d %H:%M %Z} "
            f"({duration} of wall time, interruptions included)")


def _privacy_line(config: dict, rows: list[dict]) -> list[str]:
    from fedward.algorithms.privacy import (
        describe, describe_per_sample, describe_secure, per_sample_summary, privacy_summary, secure_summary,
    )

    privacy = privacy_summary(config, len(config.get("client_names") or []))
    per_sample = per_sample_summary(config, rows)
    secure = secure_summary(config, rows)
    return ([f"<p><b>{html.escape(describe(privacy))}</b></p>"] if privacy else []) + \
        ([f"<p><b>{html.escape(describe_per_sample(per_sample))}</b></p>"] if per_sample else []) + \
        ([f"<p><b>{html.escape(describe_secure(secure))}</b></p>"] if secure else [])


def client_recall_table(rows: list[dict], summary: dict, facts: dict | None,
                        client_names: list[str] | None) -> tuple[list[str], list[list[str]]]:
    """Recall per class at each hospital on its own test split at the final round (the global
    model, or each client's own for personalised methods), with the number of test images of the
    class: how the minority classes fare where they are rare."""
    model = "local" if summary.get("mode") == "local" else "global"
    found = [r for r in _evaluation_rows(rows) if r.get("model") == model and r.get("data") == "client"
             and r.get("split") == "test" and r.get("client") is not None and r.get("per_class_recall")]
    if not found:
        return [], []
    last = max(r["round"] for r in found)
    by_client = {int(r["client"]): r["per_class_recall"] for r in found if r["round"] == last}
    size = len(next(iter(by_client.values())))
    classes = (facts or {}).get("class_names") or [str(c) for c in range(size)]
    counts = {k: c["test"] for k, c in enumerate((facts or {}).get("clients", []))}
    body = []
    for client, recall in sorted(by_client.items()):
        name = client_names[client] if client_names and client < len(client_names) else str(client)
        cells = []
        for c, value in enumerate(recall):
            n = counts[client][c] if client in counts else None
            cells.append("–" if value is None else f"{value:.2f}" + (f" ({n})" if n is not None else ""))
        body.append([name, *cells])
    return ["hospital", *classes], body


def data_section(facts: dict) -> list[str]:
    """The report's data section: images per client and split, train images per class (the
    imbalance), and the images skipped as unreadable."""
    where = f" from {facts['data_dir']}" if facts.get("data_dir") else " (built in)"
    classes = facts["class_names"]
    header = ["client", "train", "val", "test", *(f"train {c}" for c in classes)]
    body = [[c["name"], *(str(sum(c[s])) for s in ("train", "val", "test")), *(str(n) for n in c["train"])]
            for c in facts["clients"]]
    body.append(["all", *(str(sum(sum(c[s]) for c in facts["clients"])) for s in ("train", "val", "test")),
                 *(str(sum(c["train"][k] for c in facts["clients"])) for k in range(len(classes)))])
    skipped = facts.get("skipped_bad_images", 0)
    lines = [f"<p>{html.escape(str(facts['dataset']))}{html.escape(where)}, {facts['image_size']} px</p>",
             _html_table(header, body)]
    if skipped:
        shown = ", ".join(facts.get("bad_images", []))
        lines.append(f"<p class='note'>{skipped} unreadable image(s) skipped (--skip_bad_images): {html.escape(shown)}</p>")
    return lines


def _render_html(run: RunDirectory, config: dict, summary: dict, figures: list[tuple[str, bytes]],
                 rows: list[dict]) -> str:
    name = html.escape(run.name)
    method = config_value(config, "method")
    loss = config_value(config, "loss_fn_name")
    header = ["", *(METRIC_LABELS[key] for key in METRIC_KEYS)]
    body = [[f"final (round {summary['final_round']})", *(_fmt(summary["final"][k]) for k in METRIC_KEYS)]]
    if summary.get("selected") is not None:
        where = "per client" if summary["mode"] == "local" else f"round {summary['selected_round']}"
        body.append([f"val-selected ({where})", *(_fmt(summary["selected"][k]) for k in METRIC_KEYS)])
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>fedward report: {name}</title>",
        f"<style>{_STYLE}</style></head><body>",
        f"<h1>fedward run {name}</h1>",
        f"<p>method: <b>{html.escape(str(method or '-'))}</b>, loss: <b>{html.escape(str(loss or '-'))}</b>, "
        f"final round: {summary['final_round']}</p>",
        f"<p class='note'>{html.escape(_when(run, config))}</p>",
        *_privacy_line(config, rows),
        "<h2>Summary</h2>",
        _html_table(header, body),
        f"<p class='note'>{html.escape(summary['selection'])}</p>",
    ]
    if interval_line(summary):
        parts.append(f"<p class='note'>{html.escape(interval_line(summary))}</p>")
    client_header, client_body = _client_table(summary, config_value(config, "client_names"))
    if client_body:
        parts += ["<h2>Per client (balanced accuracy)</h2>", _html_table(client_header, client_body)]
    detail_header, detail_body = client_interval_table(summary, config_value(config, "client_names"))
    if detail_body:
        parts += [f"<h2>Per hospital: test images, 95% intervals and AUROC (round {summary['final_round']})</h2>",
                  _html_table(detail_header, detail_body),
                  "<p class='note'>Intervals: percentile bootstrap over the hospital's test images. AUROC: macro "
                  "one-vs-rest, computed where the scores are (at the hospital); a pooled AUROC would need every "
                  "hospital's per-image scores in one place, so fedward does not report one.</p>"]
    facts = run.read_data()
    recall_header, recall_body = client_recall_table(run.read_rows(), summary, facts, config_value(config, "client_names"))
    if recall_body:
        parts += [f"<h2>Recall per class at each hospital (own test split, round {summary['final_round']})</h2>",
                  _html_table(recall_header, recall_body),
                  "<p class='note'>In brackets: the hospital's test images of that class; – : none.</p>"]
    if facts:
        parts += ["<h2>Data</h2>", *data_section(facts)]
    for title, data in figures:
        encoded = base64.b64encode(data).decode("ascii")
        parts.append(f"<h2>{html.escape(title)}</h2><img alt='{html.escape(title)}' src='data:image/png;base64,{encoded}'>")
    config_text = yaml.safe_dump(config, sort_keys=False) if config else "(no config.yaml)"
    parts += ["<h2>Config</h2>", f"<pre>{html.escape(config_text)}</pre>", "</body></html>"]
    return "\n".join(parts) + "\n"


# --------------------------------------------------------------------------------------------
# comparison


def compare(run_dirs: list[RunDirectory | str | os.PathLike[str]], out_dir: str | os.PathLike[str] | None = None) -> str:
    """A plain-text table comparing runs; in ``out_dir`` the same as ``comparison.csv`` (numbers in
    full) and ``comparison.html`` (table, bars, a link to each run's report), and the bars as
    ``comparison.png``.

    ``out_dir`` defaults to the parent of the first run directory.
    """
    if not run_dirs:
        raise FedwardError("compare needs at least one run directory")
    runs = [_as_run(r) for r in run_dirs]
    names = [run.name for run in runs]
    if len(set(names)) < len(names):  # same folder name under different parents
        names = [str(run.path) for run in runs]
    header = ["run", "method", "loss", "final test BA", "95% interval", "val-sel. round", "val-sel. test BA",
              "mean client BA"]
    body: list[list[str]] = []
    bars: list[tuple[str, float | None, float | None, float | None]] = []
    errors: list[list[float] | None] = []
    records: list[dict[str, Any]] = []
    any_local = False
    for name, run in zip(names, runs):
        config = run.read_config()
        summary = summarize(run.read_rows())
        local = summary["mode"] == "local"
        any_local |= local
        selected_ba = summary["selected"]["balanced_accuracy"] if summary.get("selected") else None
        if local:
            selected_round = "per client" if summary.get("selected") else "-"
        else:
            selected_round = "-" if summary["selected_round"] is None else str(summary["selected_round"])
        final_ba = summary["final"]["balanced_accuracy"]
        interval = (summary.get("final_interval") or {}).get("balanced_accuracy")
        body.append([
            name,
            str(config_value(config, "method") or "-"),
            str(config_value(config, "loss_fn_name") or "-"),
            _fmt(final_ba) + ("*" if local else ""),
            _fmt_interval(interval).replace(" ", "") or "-",
            selected_round,
            _fmt(selected_ba),
            _fmt(summary["mean_client_final"]),
        ])
        bars.append((name, final_ba, selected_ba, summary["mean_client_final"]))
        errors.append(interval)
        records.append({"run": name, "path": str(run.path.resolve()), "method": body[-1][1], "loss": body[-1][2],
                        "final_test_ba": final_ba, "final_test_ba_low": interval[0] if interval else None,
                        "final_test_ba_high": interval[1] if interval else None,
                        "model": "local (mean over clients)" if local else "global",
                        "val_selected_round": selected_round, "val_selected_test_ba": selected_ba,
                        "mean_client_ba": summary["mean_client_final"]})
    note = "* no global model: mean over clients of each local model's balanced accuracy on its own test split"
    table = format_table(header, body, left_columns=3)
    if any_local:
        table += "\n" + note

    target = Path(out_dir) if out_dir is not None else runs[0].path.resolve().parent
    target.mkdir(parents=True, exist_ok=True)
    png = _png_bytes(comparison_figure(bars, errors))
    atomic_write_bytes(target / COMPARISON_PNG, png)
    with io.StringIO() as text:
        writer = csv.DictWriter(text, fieldnames=list(records[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows({k: "" if v is None else v for k, v in record.items()} for record in records)
        atomic_write_text(target / COMPARISON_CSV, text.getvalue())
    links = [f"<li><a href='{html.escape(os.path.relpath(r['path'], target.resolve()))}/report.html'>"
             f"{html.escape(r['run'])}</a></li>" for r in records]
    encoded = base64.b64encode(png).decode("ascii")
    atomic_write_text(target / COMPARISON_HTML, "\n".join([
        f"<!doctype html><html><head><meta charset='utf-8'><title>fedward comparison</title><style>{_STYLE}</style>"
        "</head><body><h1>fedward: comparison of runs</h1>", _html_table(header, body),
        f"<p class='note'>{html.escape(note)}</p>" if any_local else "",
        f"<img alt='comparison' src='data:image/png;base64,{encoded}'>", "<h2>Reports</h2><ul>", *links,
        "</ul></body></html>"]) + "\n")
    return table


def comparison_figure(bars: list[tuple[str, float | None, float | None, float | None]],
                      intervals: list[list[float] | None] | None = None) -> Any:
    """Grouped bars per run: final test BA (with its 95% bootstrap interval where known),
    val-selected test BA, mean client BA."""
    figure = _figure(max(6.0, 1.6 * len(bars) + 2), 4)
    ax = figure.subplots()
    labels = ("final test BA", "val-selected test BA", "mean client BA")
    width = 0.8 / len(labels)
    for k, label in enumerate(labels):
        xs = [i + (k - 1) * width for i in range(len(bars))]
        heights = [0.0 if bar[k + 1] is None else bar[k + 1] for bar in bars]
        yerr = None
        if k == 0 and intervals and any(intervals):
            # clamped: a percentile interval need not contain its estimate
            yerr = [[max(0.0, h - i[0]) if i else 0.0 for h, i in zip(heights, intervals)],
                    [max(0.0, i[1] - h) if i else 0.0 for h, i in zip(heights, intervals)]]
        ax.bar(xs, heights, width=width, label=label, color=f"C{k}", yerr=yerr, capsize=3 if yerr else 0)
    ax.set_xticks(range(len(bars)), labels=[bar[0] for bar in bars], rotation=20, ha="right")
    ax.set_ylabel("balanced accuracy")
    ax.set_title("Test balanced accuracy per run (pooled test; local runs: mean over clients)")
    ax.set_ylim(0.0, 1.0)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize="small")
    return figure
