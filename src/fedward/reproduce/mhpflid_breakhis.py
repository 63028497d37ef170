"""MH-pFLID's BreakHis table (different resolutions): four clients at x1/x2/x4/x8 with
ResNet17/11/8/5, the paper's baselines (``../shared/reference/mhpflid.md`` §3.4), fedward's
data-free heterogeneous baselines and MH-pFLID's ablations, under one budget.

The budget, the same for every row: ``--rounds`` rounds of 5 passes over the client's data
(MH-pFLID: 4 injection + 1 distillation epochs, the seed's schedule; the single-model methods
5 epochs; ``local``: the 4 epochs of MH-pFLID's local-model steps), batch 8, Adam at lr 1e-4
with gradient-norm clip 1 (the reproduction's optimizer) for every model but SCAFFOLD's (option
II's control variates assume SGD steps: plain SGD at lr 0.01, not tuned), no augmentation (the
reproduction resizes only). The homogeneous baselines need one architecture for every client;
the paper does not say which, so they use ResNet17 (client 1's, the largest; ``--homogeneous_model``).
+FT rows: the same run's final global model fine-tuned for 5 epochs at each client.

On the built-in set (no ``--data_dir``): 164 patients (``patients_scale`` 2), 32 px with the
medium stem (3x3 stride-1 conv, then max pool), so every client's local map keeps several
tokens (2x2 for ResNet17 to 16x16 for ResNet5) for R and T to attend over, D_mes = 128, 8 rounds;
the messenger's distillation lr is 1e-3: at the seed's 1e-5 its weights move 0.05% a round, so in
8 rounds it stays where it started (measured: docs/results.md); the public-data methods use 600 public images (default 1200), so that
their public passes cost about what their private ones do. With ``--data_dir`` (real
BreakHis): 224 px, the ImageNet stem and D_mes = 512 as the reproduction, and the seed's rates.
"""

from __future__ import annotations

from typing import Any

from fedward.reproduce.table import Row, RunSpec, Table, register_table

ADAM = {"adam": True, "lr": 1e-4, "grad_clip": 1.0}
PASSES = 5  # data passes per round, every method
FINETUNE_EPOCHS = 5


def _global(method: str, extra: dict[str, Any] | None = None) -> RunSpec:
    return RunSpec(method, {"method": method, "epochs": PASSES, "finetune_epochs": FINETUNE_EPOCHS, **ADAM,
                            **(extra or {})})


FEDAVG = _global("fedavg")
SCAFFOLD = RunSpec("scaffold", {"method": "scaffold", "epochs": PASSES, "finetune_epochs": FINETUNE_EPOCHS,
                                "lr": 0.01, "grad_clip": 1.0})
FEDPROX = _global("fedprox")
MHPFLID = RunSpec("mhpflid", {"method": "mhpflid", "mhpflid_fusion": "attention"})

ROWS = [
    Row("FedAvg", FEDAVG, "global", "global"),
    Row("FedAvg+FT", FEDAVG, "finetuned", "global"),
    Row("SCAFFOLD", SCAFFOLD, "global", "global"),
    Row("SCAFFOLD+FT", SCAFFOLD, "finetuned", "global"),
    Row("FedProx", FEDPROX, "global", "global"),
    Row("FedProx+FT", FEDPROX, "finetuned", "global"),
    Row("FedRep", RunSpec("fedrep", {"method": "fedrep", "epochs": PASSES - 1, "head_epochs": 1, **ADAM}), group="pfl"),
    Row("LG-FedAvg", RunSpec("lgfedavg", {"method": "lgfedavg", "epochs": PASSES, **ADAM}), group="pfl"),
    Row("APFL", RunSpec("apfl", {"method": "apfl", "epochs": PASSES, **ADAM}), group="pfl"),
    Row("Ditto", RunSpec("ditto", {"method": "ditto", "epochs": PASSES - 1, "ditto_personal_epochs": 1, **ADAM}),
        group="pfl"),
    Row("FedMD", RunSpec("fedmd", {"method": "fedmd"}), group="public"),
    Row("FedDF", RunSpec("feddf", {"method": "feddf", "epochs": PASSES}), group="public"),
    Row("pFedDF", RunSpec("pfeddf", {"method": "pfeddf", "epochs": PASSES - 1, "pfeddf_finetune_epochs": 1}),
        group="public"),
    Row("DS-pFL (DS-FL)", RunSpec("dsfl", {"method": "dsfl"}), group="public"),
    Row("KT-pFL", RunSpec("ktpfl", {"method": "ktpfl"}), group="public"),
    Row("FML", RunSpec("fml", {"method": "fml", "epochs": PASSES}), group="data-free"),
    Row("FedKD", RunSpec("fedkd", {"method": "fedkd", "epochs": PASSES}), group="data-free"),
    Row("Local", RunSpec("local", {"method": "local", "epochs": PASSES - 1, **ADAM}), group="local"),
    Row("MH-pFLID", MHPFLID, group="mhpflid"),
    Row("MH-pFLID, R/T = 1x1-conv addition", RunSpec("mhpflid-add", {"method": "mhpflid", "mhpflid_fusion": "add"}),
        group="mhpflid"),
    Row("MH-pFLID, no attention (R = W_d, T = messenger)",
        RunSpec("mhpflid-none", {"method": "mhpflid", "mhpflid_fusion": "none"}), group="mhpflid"),
]

