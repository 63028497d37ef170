"""Summary (final vs validation-selected round), HTML report and run comparison."""

from __future__ import annotations

import base64
import re
from pathlib import Path

import pytest

from fedward.errors import FedwardError
from fedward.tracking import RunDirectory, compare, format_summary_table, summarize, write_report
from fedward.tracking.report import aggregation_weights, normalise_rows, robust_factors

# Pooled BA per round: validation peaks at round 2, test at round 3, so a best-on-test pick differs.
POOLED_VAL_BA = {1: 0.50, 2: 0.70, 3: 0.65}
POOLED_TEST_BA = {1: 0.40, 2: 0.55, 3: 0.60}
CLIENT_TEST_BA = {0: {1: 0.30, 2: 0.45, 3: 0.50}, 1: {1: 0.50, 2: 0.60, 3: 0.70}}


def row(round_: int, scope: str, client: int | None, model: str, data: str, split: str, ba: float, **extra: object) -> dict:
    """An evaluation row; accuracy and macro-F1 are offsets of BA so they can be checked by hand."""
    return {"round": round_, "scope": scope, "client": client, "model": model, "data": data, "split": split,
            "balanced_accuracy": ba, "accuracy": ba + 0.2, "macro_f1": ba - 0.1, "loss": 2.0 - ba, "n": 20, **extra}


def global_run_rows(rounds: int = 3) -> list[dict]:
    rows: list[dict] = []
    for r in range(1, rounds + 1):
        cm = [[8, 2, 0], [1, 3, 0], [0, 0, 0]]  # class 2 absent from the test set
        rows.append(row(r, "server", None, "global", "pooled", "test", POOLED_TEST_BA[r], confusion_matrix=cm,
                        per_class_recall=[0.8, 0.75, None]))
        rows.append(row(r, "server", None, "global", "pooled", "val", POOLED_VAL_BA[r]))
        for client in (0, 1):
            rows.append(row(r, "server", client, "global", "client", "test", CLIENT_TEST_BA[client][r]))
            rows.append(row(r, "server", client, "global", "client", "val", CLIENT_TEST_BA[client][r] + 0.05))
        rows.append({"round": r, "scope": "aggregation", "clients": [0, 1], "weights": [0.25 + 0.1 * r, 0.75 - 0.1 * r],
                     "num_examples": [10, 30]})
    return rows


# local method: test/val BA per client and round
LOCAL_TEST = {0: {1: 0.3, 2: 0.5, 3: 0.4}, 1: {1: 0.6, 2: 0.7, 3: 0.9}}
LOCAL_VAL = {0: {1: 0.6, 2: 0.8, 3: 0.7}, 1: {1: 0.5, 2: 0.4, 3: 0.6}}


def local_run_rows() -> list[dict]:
    rows = []
    for r in (1, 2, 3):
        for client in (0, 1):
            rows.append(row(r, "client", client, "local", "client", "test", LOCAL_TEST[client][r]))
            rows.append(row(r, "client", client, "local", "client", "val", LOCAL_VAL[client][r]))
            rows.append(row(r, "client", client, "local", "pooled", "test", 0.1 + 0.1 * client + 0.05 * r))
    return rows


def make_run(path: Path, rows: list[dict], config: dict) -> RunDirectory:
    run = RunDirectory.create(path, tensorboard=False)
    run.write_config(config)
    run.log_rows(rows)
    return run


# ---- summarize


def test_summary_of_global_run_uses_final_and_validation_selected_rounds() -> None:
    summary = summarize(global_run_rows())
    assert summary["mode"] == "global"
    assert summary["final_round"] == 3
    assert summary["final"] == pytest.approx({"balanced_accuracy": 0.60, "accuracy": 0.80, "macro_f1": 0.50})
    assert summary["selected_round"] == 2  # argmax of pooled val BA, not of test BA (round 3)
    assert summary["selected"] == pytest.approx({"balanced_accuracy": 0.55, "accuracy": 0.75, "macro_f1": 0.45})
    assert summary["per_client_final"] == pytest.approx({0: 0.50, 1: 0.70})
    assert summary["mean_client_final"] == pytest.approx(0.60)
    assert "final round" in summary["selection"] and "validation balanced accuracy" in summary["selection"]


