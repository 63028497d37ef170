"""Fed-MAS's Fed-ISIC2019 table: FedAvg, FedProx and MOON with each local loss, Fed-MAS with each
aggregation, and the local and centralized bounds, under one budget.

The paper's tables were not available (``../shared/reference/fedmas.md`` §5); the rows are what
the reference code can run and what its README's three commands compare: BSM-FL (``fedavg`` +
BSM), Fed-MAS without MAS (``fedmas``, ``--free_u 3``, ``--aggregate_method avg``) and with it.
Every Fed-MAS row uses the seed README's BSM and ``--free_u 3``. The headline is the global
model's balanced accuracy on the pooled test set (the reference's metric, FLamby's too), at the
final round and at the round chosen on the pooled validation split (never on the test set, unlike
the reference's best-round selection); each client's balanced accuracy on its own test split is
the second section.

With ``--data_dir`` (the Fed-MAS data layout or FLamby's): the seed's settings, ResNet-18 from
torchvision's ImageNet weights (``--pre_trained_tv``), batch 64, Adam at 3e-4, 1 local epoch,
100 rounds, 224 px, the MoCo-v2 prior. On the built-in set: the README results grid's budget
(``configs/results.yaml``: 10% of the data, 32 px, 15 rounds, batch 32, Adam 1e-3, ResNet-18
from scratch) and the ``auto`` prior (fedward's self-trained MoCo-v2 prior: no checkpoint can be
downloaded offline).
"""

from __future__ import annotations

from typing import Any

from fedward.reproduce.table import BOUND, POOLED_FINAL, Row, RunSpec, Table, register_table

LOSSES = ("CE", "BSM", "focal", "LDAM", "CB", "RW", "LCC")
BASELINES = (("fedavg", "FedAvg"), ("fedprox", "FedProx"), ("moon", "MOON"))
AGGREGATIONS = ("avg", "mas", "mas_inv", "mas_DRW")
FEDMAS = {"method": "fedmas", "loss_fn_name": "BSM", "free_u": 3.0}  # the seed README's Fed-MAS settings


def _fedmas_label(aggregation: str) -> str:
    return f"Fed-MAS, {aggregation}"


ROWS = [Row(f"{title}+{loss}", RunSpec(f"{method}-{loss}", {"method": method, "loss_fn_name": loss}), "global",
            group="baseline")
        for method, title in BASELINES for loss in LOSSES]
ROWS += [Row(_fedmas_label(aggregation), RunSpec(f"fedmas-{aggregation}", {**FEDMAS, "aggregate_method": aggregation}),
             "global", group="fedmas")
         for aggregation in AGGREGATIONS]
ROWS += [Row("Local (BSM), each hospital alone", RunSpec("local-BSM", {"method": "local", "loss_fn_name": "BSM"}),
             "local", group=BOUND),
         Row("Centralized (BSM), pooled data", RunSpec("centralized-BSM", {"method": "centralized", "loss_fn_name": "BSM"}),
             "global", group=BOUND)]


def base_settings(options: dict[str, Any]) -> dict[str, Any]:
    """The settings every run shares, for the built-in set or Fed-ISIC2019 (``data_dir``)."""
    common = {"model": "resnet18", "epochs": 1, "adam": True, "validate_client": False}
    if options.get("data_dir"):
        values = {**common, "dataset": "fed_isic2019", "data_dir": options["data_dir"], "image_size": 224,
                  "pre_trained_tv": "default", "batch_size": 64, "lr": 3e-4, "comm_round": 100,
                  "pre_trained_models": "moco"}
    else:
        values = {**common, "dataset": "synthetic", "image_size": 32, "stem": "imagenet", "data_scale": 0.1,
                  "batch_size": 32, "lr": 1e-3, "comm_round": 15, "pre_trained_models": "auto"}
    if options.get("rounds"):
        values["comm_round"] = options["rounds"]
    if options.get("image_size"):
        values["image_size"] = options["image_size"]
    return values


def robust_factor_section(folders: dict, rows: list[Row], seeds: list[int]) -> list[str]:
    """For every MAS row: how uneven the class-wise divergences are (the coefficient of variation
    over a client's classes and over the clients of a class, at the last round) and each client's
    aggregation weight against its FedAvg weight (its share of the examples), means over seeds."""
    from fedward.metrics import mean_and_std
    from fedward.tracking import RunDirectory
    from fedward.tracking.report import divergence_spread

    lines = ["## Fed-MAS's robust factors: what MAS weighs", "",
             "Last round, mean over seeds. Spread: std / mean of the divergences w_kc, over a client's classes and "
             "over the clients that have a class (0: flat, so RF_k = 1 / |classes of k|). Weights: each client's "
             "MAS aggregation weight / its FedAvg weight (its share of the examples).", "",
             "| row | spread over classes | spread over clients | weight / FedAvg weight per client |",
             "| --- | --- | --- | --- |"]
    for row in rows:
        if row.run.settings.get("aggregate_method") in (None, "avg"):
            continue
        spreads, ratios = [], []
        for seed in seeds:
            found = RunDirectory.open_existing(folders[row.run.label, seed]).read_rows()
            spreads.append(divergence_spread(found))
            last = max((r for r in found if r.get("scope") == "aggregation"), key=lambda r: r["round"])
            counts = last["num_examples"]
            ratios.append([w / (n / sum(counts)) for w, n in zip(last["weights"], counts)])
        across = [mean_and_std([s[key] for s in spreads])[0] for key in ("across_classes", "across_clients")]
        per_client = " / ".join(f"{mean_and_std([r[k] for r in ratios])[0]:.2f}" for k in range(len(ratios[0])))
        lines.append(f"| {row.label} | {across[0]:.2f} | {across[1]:.2f} | {per_client} |")
    return lines + [""]


def title(options: dict[str, Any]) -> str:
    settings = base_settings(options)
    where = (f"Fed-ISIC2019 from {options['data_dir']}" if options.get("data_dir") else
             "the built-in synthetic Fed-ISIC2019-like set (synthetic, not Fed-ISIC2019)")
    return (f"Fed-MAS's Fed-ISIC2019 table on {where}: {settings['image_size']} px, {settings['comm_round']} rounds, "
            "six hospitals, eight classes")


TABLE = register_table(Table(
    name="fedmas-isic",
    title=title,
    rows=ROWS,
    base=base_settings,
    client_names=[],  # the data set's own (config.yaml's client_names)
    paper_note="The paper's numbers are not known to fedward (its tables were not available).",
    comparisons=[(_fedmas_label("mas"), _fedmas_label("avg")), (_fedmas_label("mas"), "FedAvg+BSM"),
                 (_fedmas_label("mas"), "best baseline")],
    notes=["Budget: the same rounds, 1 local epoch, one batch size and Adam at one lr for every row (MOON and "
           "Fed-MAS clip gradients at 5, as the reference); the per-method defaults otherwise (FedProx and MOON mu "
           "0.45).",
           "Fed-MAS rows: BSM, free_u 3, the prior named in the settings (moco on Fed-ISIC2019; fedward's "
           "self-trained `auto` prior on the built-in set).",
           "The local and centralized rows are bounds, never the 'best baseline'."],
    metrics=(("balanced_accuracy", "BA"),),
    pooled=True,
    headline=POOLED_FINAL,
    extra=robust_factor_section,
))
