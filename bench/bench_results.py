"""Results on the built-in synthetic data set, several seeds, the same budget for every method.

Runs FedAvg+CE, FedAvg+BSM, local (every hospital alone) and centralized (pooled) training, and
prints a Markdown table of balanced accuracy (mean ± std over seeds):
- the global model on the pooled test set, at the final round and at the round chosen by the
  pooled validation balanced accuracy;
- for local training, each hospital's own model on the pooled test set (FLamby's "Local i"),
  at its final round;
- the unweighted mean over clients of each client's test split.

Usage: python bench/bench_results.py [--seeds 0 1 2] [--rounds 20] [--out bench/results/synthetic]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

from fedward.config import build_config
from fedward.engine.simulation import prepare, run
from fedward.metrics import mean_and_std
from fedward.tracking import RunDirectory

ROOT = Path(__file__).resolve().parent.parent
GRID = [("fedavg", "CE"), ("fedavg", "BSM"), ("local", "BSM"), ("centralized", "BSM")]


def _fmt(values: list[float]) -> str:
    mean, std = mean_and_std(values)
    return f"{mean:.3f} ± {std:.3f}"


def run_grid(base: dict, seeds: list[int], out: Path) -> dict:
    results: dict = {}
    for method, loss in GRID:
        for seed in seeds:
            name = f"{method}-{loss}-seed{seed}"
            folder = out / name
            if (folder / "results.json").is_file():  # rerunning the script continues the grid
                summary = json.loads((folder / "results.json").read_text())
            else:
                cfg = build_config({**base, "method": method, "loss_fn_name": loss, "seed": seed,
                                    "output": str(folder)})
                run_dir, data = prepare(cfg, overwrite=True)
                summary = run(cfg, run_dir, data=data)
            results.setdefault((method, loss), []).append(summary)
            print(f"{name}: final {summary['final']['balanced_accuracy']:.3f}", flush=True)
    return results


def table(results: dict, client_names: list[str]) -> str:
    lines = ["| method | pooled test BA, final round | pooled test BA, val-selected round | mean of client test BA (final) |",
             "| --- | --- | --- | --- |"]
    for (method, loss), summaries in results.items():
        if method == "local":
            continue
        final = [s["final"]["balanced_accuracy"] for s in summaries]
        selected = [s["selected"]["balanced_accuracy"] for s in summaries if s.get("selected")]
        clients = [s["mean_client_final"] for s in summaries]
        lines.append(f"| {method} + {loss} | {_fmt(final)} | {_fmt(selected) if selected else 'n/a'} | {_fmt(clients)} |")
    for (method, loss), summaries in results.items():
        if method != "local":
            continue
        for key, name in enumerate(client_names):
            pooled = [s["pooled_final"][str(key)] if str(key) in s["pooled_final"] else s["pooled_final"][key]
                      for s in summaries]
            own = [s["per_client_final"][str(key)] if str(key) in s["per_client_final"] else s["per_client_final"][key]
                   for s in summaries]
            lines.append(f"| local {name} alone + {loss} | {_fmt(pooled)} | — | own test: {_fmt(own)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"), help="base settings")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "synthetic"))
    args = parser.parse_args()
    base = yaml.safe_load(Path(args.config).read_text())
    base.update(progress=False, validate_client=False)
    if args.rounds:
        base["comm_round"] = args.rounds
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = run_grid(base, args.seeds, out)
    first = RunDirectory.open_existing(out / f"local-BSM-seed{args.seeds[0]}").read_config()
    text = table(results, first.get("client_names") or [str(i) for i in range(6)])
    settings = ", ".join(f"{k}={base[k]}" for k in sorted(base) if k not in ("progress", "validate_client"))
    report = f"Seeds {args.seeds}; settings: {settings}\n\n{text}\n"
    (out / "results.md").write_text(report)
    print(report)


if __name__ == "__main__":
    main()