def test_validation_ties_go_to_the_earliest_round() -> None:
    rows = [row(r, "server", None, "global", "pooled", split, ba)
            for r, val_ba, test_ba in ((1, 0.6, 0.1), (2, 0.5, 0.2), (3, 0.6, 0.3))
            for split, ba in (("val", val_ba), ("test", test_ba))]
    summary = summarize(rows)
    assert summary["selected_round"] == 1
    assert summary["selected"]["balanced_accuracy"] == pytest.approx(0.1)


def test_without_validation_rows_nothing_is_selected() -> None:
    rows = [r for r in global_run_rows() if r.get("split") != "val"]
    summary = summarize(rows)
    assert summary["selected_round"] is None and summary["selected"] is None
    assert "no pooled validation rows" in summary["selection"]
    assert summary["final"]["balanced_accuracy"] == pytest.approx(0.60)


def test_summary_of_local_run_averages_each_clients_own_test() -> None:
    summary = summarize(local_run_rows())
    assert summary["mode"] == "local"
    assert summary["final_round"] == 3
    # final: mean over clients of round-3 own-test BA = (0.4 + 0.9) / 2
    assert summary["final"]["balanced_accuracy"] == pytest.approx(0.65)
    assert summary["final"]["accuracy"] == pytest.approx(0.85)
    # client 0's val peaks at round 2 (test 0.5), client 1's at round 3 (test 0.9)
    assert summary["per_client_selected_round"] == {0: 2, 1: 3}
    assert summary["selected"]["balanced_accuracy"] == pytest.approx(0.70)
    assert summary["per_client_final"] == pytest.approx({0: 0.4, 1: 0.9})
    assert summary["mean_client_final"] == pytest.approx(0.65)
    assert summary["pooled_final"] == pytest.approx({0: 0.25, 1: 0.35})
    assert summary["selected_round"] is None


def test_summarize_without_evaluation_rows_is_an_error() -> None:
    with pytest.raises(FedwardError, match="no evaluation rows"):
        summarize([{"round": 1, "scope": "aggregation", "weights": [1.0]}])
    with pytest.raises(FedwardError, match="row 1.*balanced_accuracy"):
        summarize([{"round": 1, "scope": "server", "split": "test"}])


def test_format_summary_table_shows_final_selected_and_clients() -> None:
    text = format_summary_table(summarize(global_run_rows()))
    lines = text.splitlines()
    final_line = next(line for line in lines if line.startswith("final (round 3)"))
    assert final_line.split()[-3:] == ["0.6000", "0.8000", "0.5000"]
    selected_line = next(line for line in lines if line.startswith("val-selected (round 2)"))
    assert selected_line.split()[-3:] == ["0.5500", "0.7500", "0.4500"]
    assert next(line for line in lines if line.startswith("mean")).split()[-1] == "0.6000"
    assert "selection:" in text

    local_text = format_summary_table(summarize(local_run_rows()))
    client0 = next(line for line in local_text.splitlines() if line.startswith("0 "))
    assert client0.split() == ["0", "0.4000", "2", "0.2500"]


# ---- figures and report


def test_normalise_rows_divides_by_true_class_count_and_keeps_empty_rows_zero() -> None:
    assert normalise_rows([[8, 2, 0], [1, 3, 0], [0, 0, 0]]) == [[0.8, 0.2, 0.0], [0.25, 0.75, 0.0], [0.0, 0.0, 0.0]]


def test_aggregation_weights_fill_absent_clients_with_zero() -> None:
    rows = [{"round": 1, "scope": "aggregation", "clients": [0, 2], "weights": [0.4, 0.6]},
            {"round": 2, "scope": "aggregation", "clients": [1, 2], "weights": [0.5, 0.5]}]
    assert aggregation_weights(rows) == ([1, 2], [0, 1, 2], [[0.4, 0.0, 0.6], [0.0, 0.5, 0.5]])


