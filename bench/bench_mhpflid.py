"""MH-pFLID and the model-heterogeneous baselines on the built-in multi-resolution set, several seeds.

Every method runs with the settings of ``configs/mhpflid.yaml`` (the same data, local
architectures, batch size and number of rounds); what changes is the method:
- local: every client alone, 4 epochs a round at lr 1e-4 (the local-model steps of an mhpflid round);
- fml, fedkd: 5 epochs a round (the data passes of mhpflid's 4 + 1), both models at lr 1e-4;
- mhpflid with R/T as attention (the paper), as a 1x1-conv feature addition, and without R/T.
Prints a Markdown table of each client's local model on its own test split at the final round:
accuracy and macro-F1 per client and their unweighted mean (the seed's "Average"), mean ± std
over seeds, plus the mean balanced accuracy.

Usage: python bench/bench_mhpflid.py [--seeds 0 1 2] [--rounds 5] [--shared-images] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import yaml

from fedward.config import applicable_settings, build_config
from fedward.engine.simulation import prepare, run
from fedward.metrics import mean_and_std
from fedward.tracking import RunDirectory

ROOT = Path(__file__).resolve().parent.parent
GRID = [
    ("local", {"method": "local", "epochs": 4, "lr": 1e-4, "adam": True}),
    ("fml", {"method": "fml", "epochs": 5}),
    ("fedkd", {"method": "fedkd", "epochs": 5}),
    ("mhpflid", {"method": "mhpflid", "mhpflid_fusion": "attention"}),
    ("mhpflid, R/T = 1x1-conv addition", {"method": "mhpflid", "mhpflid_fusion": "add"}),
    ("mhpflid, no R/T", {"method": "mhpflid", "mhpflid_fusion": "none"}),
]
# The seed's BreakHis numbers (read from the reproduction report's bar charts; second-hand).
SEED_ROWS = [
    ("MH-pFLID, paper (BreakHis, 224 px, 100 rounds)", [0.893, 0.899, 0.866, 0.775], [0.866, 0.879, 0.833, 0.713]),
    ("Local, paper (BreakHis)", [0.789, 0.803, 0.754, 0.696], [0.732, 0.746, 0.685, 0.587]),
]


def final_client_rows(folder: Path) -> dict[int, dict]:
    """Each client's local-model row on its own test split at its last evaluated round."""
    rows = RunDirectory.open_existing(folder).read_rows()
    last: dict[int, dict] = {}
    for row in rows:
        if (row.get("scope"), row.get("model"), row.get("data"), row.get("split")) == ("client", "local", "client", "test"):
            if row["client"] not in last or row["round"] >= last[row["client"]]["round"]:
                last[row["client"]] = row
    return last


def _fmt(values: list[float]) -> str:
    mean, std = mean_and_std(values)
    return f"{mean:.3f} ± {std:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--config", default=str(ROOT / "configs" / "mhpflid.yaml"))
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--shared-images", action="store_true", help="the reproduction's setting: every client holds all images")
    parser.add_argument("--only", nargs="+", default=None, help="labels of the grid to run (default: all)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "mhpflid"))
    args = parser.parse_args()
    base = yaml.safe_load(Path(args.config).read_text())
    base.update(progress=False, shared_images=args.shared_images)
    if args.rounds:
        base["comm_round"] = args.rounds
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    grid = [g for g in GRID if args.only is None or g[0] in args.only]
    results: dict[str, list[dict[int, dict]]] = {}
    seconds: dict[str, list[float]] = {}
    for label, overrides in grid:
        for seed in args.seeds:
            name = f"{label.replace(', ', '-').replace(' ', '_').replace('/', '')}-seed{seed}"
            folder = out / name
            if not (folder / "results.json").is_file():  # rerunning the script continues the grid
                cfg = build_config(applicable_settings({**base, **overrides, "seed": seed, "output": str(folder)}))
                run_dir, data = prepare(cfg, overwrite=True)
                start = time.perf_counter()
                run(cfg, run_dir, data=data)
                (folder / "seconds.json").write_text(json.dumps(time.perf_counter() - start))
            rows = final_client_rows(folder)
            results.setdefault(label, []).append(rows)
            if (folder / "seconds.json").is_file():
                seconds.setdefault(label, []).append(json.loads((folder / "seconds.json").read_text()))
            mean_acc = sum(r["accuracy"] for r in rows.values()) / len(rows)
            print(f"{name}: mean client ACC {mean_acc:.3f}", flush=True)
    clients = sorted(next(iter(results.values()))[0])
    names = RunDirectory.open_existing(next(p for p in sorted(out.iterdir()) if (p / "config.yaml").is_file())).read_config()["client_names"]
    header = ("| method | " + " | ".join(f"{names[k]} ACC / MF1" for k in clients)
              + " | Average ACC | Average MF1 | Average BA | s / round |")
    lines = [header, "|" + " --- |" * (len(clients) + 5)]
    for label, runs in results.items():
        cells = [f"{_fmt([r[k]['accuracy'] for r in runs])} / {_fmt([r[k]['macro_f1'] for r in runs])}" for k in clients]
        average = {key: [sum(r[k][key] for k in clients) / len(clients) for r in runs]
                   for key in ("accuracy", "macro_f1", "balanced_accuracy")}
        per_round = (f"{sum(seconds[label]) / len(seconds[label]) / base['comm_round']:.1f}"
                     if seconds.get(label) else "—")
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {_fmt(average['accuracy'])} | {_fmt(average['macro_f1'])}"
                     f" | {_fmt(average['balanced_accuracy'])} | {per_round} |")
    for label, acc, mf1 in SEED_ROWS:
        lines.append(f"| {label} | " + " | ".join(f"{a:.3f} / {m:.3f}" for a, m in zip(acc, mf1))
                     + f" | {sum(acc) / 4:.3f} | {sum(mf1) / 4:.3f} | — | — |")
    settings = ", ".join(f"{k}={base[k]}" for k in sorted(base) if k != "progress")
    report = f"Seeds {args.seeds}; settings: {settings}\n\n" + "\n".join(lines) + "\n"
    suffix = "-shared" if args.shared_images else ""
    (out / f"results-mhpflid{suffix}.md").write_text(report)
    print(report)


if __name__ == "__main__":
    main()
