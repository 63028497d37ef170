"""What the self-trained MoCo-v2 prior's features know about the classes, before and after training,
for MoCo-v2's augmentation and gentler variants (the ``--pre_trained_models auto`` prior).

For each variant: a ResNet-18 MoCo-v2 training on the built-in data set's public split (3072
images, 32 px, 10 epochs, MoCo-v2's recipe changed as the variant says), then, on the frozen backbone's pooled
features (L2-normalised, un-augmented images):
- kNN: leave-one-out 20-NN accuracy on the public split (MoCo's monitor);
- probe: balanced accuracy on the clients' pooled test split of a logistic regression fitted on
  the public split's features (labels used for evaluation only; the training never sees them);
- the InfoNCE loss of the first and last epoch and the contrastive accuracy (the share of queries
  whose own key scores highest), which show whether the training itself went well.
"before" is the training's own initial weights (the untrained network of the same seed).

Usage: python bench/bench_prior.py [--variants moco-v2 no-colour ...] [--epochs 10] [--out DIR]
(a variant's checkpoint in DIR is reused, or resumed when its training was interrupted)
Prints a Markdown table and writes it to DIR/prior.md.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score

from fedward.config import build_config
from fedward.data.synthetic import public_split
from fedward.engine.setup import load_data
from fedward.selfsup.cached import PRIOR_CHANGES, PUBLIC_IMAGES, PUBLIC_SEED, moco_v2_settings
from fedward.selfsup.moco import MocoModel, embed_images, knn_accuracy, train_moco

VARIANTS = {
    "moco-v2": {},  # MoCo-v2's aug+: crops down to 20%, colour jitter p 0.8, greyscale p 0.2
    "no-colour": {"jitter_p": 0.0, "grayscale_p": 0.0},
    "crop-50": {"crop_min": 0.5},
    "no-colour, crop-50": {"jitter_p": 0.0, "grayscale_p": 0.0, "crop_min": 0.5},
    # A queue of 4 batches instead of half the images: with 3072 images a queue of 1536 keys holds a
    # stale key of about every second image of the current batch, as a negative.
    "queue-256": {"queue_size": 256},
    "no-colour, crop-50, queue-256": PRIOR_CHANGES,  # the cached `auto` prior's settings
}


def features(encoder, images: torch.Tensor) -> np.ndarray:
    return embed_images(encoder, images).numpy()


def probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray) -> float:
    classifier = LogisticRegression(max_iter=3000, C=1.0).fit(train_x, train_y)
    return float(balanced_accuracy_score(test_y, classifier.predict(test_x)))


def scores(encoder, public, test) -> dict[str, float]:
    public_x, test_x = features(encoder, public.images), features(encoder, test.images)
    return {"knn": knn_accuracy(torch.from_numpy(public_x), public.labels),
            "probe": probe(public_x, public.labels.numpy(), test_x, test.labels.numpy())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--epochs", type=int, default=None, help="MoCo epochs (default: the cached prior's)")
    parser.add_argument("--image_size", type=int, default=32)
    parser.add_argument("--out", type=Path, default=Path("runs/bench-prior"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    public = public_split(seed=PUBLIC_SEED, image_size=args.image_size, count=PUBLIC_IMAGES)
    cfg = build_config({"image_size": args.image_size, "data_scale": 0.1, "progress": False})
    test = load_data(cfg).pooled("test")
    base = moco_v2_settings(args.image_size)
    if args.epochs is not None:
        base = replace(base, epochs=args.epochs)
    untrained = MocoModel(base, base.resolved_queue_size(len(public))).encoder_q
    before = scores(untrained, public, test)
    lines = [f"MoCo-v2 ResNet-18 on {len(public)} public images, {args.image_size} px, {base.epochs} epochs; "
             f"features scored on the public split (kNN) and the clients' pooled test split ({len(test)} images, "
             "probe fitted on the public split).", "",
             "| variant | kNN before | kNN after | probe BA before | probe BA after | InfoNCE, epoch 1 -> last | "
             "contrastive acc., best / last | minutes |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name in args.variants:
        settings = replace(base, **VARIANTS[name])
        path = args.out / f"{name.replace(', ', '+')}.pth.tar"
        started = time.perf_counter()
        done = path.exists() and torch.load(path, map_location="cpu", weights_only=True, mmap=True)["epoch"] >= settings.epochs
        if not done:  # a checkpoint is written after every epoch: an interrupted training resumes
            train_moco(public.images, settings, path, resume=path.exists(), progress=False, log=print)
        minutes = (time.perf_counter() - started) / 60
        payload = torch.load(path, map_location="cpu", weights_only=True)
        model = MocoModel(settings, settings.resolved_queue_size(len(public)))
        model.load_state_dict({k.removeprefix("module."): v for k, v in payload["state_dict"].items()})
        after = scores(model.encoder_q, public, test)
        history = payload["fedward"]["history"]
        lines.append(f"| {name} | {before['knn']:.3f} | {after['knn']:.3f} | {before['probe']:.3f} | "
                     f"{after['probe']:.3f} | {history[0]['loss']:.2f} -> {history[-1]['loss']:.2f} | "
                     f"{max(h['contrastive_accuracy'] for h in history):.2f} / {history[-1]['contrastive_accuracy']:.2f} | "
                     f"{minutes:.1f} |")
        print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    (args.out / "prior.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