def _embedded_pngs(html_text: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", html_text)]


def test_write_report_embeds_all_figures(tmp_path: Path) -> None:
    run = make_run(tmp_path / "fedavg", global_run_rows(),
                   {"method": "fedavg", "loss_fn_name": "BSM", "class_names": ["MEL", "NV", "BCC"]})
    report = write_report(run.path)
    assert report == run.report_path
    text = report.read_text()
    images = _embedded_pngs(text)
    assert len(images) == 4  # learning curves, loss curves (val), confusion matrix, aggregation weights
    assert all(image.startswith(b"\x89PNG") for image in images)
    for name in ("learning_curves.png", "loss_curves.png", "confusion_matrix.png", "aggregation_weights.png"):
        assert (run.path / name).read_bytes() in images
    assert "0.6000" in text and "0.5500" in text and "BSM" in text


def test_write_report_for_a_single_round_without_aggregation(tmp_path: Path) -> None:
    rows = [r for r in global_run_rows(rounds=1) if r["scope"] != "aggregation"]
    run = make_run(tmp_path / "one_round", rows, {"method": "fedavg"})
    text = write_report(run).read_text()
    assert len(_embedded_pngs(text)) == 3  # learning curves, loss curves, confusion matrix
    assert not (run.path / "aggregation_weights.png").exists()
    assert "final (round 1)" in text


def test_write_report_for_a_local_run(tmp_path: Path) -> None:
    run = make_run(tmp_path / "local", local_run_rows(), {"method": "local"})
    text = write_report(run).read_text()
    assert len(_embedded_pngs(text)) == 2  # learning and loss curves: no pooled matrix, no aggregation
    assert "0.6500" in text and "no global model" in text


# ---- compare


def test_compare_lists_each_run_and_writes_bars(tmp_path: Path) -> None:
    make_run(tmp_path / "runs" / "fedavg_ce", global_run_rows(), {"method": "fedavg", "loss_fn_name": "CE"})
    make_run(tmp_path / "runs" / "local_bsm", local_run_rows(), {"method": "local", "loss_fn_name": "BSM"})
    table = compare([tmp_path / "runs" / "fedavg_ce", tmp_path / "runs" / "local_bsm"])
    lines = table.splitlines()
    fedavg = next(line for line in lines if line.startswith("fedavg_ce"))
    interval = summarize(global_run_rows())["final_interval"]["balanced_accuracy"]  # from the pooled matrix
    assert fedavg.split() == ["fedavg_ce", "fedavg", "CE", "0.6000", f"[{interval[0]:.3f},{interval[1]:.3f}]", "2",
                              "0.5500", "0.6000"]
    local = next(line for line in lines if line.startswith("local_bsm"))  # rows without matrices: no interval
    assert local.split() == ["local_bsm", "local", "BSM", "0.6500*", "-", "per", "client", "0.7000", "0.6500"]
    # columns are aligned: every value starts where its header does
    header = lines[0]
    assert fedavg.index("CE") == header.index("loss") == local.index("BSM")
    png = tmp_path / "runs" / "comparison.png"
    assert png.read_bytes().startswith(b"\x89PNG")
    import csv

    with (tmp_path / "runs" / "comparison.csv").open() as handle:
        records = list(csv.DictReader(handle))
    assert [r["run"] for r in records] == ["fedavg_ce", "local_bsm"]
    assert float(records[0]["final_test_ba"]) == pytest.approx(0.6) and records[0]["val_selected_round"] == "2"
    assert float(records[0]["final_test_ba_low"]) == pytest.approx(interval[0]) and records[1]["final_test_ba_low"] == ""
    assert records[1]["model"] == "local (mean over clients)" and float(records[1]["mean_client_ba"]) == pytest.approx(0.65)
    page = (tmp_path / "runs" / "comparison.html").read_text()
    assert "<a href='fedavg_ce/report.html'>fedavg_ce</a>" in page and "<td>0.6500*</td>" in page

    out = tmp_path / "elsewhere"
    compare([tmp_path / "runs" / "fedavg_ce"], out_dir=out)
    assert (out / "comparison.png").is_file()


def test_compare_needs_runs(tmp_path: Path) -> None:
    with pytest.raises(FedwardError, match="at least one"):
        compare([])
    with pytest.raises(FedwardError, match="nope"):
        compare([tmp_path / "nope"])


def test_robust_factors_collects_rf_per_round_and_normalises_last_divergence(tmp_path: Path) -> None:
    rows = [
        {"round": 2, "scope": "aggregation", "clients": [0, 1], "weights": [0.4, 0.6], "robust_factor": [0.2, 0.3],
         "divergence_before_0": [1.0, 0.0], "divergence_before_1": [3.0, 2.0]},
        {"round": 1, "scope": "aggregation", "clients": [0, 1], "weights": [0.5, 0.5], "robust_factor": [0.25, 0.25],
         "divergence_before_0": [1.0, 1.0], "divergence_before_1": [1.0, 1.0]},
        {"round": 1, "scope": "aggregation", "clients": [0], "weights": [1.0]},  # a FedAvg row: no RF
    ]
    found = robust_factors(rows)
    assert found["factors"] == {0: [(1, 0.25), (2, 0.2)], 1: [(1, 0.25), (2, 0.3)]}
    assert found["last_round"] == 2 and found["classes"] == [0, 1]
    assert found["share"] == [[0.25, 0.75], [0.0, 1.0]]  # client 1 lacks class 0
    assert robust_factors([rows[2]]) == {}
    run = make_run(tmp_path / "fedmas", global_run_rows() + rows[:2], {"method": "fedmas", "client_names": ["A", "B"]})
    images = _embedded_pngs(write_report(run.path).read_text())
    assert (run.path / "robust_factors.png").read_bytes() in images


def test_divergence_spread_by_hand() -> None:
    from fedward.tracking.report import divergence_spread

    rows = [{"round": 3, "scope": "aggregation", "clients": [0, 1], "robust_factor": [0.5, 0.5],
             # client 0: w = [1, 3] (class 2 absent), client 1: w = [2, 2, 4]
             "divergence_before_0": [1.0, 2.0], "divergence_before_1": [3.0, 2.0], "divergence_before_2": [0.0, 4.0]}]
    spread = divergence_spread(rows)
    # across classes: client 0 CV([1, 3]) = 1/2; client 1 CV([2, 2, 4]) = (sqrt(8/9)) / (8/3) = 0.3536; median of two
    assert spread["across_classes"] == pytest.approx((0.5 + (8 / 9) ** 0.5 / (8 / 3)) / 2)
    # across clients: class 0 CV([1, 2]) = 1/3, class 1 CV([3, 2]) = 1/5, class 2 one client only: median of two
    assert spread["across_clients"] == pytest.approx((1 / 3 + 1 / 5) / 2)
    assert divergence_spread([{"round": 1, "scope": "aggregation"}]) == {}


def test_the_report_shows_recall_per_class_at_each_hospital_with_its_test_counts(tmp_path: Path) -> None:
    from fedward.tracking.report import client_recall_table

    rows = global_run_rows(2)
    for r in (1, 2):  # the hospitals' own test rows, with recall per class
        rows += [row(r, "server", 0, "global", "client", "test", 0.5, per_class_recall=[0.1 * r, 1.0, None]),
                 row(r, "server", 1, "global", "client", "test", 0.6, per_class_recall=[0.5, None, 0.25])]
    facts = {"class_names": ["a", "b", "c"], "clients": [{"name": "H0", "test": [10, 3, 0]},
                                                         {"name": "H1", "test": [4, 0, 8]}]}
    header, body = client_recall_table(rows, summarize(rows), facts, ["H0", "H1"])
    assert header == ["hospital", "a", "b", "c"]
    assert body == [["H0", "0.20 (10)", "1.00 (3)", "–"], ["H1", "0.50 (4)", "–", "0.25 (8)"]]  # the final round
    run = make_run(tmp_path / "run", rows, {"method": "fedavg", "client_names": ["H0", "H1"]})
    run.write_data({**facts, "dataset": "toy", "data_dir": None, "image_size": 8, "skipped_bad_images": 0,
                    "clients": [{**c, "train": [5, 5, 5], "val": [1, 1, 1]} for c in facts["clients"]]})
    text = write_report(run).read_text()
    assert "Recall per class at each hospital (own test split, round 2)" in text and "<td>0.25 (8)</td>" in text
    assert "<td>all</td><td>30</td><td>6</td><td>25</td>" in text  # the data section's totals
    assert re.search(r"fedward unknown; started \d{4}-\d\d-\d\d \d\d:\d\d .*, report written .* of wall time", text)


def test_intervals_and_auroc_come_from_the_rows_matrices() -> None:
    from fedward.metrics import bootstrap_intervals

    rows = global_run_rows()
    for r in rows:
        if r.get("split") == "test" and r.get("client") is not None:
            r["confusion_matrix"] = [[6, 2], [1, 3]] if r["client"] == 0 else [[9, 0], [0, 1]]
            r["auroc"] = 0.25 + r["client"]
            r["n"] = 12 if r["client"] == 0 else 10
    summary = summarize(rows)
    pooled = bootstrap_intervals([[[8, 2, 0], [1, 3, 0], [0, 0, 0]]])
    assert summary["final_interval"] == {key: list(value) for key, value in pooled.items()}
    assert summary["final_n"] == 20
    detail = summary["per_client_final_detail"]
    assert detail[1]["interval"]["accuracy"] == [1.0, 1.0] and detail[1]["auroc"] == 1.25
    assert detail[0]["interval"]["accuracy"][0] < 9 / 12 < detail[0]["interval"]["accuracy"][1]
    text = format_summary_table(summary, ["A", "B"])
    line = next(line for line in text.splitlines() if line.startswith("1 B") and "[" in line)
    assert line.split()[2:] == ["10", "[1.000,", "1.000]", "[1.000,", "1.000]", "[1.000,", "1.000]", "1.2500"]
    assert "95% interval of the final numbers: bal. acc. [" in text

    # personalised, no global model: the interval of the mean over clients, each resampled on its own
    local = local_run_rows()
    for r in local:
        if r.get("split") == "test" and r.get("data") == "client":
            r["confusion_matrix"] = [[3, 1], [0, 4]] if r["client"] == 0 else [[2, 2], [2, 2]]
    stratified = bootstrap_intervals([[[3, 1], [0, 4]], [[2, 2], [2, 2]]])
    assert summarize(local)["final_interval"]["macro_f1"] == list(stratified["macro_f1"])
    assert summarize(local_run_rows())["final_interval"] is None  # rows without matrices: no interval


def test_results_csv_is_the_metrics_in_long_format(tmp_path: Path) -> None:
    import csv

    rows = global_run_rows(rounds=2)
    rows[0]["auroc"] = None  # unknown: no line
    run = make_run(tmp_path / "run", rows, {"method": "fedavg", "client_names": ["BCN", "MSK"],
                                            "class_names": ["MEL", "NV", "BCC"]})
    write_report(run)
    with (run.path / "results.csv").open(newline="") as handle:
        lines = list(csv.DictReader(handle))
    evaluations = [r for r in rows if r.get("scope") == "server"]
    # 4 numbers (BA, accuracy, macro-F1, loss) per evaluation row, 2 recalls (class 2 has none) per
    # pooled test row, 2 weights per round
    assert len(lines) == 4 * len(evaluations) + 2 * 2 + 2 * 2
    first = [line for line in lines if line["round"] == "1" and line["client"] == "" and line["split"] == "test"]
    assert {line["metric"]: float(line["value"]) for line in first} == pytest.approx(
        {"balanced_accuracy": 0.40, "accuracy": 0.60, "macro_f1": 0.30, "loss": 1.60, "recall_MEL": 0.8, "recall_NV": 0.75})
    weights = [line for line in lines if line["metric"] == "weight" and line["round"] == "2"]
    assert [(w["client"], w["client_name"], float(w["value"])) for w in weights] == [
        ("0", "BCN", pytest.approx(0.45)), ("1", "MSK", pytest.approx(0.55))]
    assert {line["client_name"] for line in lines if line["client"] == "1"} == {"MSK"}


def test_loss_curves_take_train_loss_from_replies_and_val_loss_from_each_clients_split(tmp_path: Path) -> None:
    from fedward.tracking.report import loss_series

    rows = global_run_rows(rounds=2)
    for r in rows:
        if r.get("scope") == "aggregation":
            r["train_loss"] = [1.5 / r["round"], float("nan")]  # a non-finite loss is left out
    found = loss_series(rows)
    assert found[0]["train"] == {1: 1.5, 2: 0.75} and "train" not in found[1]
    # the global model on each client's own validation split: loss 2 - BA in the fixture
    assert found[1]["val"] == pytest.approx({1: 2.0 - 0.55, 2: 2.0 - 0.65})
    run = make_run(tmp_path / "run", rows, {"method": "fedavg", "client_names": ["BCN", "MSK"]})
    write_report(run)
    assert (run.path / "loss_curves.png").read_bytes().startswith(b"\x89PNG")
    assert "<h2>Loss curves</h2>" in run.report_path.read_text()
    assert loss_series(local_run_rows())[0]["val"] == pytest.approx({1: 1.4, 2: 1.2, 3: 1.3})  # own models, no global

