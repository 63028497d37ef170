"""Differential privacy. Client level: clipping and noise by hand, ε against the RDP formula of the
Gaussian mechanism computed here, and a run whose global model moves by at most the bound.
Per-sample DP-SGD: Opacus's step against per-image gradients clipped by hand, its noise's std,
each client's ε from its own steps, and a resumed run that ends where the uninterrupted one does."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from fedward.algorithms.privacy import clip_update, epsilon, noise_std, private_average, privacy_summary
from fedward.config import build_config
from fedward.engine.simulation import prepare, run
from fedward.errors import ConfigError


def test_clipping_scales_the_update_to_the_bound_by_hand():
    start = {"w": torch.tensor([1.0, 1.0]), "b": torch.tensor([0.0]), "n": torch.tensor(3)}
    trained = {"w": torch.tensor([4.0, 1.0]), "b": torch.tensor([4.0]), "n": torch.tensor(7)}  # update (3, 0, 4): norm 5
    clipped = clip_update(trained, start, 1.0)
    assert torch.allclose(clipped["w"], torch.tensor([1.6, 1.0])) and torch.allclose(clipped["b"], torch.tensor([0.8]))
    assert clipped["n"].item() == 7  # an integer counter is sent as trained
    assert clip_update(trained, start, 10.0) == trained  # inside the bound: unchanged


def test_the_private_average_has_equal_weights_and_noise_of_std_sigma_c_over_m():
    states = [{"x": torch.zeros(20_000)}, {"x": torch.full((20_000,), 2.0)}, {"x": torch.full((20_000,), 4.0)}]
    plain, weights = private_average(states, bound=3.0, noise_multiplier=0.0, seed=0, round_index=1)
    assert weights == [1 / 3] * 3 and torch.allclose(plain["x"], torch.full((20_000,), 2.0))
    noisy, _ = private_average(states, bound=3.0, noise_multiplier=2.0, seed=0, round_index=1)
    noise = noisy["x"] - 2.0
    assert noise_std(2.0, 3.0, 3) == 2.0
    assert abs(float(noise.std()) - 2.0) < 0.05 and abs(float(noise.mean())) < 0.05  # 20,000 draws
    again, _ = private_average(states, bound=3.0, noise_multiplier=2.0, seed=0, round_index=1)
    other, _ = private_average(states, bound=3.0, noise_multiplier=2.0, seed=0, round_index=2)
    assert torch.equal(again["x"], noisy["x"]) and not torch.equal(other["x"], noisy["x"])


def test_epsilon_of_the_full_participation_gaussian_mechanism_by_hand():
    # Every client every round (q = 1): T rounds of the Gaussian mechanism have RDP T a / (2 sigma^2)
    # at order a; converted to (eps, delta) as Balle et al. 2020, minimised over the accountant's orders.
    sigma, rounds, delta = 1.5, 20, 1e-5
    orders = np.array([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)), dtype=float)
    rdp = rounds * orders / (2 * sigma ** 2)
    by_hand = np.min(rdp - (np.log(delta) + np.log(orders)) / (orders - 1) + np.log((orders - 1) / orders))
    assert epsilon(sigma, 1.0, rounds, delta) == pytest.approx(by_hand, rel=1e-9)
    assert epsilon(sigma, 0.25, rounds, delta) < by_hand  # sampling amplifies privacy
    assert math.isinf(epsilon(0.0, 1.0, rounds, delta))


@pytest.mark.parametrize("values, text", [
    ({"dp_noise_multiplier": 1.0}, "--dp_noise_multiplier needs --dp_clip"),
    ({"method": "scaffold", "dp_clip": 1.0}, "--dp_clip does not apply to --method scaffold: its replies carry control"),
    ({"method": "cyclic", "dp_clip": 1.0}, "--dp_clip does not apply to --method cyclic"),
    ({"method": "fedmas", "dp_clip": 1.0, "aggregate_method": "mas", "free_u": 1, "pre_trained_models": "random"},
     "the MAS weights come from"),
    ({"dp_delta": 1e-6}, "--dp_delta applies with --dp_clip"),
    ({"method": "ditto", "dp_clip": 1.0}, "dp_clip"),
    ({"dp_sgd_noise_multiplier": 1.0}, "--dp_sgd_noise_multiplier needs --dp_sgd_clip"),
    ({"method": "fedprox", "dp_sgd_clip": 1.0}, "--dp_sgd_clip does not apply to --method fedprox: its proximal"),
    ({"method": "scaffold", "dp_sgd_clip": 1.0}, "--dp_sgd_clip does not apply to --method scaffold"),
    ({"method": "moon", "dp_sgd_clip": 1.0}, "--dp_sgd_clip does not apply to --method moon"),
    ({"dp_sgd_clip": 1.0, "grad_clip": 5.0}, "--grad_clip with --dp_sgd_clip"),
    ({"dp_sgd_clip": 1.0, "dp_clip": 1.0}, "choose client-level or per-sample"),
    ({"method": "local", "dp_sgd_clip": 1.0}, "dp_sgd_clip"),
    ({"dp_sgd_clip": 1.0, "pre_trained_tv": "w.pth"}, "--pre_trained_tv with --dp_sgd_clip"),
    ({"dp_sgd_clip": 1.0, "instance_sampling": True}, "--instance_sampling with --dp_sgd_clip"),
])
def test_dp_settings_that_cannot_hold_are_refused(tiny_values, values, text):
    with pytest.raises(ConfigError, match=text):
        build_config({**tiny_values, **values})


def test_a_private_run_moves_the_global_model_by_at_most_the_bound_and_reports_epsilon(tiny_values, tmp_path):
    cfg = build_config({**tiny_values, "comm_round": 1, "dp_clip": 0.05, "dp_noise_multiplier": 0.0,
                        "keep_checkpoint": True, "output": str(tmp_path / "clip")})
    run_dir, data = prepare(cfg)
    from fedward.engine.setup import initial_global_state, model_builder, task_spec

    start, _ = initial_global_state(cfg, model_builder(cfg, task_spec(data)))
    run(cfg, run_dir, data=data)
    final = torch.load(run_dir.final_model_path, weights_only=False)["state_dict"]
    moved = math.sqrt(sum(float((final[k].double() - start[k].double()).pow(2).sum())
                          for k in final if final[k].is_floating_point()))
    assert 0 < moved <= 0.05 + 1e-6  # the average of updates of norm <= C
    rows = [json.loads(line) for line in (run_dir.path / "metrics.jsonl").read_text().splitlines()]
    weights = next(r["weights"] for r in rows if r.get("scope") == "aggregation")
    assert weights == pytest.approx([1 / len(weights)] * len(weights))
    results = json.loads(run_dir.results_path.read_text())
    assert results["privacy"]["epsilon"] is None and results["privacy"]["clip"] == 0.05  # no noise: no guarantee

    noisy = build_config({**tiny_values, "comm_round": 2, "dp_clip": 0.05, "dp_noise_multiplier": 1.2,
                          "clients_per_round": 3, "output": str(tmp_path / "noisy")})
    run_dir, data = prepare(noisy)
    run(noisy, run_dir, data=data)
    privacy = json.loads(run_dir.results_path.read_text())["privacy"]
    assert privacy == privacy_summary(noisy.to_dict(), len(data.clients))
    assert privacy["epsilon"] == pytest.approx(epsilon(1.2, 3 / len(data.clients), 2, 1e-5))
    assert privacy["noise_std"] == pytest.approx(1.2 * 0.05 / 3)
    assert "client-level DP: clip 0.05" in (run_dir.path / "report.html").read_text()


def _per_sample_setup(seed=0):
    from fedward.algorithms.privacy import per_sample_model
    from fedward.models import get_model

    model = per_sample_model(get_model("smallcnn", num_classes=3, generator=torch.Generator().manual_seed(seed)))
    images = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 1, 2, 1])
    return model, images, labels


def _dp_step(model, images, labels, *, clip, sigma, noise_seed=0):
    """One SGD step at lr 1 under PerSampleStep; returns the step (start - after) per parameter."""
    from fedward.algorithms.privacy import PerSampleStep

    start = [p.detach().clone() for p in model.parameters()]
    private = PerSampleStep(model, torch.optim.SGD(model.parameters(), lr=1.0), clip=clip, noise_multiplier=sigma,
                            batch_size=len(labels), generator=torch.Generator().manual_seed(noise_seed))
    private.optimizer.zero_grad(set_to_none=True)
    torch.nn.functional.cross_entropy(private.model(images), labels).backward()
    private.optimizer.step()
    private.close()
    step = [s - p.detach() for s, p in zip(start, model.parameters())]
    with torch.no_grad():
        for p, s in zip(model.parameters(), start):
            p.copy_(s)
    return step


def test_dp_sgd_averages_per_image_gradients_clipped_by_hand():
    model, images, labels = _per_sample_setup()
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())  # GroupNorm instead
    clip = 0.05  # below every image's gradient norm: each one is scaled
    by_hand = []
    for i in range(len(labels)):
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(images[i:i + 1]), labels[i:i + 1]).backward()
        grads = [p.grad.clone() for p in model.parameters()]
        norm = math.sqrt(sum(float(g.pow(2).sum()) for g in grads))
        assert norm > clip
        by_hand.append([g * (clip / norm) for g in grads])
    model.zero_grad()
    expected = [sum(g[j] for g in by_hand) / len(labels) for j in range(len(by_hand[0]))]
    step = _dp_step(model, images, labels, clip=clip, sigma=0.0)
    assert max(float((s - e).abs().max()) for s, e in zip(step, expected)) < 1e-6
    assert not any(getattr(p, "grad_sample", None) is not None for p in model.parameters())  # hooks gone
    assert not model._forward_hooks and all(not m._forward_hooks for m in model.modules())


def test_dp_sgd_noise_has_std_sigma_c_over_the_batch_size():
    model, images, labels = _per_sample_setup()
    plain = _dp_step(model, images, labels, clip=0.05, sigma=0.0)
    noisy = _dp_step(model, images, labels, clip=0.05, sigma=2.0)
    noise = torch.cat([(n - p).flatten() for n, p in zip(noisy, plain)])
    assert noise.numel() > 4000
    assert float(noise.std()) == pytest.approx(2.0 * 0.05 / 4, rel=0.05) and abs(float(noise.mean())) < 0.002
    again = _dp_step(model, images, labels, clip=0.05, sigma=2.0)
    assert all(torch.equal(a, b) for a, b in zip(again, noisy))  # the same generator seed: the same noise


def test_a_dp_sgd_run_reports_each_clients_epsilon_from_its_steps_and_resumes_to_the_same_model(tiny_values, tmp_path):
    from fedward.algorithms.privacy import per_sample_epsilon
    from fedward.tracking import RunDirectory

    values = {**tiny_values, "comm_round": 2, "dp_sgd_clip": 1.0, "dp_sgd_noise_multiplier": 1.1}
    full = build_config({**values, "output": str(tmp_path / "full")})
    run_dir, data = prepare(full)
    run(full, run_dir, data=data)
    results = json.loads(run_dir.results_path.read_text())["per_sample_privacy"]
    batch = full.batch_size
    for client in data.clients:
        steps = 2 * full.epochs * max(1, len(client.train) // batch)  # rounds x epochs x batches (one if n < B)
        by_hand = per_sample_epsilon(1.1, batch, len(client.train), steps, 1e-5)
        assert results["epsilon_per_client"][str(client.client_id)] == pytest.approx(by_hand)
    assert results["epsilon"] == max(results["epsilon_per_client"].values())
    assert "per-sample DP-SGD: clip 1" in (run_dir.path / "report.html").read_text()
    final = torch.load(run_dir.final_model_path, weights_only=False)["state_dict"]
    assert not any("running_mean" in key for key in final)  # GroupNorm: no batch statistics to send

    class Crash(Exception):
        pass

    def crash(round_index):
        if round_index == 1:
            raise Crash

    stopped = build_config({**values, "output": str(tmp_path / "stopped")})
    stopped_dir, _ = prepare(stopped)
    with pytest.raises(Crash):
        run(stopped, stopped_dir, data=data, on_round_end=crash)
    run(stopped, RunDirectory.open_existing(stopped_dir.path), resume=True)
    resumed = torch.load(stopped_dir.final_model_path, weights_only=False)["state_dict"]
    assert all(torch.equal(final[k], resumed[k]) for k in final)
    assert json.loads(stopped_dir.results_path.read_text())["per_sample_privacy"] == results
