"""Fidelity fixes: what is evaluated is what was trained, configs that cannot work stop
early, and DP accounting stays true across a resume that changes σ."""
import json
import os
import sys

import numpy as np
import pytest

from fiarse_jax.experiment import build, train
from fiarse_jax.experiment.config import ConfigError, round_options, validate_config
from fiarse_jax.federated import algorithm

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "configs"))
import default as default_config  # noqa: E402


def test_fedrolex_is_scored_on_the_window_it_trained_last():
    """After R rounds the evaluation's window is round R−1's: it starts at unit R−1."""
    c = default_config.get_config()
    c.method = "fedrolex"
    run = build.build_run(c)
    for rounds_done in (1, 3, 200):
        units = np.asarray(run.eval_state(run.init_params, rounds_done)["units"]["Dense_0"])
        size = units.shape[1]
        for lvl in range(units.shape[0]):
            kept = np.flatnonzero(units[lvl] > 0)
            k = len(kept)
            expected = np.roll(np.arange(size), -((rounds_done - 1) % size))[:k]
            assert sorted(kept.tolist()) == sorted(expected.tolist()), (rounds_done, lvl)


def test_heterofl_scaler_without_a_norm_layer_stops_at_config_time():
    c = default_config.get_config()
    c.method, c.heterofl.scaler = "heterofl", True
    with pytest.raises(ConfigError, match=r"config.heterofl.scaler = True: model 'mlp' has no "
                                          r"normalisation layer"):
        validate_config(c)
    c.model.name, c.model.hidden_sizes = "cnn", (32,)
    with pytest.raises(ConfigError, match="model 'cnn' has no normalisation"):
        validate_config(c)
    c.heterofl.scaler = False
    validate_config(c)


def _dp_config(rounds):
    c = default_config.get_config()
    c.num_rounds, c.eval_every, c.checkpoint_every = rounds, rounds, 3
    c.dp.target_epsilon = 2.0
    # Test sets scored one sample per batch: one compile of the scorer per run, not one per
    # remainder length (the MLP has no batch statistics: the same numbers).
    c.eval.batch_size = 1
    return c


def _composed(segments, q, delta):
    """ε of the segments, composed with dp-accounting directly (an independent reference)."""
    import dp_accounting
    acc = dp_accounting.rdp.RdpAccountant()
    for n, sigma in segments:
        acc.compose(dp_accounting.PoissonSampledDpEvent(
            q, dp_accounting.GaussianDpEvent(sigma)), int(n))
    return acc.get_epsilon(delta)


def test_dp_epsilon_after_a_resume_that_changes_num_rounds_is_the_true_composition(tmp_path):
    """3 rounds at σ₃ (calibrated to ε = 2 over 3 rounds), resumed to 6: the last 3 rounds
    get the σ that keeps the whole run at ε ≤ 2, and the logged ε is the composition of
    both segments (not 6 rounds at the new σ)."""
    w = str(tmp_path / "run")
    first = train.train_and_evaluate(_dp_config(3), w, progress=False)
    q, delta = 10 / 50, 1e-5
    sigma3 = first["dp"]["noise_multiplier"]
    assert first["dp"]["segments"] == [[3, sigma3]]
    resumed = train.train_and_evaluate(_dp_config(6), w, progress=False)
    sigma_new = resumed["dp"]["noise_multiplier"]
    assert sigma_new > sigma3
    assert resumed["dp"]["segments"] == [[3, sigma3], [3, sigma_new]]
    rows = [json.loads(l) for l in open(os.path.join(w, "rounds.jsonl"))]
    eps = [r["dp_epsilon"] for r in rows]
    for i, e in enumerate(eps[3:], start=1):
        assert e == pytest.approx(_composed([(3, sigma3), (i, sigma_new)], q, delta), rel=1e-6)
    assert eps[-1] <= 2.0 + 1e-3 and eps[-1] == pytest.approx(2.0, abs=0.02)
    # What the old code logged: all six rounds at the new σ, an under-report.
    assert _composed([(6, sigma_new)], q, delta) < eps[-1] - 0.01


def _sigma(config, spent=None, planned_rounds=None) -> float:
    """``algorithm.noise_multiplier`` on ``config``'s typed options."""
    o = round_options(config)
    return algorithm.noise_multiplier(o.dp, o.schedule, spent, planned_rounds)


def test_dp_resume_of_the_planned_run_keeps_sigma_exactly():
    """A resume that keeps num_rounds continues at the checkpoint's σ bit for bit (even one
    recalibrated earlier), and a run without a target keeps its fixed σ."""
    c = _dp_config(6)
    assert _sigma(c, [[3, 1.2345], [2, 3.456789]], planned_rounds=6) == 3.456789
    c.dp.target_epsilon, c.dp.noise_multiplier = 0.0, 0.7
    assert _sigma(c, [[3, 0.7]], planned_rounds=3) == 0.7


def test_dp_resume_refuses_a_target_already_spent():
    c = _dp_config(6)
    sigma3 = _sigma(_dp_config(3))
    with pytest.raises(ConfigError, match="config.dp.target_epsilon = 2.0: .*spent"):
        _sigma(c, [[3, sigma3 / 4]], planned_rounds=3)
