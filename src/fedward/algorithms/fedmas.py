"""Fed-MAS (Elbatel et al., MICCAI 2023) as in the reference code (xmed-lab/Fed-MAS methods/free.py).

Client k in round t:
1. with MAS, measure w_k: the received global model (eval mode, no grad) over one pass of the
   shuffled, augmented, drop_last train batches, class-wise mean alignment loss to the prior;
2. train: L = task(z, y) + task'(z2, y) + free_u * mean_i(2 - 2 cos(p(x_i), f(x_i))), gradients
   clipped at 5, accumulating w_hat_k from each batch's per-sample losses (before its step);
3. RF_k = sum over c with w_c != 0 of (w_c / sum w)(w_hat_c / sum w_hat), w_hat's sum over every
   class as in the reference (``--rf_normalisation``), sent as ``robust-factor``.
With ``free_u = 0`` the divergence uses the per-sample supervised loss instead (as the reference).
The server averages with avg (FedAvg), mas (RF_k / sum RF), mas_inv or mas_DRW weights.

Departures from the reference, each cheap to state: the prior stays in eval mode throughout
(``--prior_bn_drift`` reproduces the reference's round-0 BatchNorm drift); ``--lr`` is honoured
(the reference hard-codes Adam's 3e-4 for fedmas; its README passes 3e-4 anyway); and
``--update_projector_head free|global`` keep the client's own copy of the other heads across
rounds (the reference resets them to random weights every round, and crashes on ``free``).

Two options for speed, off by default. ``--share_prior_forward``: the reference runs the prior
twice per sample and round with MAS (pre-pass and first epoch); with it the first local epoch
replays the pre-pass's batches (same indices, same augmentation) and reuses their prior features,
so f runs once per sample. The computation per batch is the reference's; what changes is that
epoch 1 sees the pre-pass's shuffle instead of a fresh one. ``--cache_prior_features`` is an
approximation: the alignment target is the prior's feature of the un-augmented image, computed
once per client, instead of f(aug(x)) on every batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

import torch

from fedward.algorithms.base import (
    ClientReply,
    GlobalTraining,
    ServerMessage,
    Workspace,
    examples_seen,
    to_cpu,
    training_batches,
)
from fedward.algorithms.fedavg import FedAvg
from fedward.algorithms.registry import register_method
from fedward.algorithms.mas import (
    RF_NORMALISATIONS, ClassDivergence, alignment_loss, mas_drw_weights, mas_weights, robust_factor,
)
from fedward.data.types import ClientData
from fedward.errors import ConfigError
from fedward.options import NON_NEGATIVE, option
from fedward.losses import build_loss
from fedward.seeding import torch_generator

class PrepassBatch(NamedTuple):
    """One MAS pre-pass batch kept for --share_prior_forward: its sample indices, the augmentation
    generator's state before it, and the prior's features of its augmented images."""
    index: torch.Tensor
    augment_state: torch.Tensor
    feature: torch.Tensor


class TaskLosses(NamedTuple):
    """The task loss of z (mean), of the auxiliary head's z2 (mean, its own object as in the
    reference), and per sample (the divergence when free_u = 0)."""
    task: Any
    aux: Any
    per_sample: Any


# Heads a client keeps for itself under each --update_projector_head policy.
LOCAL_HEADS = {"both": (), "free": ("fc.",), "global": ("p_free.", "fc_free.")}
CLIP_NORM = 5.0


@dataclass
class FedMASOptions(GlobalTraining):
    free_u: float = option(0.0, "prior-alignment weight lambda_f; 0 switches the divergence to the supervised loss",
                           check=NON_NEGATIVE, reference=True)
    pre_trained_models: str | None = option(None, "the prior: moco, IMAGENET1K_V1, 18_img, mix, auto (moco if present, "
                                                  "else a self-trained prior), random, or a checkpoint file")
    prior_path: str | None = option(None, "the prior's checkpoint file (default: $FEDWARD_CACHE/priors/<its file name>)")
    prior_bn_drift: bool = option(False, "reproduce the reference's quirk: the prior's BatchNorm statistics drift in "
                                         "round 0")
    share_prior_forward: bool = option(False, "one prior forward per sample with MAS: the first local epoch replays the "
                                              "pre-pass's batches (same order, same augmentation) and reuses its prior "
                                              "features, instead of a fresh shuffle and a second prior forward")
    cache_prior_features: bool = option(False, "approximation, off by default: align to the prior's features of the "
                                               "un-augmented images, computed once per client, instead of a prior "
                                               "forward on every batch")
    update_projector_head: str = option("both", "which heads a client takes from the global model: both, free, global",
                                        choices=("both", "free", "global"), reference=True)
    # Case-insensitive, so the reference README's --aggregate_method='MAS' works (the reference crashes on it).
    aggregate_method: str = option("avg", "server aggregation: avg, mas, mas_inv, mas_DRW (any case)",
                                   choices=("avg", "mas", "mas_inv", "mas_drw"), lower=True, reference=True)
    LRD: bool = option(False, "ramp lambda_f down linearly from 0-based round s = --start_free_rd: free_u (1 - (r - s) "
                              "/ (R - s)) at round r >= s (the reference's; its source says it does not help)",
                       reference=True)
    start_free_rd: int = option(30, "the 0-based round where --LRD's ramp-down starts", check=NON_NEGATIVE,
                                reference=True)
    rf_normalisation: str = option("all", "the robust factor's sum of w_hat: over all classes (the reference) or over "
                                          "the classes present in w only", choices=RF_NORMALISATIONS)
    ldam_aux_head: str = option("cosine", "with --loss_fn_name LDAM, the auxiliary head fc_free: cosine (the "
                                          "reference) or linear", choices=("cosine", "linear"))
    free_u0_task_mean: str = option("weighted", "with --free_u 0 and class weights (CB, RW, LDAM's DRW), the task "
                                                "loss's mean: weighted (sum w_y l / sum w_y, torch's mean, as with "
                                                "free_u > 0) or plain (mean of w_y l, the reference's)",
                                    choices=("weighted", "plain"))


@register_method
class FedMAS(FedAvg):
    name = "fedmas"
    summary = "Fed-MAS (Elbatel et al. 2023): alignment to a frozen self-supervised prior, MAS aggregation"
    Options = FedMASOptions
    per_sample_dp_refusal = "its local step (alignment to the prior, the auxiliary head) is its own, not the task loss alone that DP-SGD clips per image"

    @classmethod
    def check_config(cls, cfg) -> None:
        super().check_config(cfg)
        if cfg.pre_trained_models is None:
            raise ConfigError("--method fedmas needs --pre_trained_models: moco, IMAGENET1K_V1, 18_img, mix, auto, random, "
                              "or a checkpoint file")
        if cfg.share_prior_forward:
            if cfg.aggregate_method == "avg" or cfg.free_u == 0:
                raise ConfigError("--share_prior_forward reuses the MAS pre-pass's prior features: it needs "
                                  "--aggregate_method mas, mas_inv or mas_DRW and --free_u > 0")
            if cfg.cache_prior_features or cfg.prior_bn_drift:
                raise ConfigError("--share_prior_forward: drop --cache_prior_features and --prior_bn_drift (the "
                                  "pre-pass's features would not be the training's)")
        if cfg.cache_prior_features and cfg.prior_bn_drift:
            raise ConfigError("--cache_prior_features needs a fixed prior; --prior_bn_drift changes it in round 1")
        if cfg.ldam_aux_head != "cosine" and cfg.loss_fn_name != "LDAM":
            raise ConfigError(f"--ldam_aux_head {cfg.ldam_aux_head} applies to --loss_fn_name LDAM only "
                              f"(the loss is {cfg.loss_fn_name})")
        if cfg.LRD and cfg.free_u == 0:
            raise ConfigError("--LRD ramps down --free_u, which is 0")
        if cfg.free_u0_task_mean != "weighted" and cfg.free_u != 0:
            raise ConfigError(f"--free_u0_task_mean {cfg.free_u0_task_mean} applies to --free_u 0 only "
                              f"(free_u is {cfg.free_u})")
        if cfg.rf_normalisation != "all" and cfg.aggregate_method == "avg":
            raise ConfigError(f"--rf_normalisation {cfg.rf_normalisation} applies to the MAS aggregations only "
                              "(--aggregate_method is avg)")
        if cfg.secure_aggregation and cfg.aggregate_method == "mas_drw":
            raise ConfigError("--secure_aggregation with --aggregate_method mas_DRW: its late-round weights normalise "
                              "1/RF over all clients before a non-linear step, so no client can weight its own update; "
                              "use mas or mas_inv")
        if cfg.dp_clip is not None and cfg.aggregate_method != "avg":
            raise ConfigError(f"--dp_clip with --aggregate_method {cfg.aggregate_method}: the MAS weights come from "
                              "each client's class-wise divergences, sent in the clear; DP covers --aggregate_method avg")
        if cfg.pre_trained_models == "mix" and cfg.prior_path:
            raise ConfigError("--pre_trained_models mix uses two files (moco and IMAGENET1K_V1) from the prior folder "
                              "($FEDWARD_CACHE/priors); drop --prior_path")

    @classmethod
    def model_builder(cls, cfg, spec):
        """The global model; with LDAM the reference makes both heads cosine classifiers (its
        ClassifierLDAM for fc and fc_free), so LDAM's scale s = 30 meets logits in [-1, 1] in both."""
        from fedward.losses import build_loss
        from fedward.models.heads import use_cosine_classifier

        build = super().model_builder(cfg, spec)
        if not (build_loss(cfg.loss_fn_name, [1] * spec.num_classes).needs_cosine_classifier
                and cfg.ldam_aux_head == "cosine"):
            return build

        def build_with_cosine_aux_head():
            return use_cosine_classifier(build(), head="fc_free")

        return build_with_cosine_aux_head

    @classmethod
    def wrap_model(cls, cfg, spec, model):
        from fedward.models.heads import PriorAlignedModel
        from fedward.priors import prior_dim

        return PriorAlignedModel(model, spec.num_classes, prior_dim(cfg.pre_trained_models, cfg.prior_path, spec.image_size))

    @classmethod
    def resolved_settings(cls, cfg):
        """``auto`` records the file it stands for now: the MoCo-v2 checkpoint when present, else
        the self-trained prior (so a resumed run keeps its prior when the other file appears)."""
        from fedward.priors import resolve_auto

        if cfg.pre_trained_models != "auto":
            return {}
        return {"prior_path": resolve_auto(cfg.image_size, cfg.prior_path)}

    @classmethod
    def prepare_run(cls, cfg, spec, num_clients: int) -> None:
        """A missing or mismatched prior file fails here, not in round 1; ``auto`` trains the
        self-supervised prior if needed, and the run records the file."""
        from fedward.priors import client_prior_names, load_prior

        super().prepare_run(cfg, spec, num_clients)
        if cfg.pre_trained_models == "auto":
            load_prior("auto", prior_path=cfg.prior_path, image_size=spec.image_size, progress=cfg.progress)
        for key, value in cls.resolved_settings(cfg).items():
            setattr(cfg, key, value)
        for name in sorted(set(client_prior_names(cfg.pre_trained_models, num_clients, cfg.seed))):
            path = None if cfg.pre_trained_models == "mix" else cfg.prior_path
            load_prior(name, prior_path=path, image_size=spec.image_size)

    def prior_name(self, client_id: int) -> str:
        """The prior this client aligns to (``mix`` gives clients different ones)."""
        from fedward.priors import client_prior_names

        num_clients = len(self.spec.train_class_counts)
        return client_prior_names(self.cfg.pre_trained_models, num_clients, self.cfg.seed)[client_id]

    def prior(self, ws: Workspace, client_id: int):
        """The client's frozen prior, built once per worker and kept in its workspace."""
        from fedward.priors import load_prior

        name = self.prior_name(client_id)
        if name not in ws.priors:
            # Under mix the two files sit in the prior folder; otherwise --prior_path names the file.
            path = None if self.cfg.pre_trained_models == "mix" else self.cfg.prior_path
            ws.priors[name] = load_prior(name, prior_path=path, image_size=self.spec.image_size,
                                         keep_batchnorm_drift=self.cfg.prior_bn_drift, seed=self.cfg.seed).to(ws.device)
            ws.prior_buffers[name] = to_cpu(dict(ws.priors[name].named_buffers()))
        return ws.priors[name]

    def _use_client_prior_statistics(self, ws: Workspace, prior, client_id: int, state: dict[str, Any]) -> None:
        """With --prior_bn_drift every client has its own drifted prior, as in the reference (one
        prior per client process): the shared prior takes this client's BatchNorm buffers."""
        buffers = state.get("prior-batchnorm", ws.prior_buffers[self.prior_name(client_id)])
        for name, buffer in prior.named_buffers():
            buffer.copy_(buffers[name])

    def load_start_model(self, ws: Workspace, message: ServerMessage, state: dict[str, Any], client: ClientData):
        model = super().load_start_model(ws, message, state, client)
        if "local-heads" in state:
            model.load_state_dict(state["local-heads"], strict=False)
        return model

    def free_factor(self, round_index: int) -> float:
        """lambda_f in 1-based round ``round_index``: --free_u, or under --LRD the reference's ramp-down
        free_u (1 - min(1, (r - s) / (R - s))) from 0-based round r = s on."""
        cfg = self.cfg
        r, s = round_index - 1, cfg.start_free_rd
        if not cfg.LRD or r < s:
            return cfg.free_u
        length = cfg.comm_round - s
        return cfg.free_u * (1.0 - (1.0 if r - s >= length else (r - s) / length))

    def local_objective(self, losses: "TaskLosses", z, p, z2, labels, prior_feature,
                        free_factor: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(L, per-sample divergence) of one batch: L = task(z, y) + task'(z2, y) + free_factor * mean_i
        alignment; with free_u = 0, L = task(z, y) + task'(z2, y) and the divergence is the
        per-sample task loss. ``prior_feature`` is f(x) (None with free_u = 0)."""
        cfg = self.cfg
        if cfg.free_u == 0:
            per_sample = losses.per_sample(z, labels)
            # The reference switches the task loss to reduction "none" and takes the plain mean.
            main = per_sample.mean() if cfg.free_u0_task_mean == "plain" else losses.task(z, labels)
            return main + losses.aux(z2, labels), per_sample.detach()
        per_sample = alignment_loss(p, prior_feature)
        loss = losses.task(z, labels) + losses.aux(z2, labels) + free_factor * per_sample.mean()
        return loss, per_sample.detach()

    def _training_batches(self, ws: Workspace, split, generator: torch.Generator, replay: list["PrepassBatch"],
                          target: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]):
        """(augmented images, labels, f(x) thunk) of every training batch. With --share_prior_forward
        the first epoch is the pre-pass's batches again: the same index and augmentation (its
        generator state is restored), and the features it computed."""
        cfg = self.cfg
        for batch in replay:
            augment = torch.Generator()
            augment.set_state(batch.augment_state)
            images = ws.augment(split.images[batch.index].to(ws.device), augment)
            yield images, split.labels[batch.index].to(ws.device), (lambda feature=batch.feature: feature)
        for _, index in training_batches(split, cfg.batch_size, cfg.epochs - (1 if replay else 0), generator,
                                         balanced=cfg.instance_sampling):
            images = ws.augment(split.images[index].to(ws.device), generator)
            yield (images, split.labels[index].to(ws.device),
                   (lambda images=images, index=index: target(images, index)))

    def _cached_features(self, ws: Workspace, prior, client: ClientData) -> torch.Tensor:
        """--cache_prior_features: f(x) of the client's un-augmented (normalised) train images,
        computed once per worker. An approximation: the reference aligns p(aug(x)) to f(aug(x))."""
        from fedward.data.augment import normalize

        key = (self.prior_name(client.client_id), client.client_id)
        if key not in ws.prior_features:
            images = client.train.images
            ws.prior_features[key] = torch.cat([
                prior(normalize(images[i:i + 256].to(ws.device), self.spec.mean, self.spec.std))
                for i in range(0, len(images), 256)])
        return ws.prior_features[key]

    def client_update(self, ws: Workspace, client: ClientData, message: ServerMessage, state: dict[str, Any],
                      generator: torch.Generator) -> ClientReply:
        cfg = self.cfg
        model = self.load_start_model(ws, message, state, client)
        prior = self.prior(ws, client.client_id)
        if cfg.prior_bn_drift:
            self._use_client_prior_statistics(ws, prior, client.client_id, state)
        cached = self._cached_features(ws, prior, client) if cfg.cache_prior_features and cfg.free_u != 0 else None

        def target(images: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
            return cached[index.to(cached.device)] if cached is not None else prior(images)

        counts = client.train.class_counts(self.spec.num_classes)
        make = lambda reduction: build_loss(cfg.loss_fn_name, counts.tolist(), reduction=reduction,  # noqa: E731
                                            global_class_counts=self.spec.global_class_counts)
        losses = TaskLosses(make("mean"), make("mean"), make("none"))
        for loss in losses:
            loss.start_round(message.round - 1, cfg.comm_round)
        split = client.train

        before = ClassDivergence(counts)
        replay: list[PrepassBatch] = []
        if cfg.aggregate_method != "avg":
            # Step 1: the received global model's divergence, on the client's augmented train batches.
            if cfg.prior_bn_drift and message.round == 1:
                prior.train()  # the reference's quirk: its prior is in train mode during this first pass
            model.eval()
            prepass = torch_generator(cfg.seed, "mas-prepass", message.round, client.client_id)
            with torch.no_grad():
                for _, index in training_batches(split, cfg.batch_size, 1, prepass, balanced=cfg.instance_sampling):
                    augment_state = prepass.get_state() if cfg.share_prior_forward else None
                    images = ws.augment(split.images[index].to(ws.device), prepass)
                    labels = split.labels[index].to(ws.device)
                    z, p, _ = model.forward_all(images)
                    if cfg.free_u == 0:
                        before.add(losses.per_sample(z, labels).detach(), labels)
                        continue
                    feature = target(images, index)
                    before.add(alignment_loss(p, feature), labels)
                    if cfg.share_prior_forward:
                        replay.append(PrepassBatch(index, augment_state, feature))
            prior.train(False)
            if cfg.prior_bn_drift and message.round == 1:
                state["prior-batchnorm"] = to_cpu(dict(prior.named_buffers()))

        # Step 2: local training, accumulating the divergence during training.
        optimizer = self.kept_optimizer(model.parameters(), state, "optimizer", message.round)
        during = ClassDivergence(counts)
        free_factor = self.free_factor(message.round)
        model.train()
        total, steps = 0.0, 0
        for images, labels, prior_feature in self._training_batches(ws, split, generator, replay, target):
            # The prior runs before the model's forward, not while its activations are held for
            # backward: 11% faster at 224 px (ResNet-50 prior, batch 16; bench/bench_fedmas224.py).
            feature = prior_feature() if cfg.free_u != 0 else None
            z, p, z2 = model.forward_all(images)
            loss, divergence = self.local_objective(losses, z, p, z2, labels, feature, free_factor)
            during.add(divergence, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or CLIP_NORM)
            optimizer.step()
            total += float(loss.detach())
            steps += 1

        if cfg.persist_optimizer_state:
            state["optimizer"] = optimizer.state_dict()
        arrays = to_cpu(model.state_dict())
        kept = LOCAL_HEADS[cfg.update_projector_head]
        if kept:
            state["local-heads"] = {k: v for k, v in arrays.items() if k.startswith(kept)}
        w, w_hat = before.value(), during.value()
        rf = (robust_factor(w, w_hat, inverse=cfg.aggregate_method == "mas_inv", normalise_over=cfg.rf_normalisation)
              if cfg.aggregate_method != "avg" else 1.0)
        metrics = {"num-examples": float(examples_seen(len(split), cfg.batch_size)), "train-loss": total / max(steps, 1),
                   "steps": float(steps), "robust-factor": float(rf)}
        # Logged per round, as the reference sends them for logging: the class-wise divergences.
        for c in range(self.spec.num_classes):
            metrics[f"divergence-before-{c}"] = float(w[c])
            metrics[f"divergence-during-{c}"] = float(w_hat[c])
        return ClientReply(client_id=client.client_id, arrays=arrays, metrics=metrics)

    def aggregation_weights(self, round_index: int, replies: list[ClientReply]) -> list[float]:
        method = self.cfg.aggregate_method
        if method == "avg":  # and under --dp_clip, which needs avg
            return super().aggregation_weights(round_index, replies)
        counts = [r.metrics["num-examples"] for r in replies]
        factors = [r.metrics["robust-factor"] for r in replies]
        if method in ("mas", "mas_inv"):
            return mas_weights(factors)
        return mas_drw_weights(factors, counts, round_index=round_index - 1, total_rounds=self.cfg.comm_round)

    def secure_weighting(self, round_index: int) -> tuple[str | None, float]:
        # RF_k = sum_c p_c q_c of two distributions is at most 1; MAS weights are RF_k / sum_j RF_j.
        if self.cfg.aggregate_method in ("mas", "mas_inv"):
            return "robust-factor", 1.0
        return super().secure_weighting(round_index)