# The seed's BreakHis numbers, read from the reproduction report's bar charts (second-hand).
PAPER = {
    "MH-pFLID (paper)": {"accuracy": [0.893, 0.899, 0.866, 0.775, 0.858], "macro_f1": [0.866, 0.879, 0.833, 0.713, 0.823]},
    "Local (paper)": {"accuracy": [0.789, 0.803, 0.754, 0.696, 0.760], "macro_f1": [0.732, 0.746, 0.685, 0.587, 0.688]},
}

CLIENT_MODELS = ["resnet17", "resnet11", "resnet8", "resnet5"]


def base_settings(options: dict[str, Any]) -> dict[str, Any]:
    """The settings every run shares, for the built-in set or real BreakHis (``data_dir``)."""
    common = {"client_models": CLIENT_MODELS, "model": options.get("homogeneous_model") or "resnet17",
              "batch_size": 8, "augment": False, "loss_fn_name": "CE", "eval_every": 0, "local_lr": 1e-4}
    if options.get("data_dir"):
        values = {**common, "dataset": "breakhis", "data_dir": options["data_dir"], "image_size": 224,
                  "stem": "imagenet", "messenger_dim": 512, "messenger_lr": 1e-5, "comm_round": 100}
    else:
        values = {**common, "dataset": "synthetic_multires", "image_size": 32, "stem": "medium", "messenger_dim": 128,
                  "messenger_lr": 1e-3, "comm_round": 8, "patients_scale": 2.0, "public_size": 600}
    if options.get("rounds"):
        values["comm_round"] = options["rounds"]
    if options.get("image_size"):
        values["image_size"] = options["image_size"]
    return values


def title(options: dict[str, Any]) -> str:
    settings = base_settings(options)
    if options.get("data_dir"):
        where = f"BreakHis from {options['data_dir']}"
    else:
        where = "the built-in synthetic multi-resolution set (synthetic_multires, not BreakHis)"
    return (f"MH-pFLID's BreakHis table on {where}: {settings['image_size']} px, {settings['comm_round']} rounds, "
            f"clients x1/x2/x4/x8 with ResNet17/11/8/5")


TABLE = register_table(Table(
    name="mhpflid-breakhis",
    title=title,
    rows=ROWS,
    base=base_settings,
    client_names=["x1", "x2", "x4", "x8"],
    paper=PAPER,
    paper_note=("Paper rows: BreakHis at 224 px, 100 rounds, read from the reproduction report's bar charts "
                "(second-hand; the paper's table itself was not available). No baseline's numbers are known."),
    comparisons=[("MH-pFLID", "best baseline"), ("MH-pFLID", "MH-pFLID, no attention (R = W_d, T = messenger)"),
                 ("MH-pFLID", "Local")],
    accepts=("data_dir", "rounds", "image_size", "homogeneous_model"),
    notes=["Budget: the same rounds and 5 data passes per round for every method; Adam 1e-4, clip 1 (SCAFFOLD: SGD "
           "0.01); batch 8; no augmentation.",
           "Homogeneous baselines (FedAvg ... Ditto) train one architecture for every client (ResNet17 unless "
           "--homogeneous_model); the paper does not say which it used.",
           "Public-data baselines use the data set's built-in public split (other patients at full resolution) "
           "or --public_data; which public set the paper used is not known."],
))
