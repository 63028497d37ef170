"""Results on the built-in synthetic data set, several seeds, the same budget for every method.

Grid ``main``: FedAvg+CE, FedAvg+BSM, local (every hospital alone) and centralized (pooled).
Grid ``fedmas``: Fed-MAS with avg and mas aggregation aligned to a MoCo-v2
prior fedward trains on the synthetic public split, and Fed-MAS+mas aligned to the same
architecture untrained (the MoCo training's own initial weights: what the training contributes).
Grid ``strategies``: FLamby's strategy set next to FedAvg; ``sgd_lr``: the FedAvg lr pilot for it.
Grid ``optimizer`` (with ``--config none``): the local optimiser and lr of fedward's defaults.
Prints a Markdown table of balanced accuracy (mean ± std over seeds):
- the global model on the pooled test set, at the final round and at the round chosen by the
  pooled validation balanced accuracy;
- for local training, each hospital's own model on the pooled test set (FLamby's "Local i"),
  at its final round;
- the unweighted mean over clients of each client's test split.

Usage: python bench/bench_results.py [--grid main|fedmas|strategies|sgd_lr|optimizer] [--config FILE|none] [--seeds 0 1 2] [--rounds 20] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import yaml

from fedward.config import build_config
from fedward.engine.simulation import prepare, run
from fedward.metrics import mean_and_std
from fedward.tracking import RunDirectory

ROOT = Path(__file__).resolve().parent.parent
GRIDS = {
    "main": [("fedavg + CE", {"method": "fedavg", "loss_fn_name": "CE"}),
             ("fedavg + BSM", {"method": "fedavg", "loss_fn_name": "BSM"}),
             ("local + BSM", {"method": "local", "loss_fn_name": "BSM"}),
             ("centralized + BSM", {"method": "centralized", "loss_fn_name": "BSM"})],
    # FedAvg+CE/BSM of the main grid are the same runs (same settings and seeds, bit-identical on CPU).
    "fedmas": [("fedmas avg, MoCo prior", {"method": "fedmas", "aggregate_method": "avg", "prior": "trained"}),
               ("fedmas mas, MoCo prior", {"method": "fedmas", "aggregate_method": "mas", "prior": "trained"}),
               ("fedmas mas, untrained prior", {"method": "fedmas", "aggregate_method": "mas", "prior": "untrained"})],
}
FEDMAS = {"loss_fn_name": "BSM", "free_u": 3.0}  # the seed README's Fed-MAS settings
# FLamby's strategy set next to FedAvg (configs/strategies.yaml: plain SGD clients at one lr for all,
# server settings at the methods' defaults), and the FedAvg lr pilot that chooses that lr.
GRIDS["strategies"] = [(name, {"method": name})
                       for name in ("fedavg", "fedadam", "fedyogi", "fedadagrad", "fedavgm", "scaffold", "cyclic")]
SGD_LRS = (0.01, 0.05, 0.2)
GRIDS["sgd_lr"] = [(f"fedavg sgd lr {lr}", {"method": "fedavg", "lr": lr}) for lr in SGD_LRS]
# The local optimiser of `fedward run` with no flags (issue 16: the default should learn): run with
# `--config none`, every other setting at its default (FedAvg + CE, ResNet-18, 32 px, 10 rounds).
# SGD 3e-4 is the reference code's argparse default, Adam 3e-4 the seed's Fed-ISIC2019 setting.
OPTIMIZERS = (("sgd", False, 3e-4), ("sgd", False, 0.01), ("sgd", False, 0.05),
              ("adam", True, 3e-4), ("adam", True, 1e-3))
GRIDS["optimizer"] = [(f"fedavg {name} lr {lr}", {"method": "fedavg", "adam": adam, "lr": lr})
                      for name, adam, lr in OPTIMIZERS]


def prior_files(out: Path, image_size: int) -> dict[str, str]:
    """The self-trained MoCo-v2 prior and its untrained twin (same settings, 0 epochs: the very
    weights the training starts from), trained once into ``out``."""
    from fedward.data.synthetic import public_split
    from fedward.selfsup.cached import PUBLIC_IMAGES, PUBLIC_SEED, cached_prior_settings
    from fedward.selfsup.moco import train_moco

    settings = cached_prior_settings(image_size)
    public = public_split(seed=PUBLIC_SEED, image_size=image_size, count=PUBLIC_IMAGES)
    files = {}
    for kind, epochs in (("trained", settings.epochs), ("untrained", 0)):
        path = out / f"prior-{kind}-{settings.arch}-{image_size}px.pth.tar"
        if not path.is_file() or torch.load(path, weights_only=True, mmap=True)["epoch"] < epochs:
            settings.epochs = epochs
            summary = train_moco(public.images, settings, path, labels=public.labels, source="synthetic public split",
                                 resume=path.is_file(), progress=False)
            print(f"prior {kind}: kNN accuracy {summary['knn_before']:.3f} -> {summary['knn_after']:.3f}", flush=True)
        files[kind] = str(path)
    return files


def _fmt(values: list[float]) -> str:
    mean, std = mean_and_std(values)
    return f"{mean:.3f} ± {std:.3f}"


def run_grid(base: dict, grid: list[tuple[str, dict]], seeds: list[int], out: Path) -> dict:
    results: dict = {}
    priors = prior_files(out, base["image_size"]) if any(o.get("method") == "fedmas" for _, o in grid) else {}
    for label, overrides in grid:
        overrides = dict(overrides)
        if overrides["method"] == "fedmas":
            prior = priors[overrides.pop("prior")]
            overrides = {**FEDMAS, **overrides, "pre_trained_models": prior}
        for seed in seeds:
            name = f"{label.replace(' + ', '-').replace(', ', '-').replace(' ', '_')}-seed{seed}"
            folder = out / name
            if (folder / "results.json").is_file():  # rerunning the script continues the grid
                summary = json.loads((folder / "results.json").read_text())
            else:
                cfg = build_config({**base, **overrides, "seed": seed, "output": str(folder)})
                run_dir, data = prepare(cfg, overwrite=True)
                summary = run(cfg, run_dir, data=data)
            results.setdefault((label, overrides["method"]), []).append(summary)
            print(f"{name}: final {summary['final']['balanced_accuracy']:.3f}", flush=True)
    return results


def table(results: dict, client_names: list[str]) -> str:
    lines = ["| method | pooled test BA, final round | pooled test BA, val-selected round | mean of client test BA (final) |",
             "| --- | --- | --- | --- |"]
    for (label, method), summaries in results.items():
        if method == "local":
            continue
        final = [s["final"]["balanced_accuracy"] for s in summaries]
        selected = [s["selected"]["balanced_accuracy"] for s in summaries if s.get("selected")]
        clients = [s["mean_client_final"] for s in summaries]
        lines.append(f"| {label} | {_fmt(final)} | {_fmt(selected) if selected else 'n/a'} | {_fmt(clients)} |")
    for (label, method), summaries in results.items():
        if method != "local":
            continue
        for key, name in enumerate(client_names):
            pooled = [s["pooled_final"][str(key)] if str(key) in s["pooled_final"] else s["pooled_final"][key]
                      for s in summaries]
            own = [s["per_client_final"][str(key)] if str(key) in s["per_client_final"] else s["per_client_final"][key]
                   for s in summaries]
            lines.append(f"| local {name} alone + BSM | {_fmt(pooled)} | — | own test: {_fmt(own)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", choices=sorted(GRIDS), default="main")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"),
                        help="base settings, or 'none' for fedward's defaults")
    parser.add_argument("--only", nargs="+", default=None, metavar="LABEL",
                        help="run only these rows of the grid (their labels, e.g. 'fedavg adam lr 0.001')")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None, help="client learning rate for every method of the grid")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "synthetic"))
    args = parser.parse_args()
    base = {} if args.config == "none" else yaml.safe_load(Path(args.config).read_text())
    base.update(progress=False, validate_client=False)
    if args.rounds:
        base["comm_round"] = args.rounds
    if args.lr:
        base["lr"] = args.lr
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    grid = GRIDS[args.grid]
    if args.only:
        unknown = sorted(set(args.only) - {label for label, _ in grid})
        if unknown:
            parser.error(f"--only {unknown}: not rows of --grid {args.grid} ({[label for label, _ in grid]})")
        grid = [row for row in grid if row[0] in args.only]
    results = run_grid(base, grid, args.seeds, out)
    first = RunDirectory.open_existing(next(p for p in sorted(out.iterdir()) if (p / "config.yaml").is_file())).read_config()
    text = table(results, first.get("client_names") or [str(i) for i in range(6)])
    settings = ", ".join(f"{k}={base[k]}" for k in sorted(base) if k not in ("progress", "validate_client"))
    settings = settings or "fedward's defaults"
    report = f"Seeds {args.seeds}; settings: {settings}\n\n{text}\n"
    (out / f"results-{args.grid}.md").write_text(report)
    print(report)


if __name__ == "__main__":
    main()
