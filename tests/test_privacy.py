"""privacy: clipping and the noisy holder average against NumPy, noise statistics, and the
accountant against dp_accounting's own computation."""
import functools
import sys

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fiarse_jax.robust import privacy


def make_updates(clients=5, seed=0):
    rng = np.random.default_rng(seed)
    deltas = {"a": rng.normal(size=(clients, 4, 3)).astype(np.float32),
              "b": rng.normal(size=(clients, 6)).astype(np.float32)}
    masks = jax.tree_util.tree_map(lambda d: (rng.random(d.shape) < 0.6).astype(np.float32),
                                   deltas)
    return deltas, masks


def np_clip(deltas, masks, c):
    held = {k: deltas[k] * masks[k] for k in deltas}
    norms = np.sqrt(sum((held[k].reshape(len(held[k]), -1).astype(np.float64) ** 2).sum(1)
                        for k in held))
    factor = np.minimum(1.0, c / np.maximum(norms, 1e-30))
    return {k: held[k] * factor.reshape((-1,) + (1,) * (held[k].ndim - 1)) for k in held}, norms


def test_clip_matches_numpy_bounds_norm_and_keeps_direction():
    deltas, masks = make_updates()
    deltas["a"][1] *= 1e-3  # client 1 is well within the bound
    deltas["b"][1] *= 1e-3
    c = 1.5
    clipped, norms = privacy.clip_updates(deltas, masks, c)
    want, want_norms = np_clip(deltas, masks, c)
    np.testing.assert_allclose(np.asarray(norms), want_norms, rtol=1e-5)
    assert want_norms[1] < c < want_norms.max()
    for k in deltas:
        np.testing.assert_allclose(np.asarray(clipped[k]), want[k], rtol=1e-5, atol=1e-7)
        assert clipped[k].dtype == deltas[k].dtype
        assert np.all(np.asarray(clipped[k])[masks[k] == 0] == 0)   # unheld coordinates: 0
        np.testing.assert_array_equal(np.asarray(clipped[k])[1], (deltas[k] * masks[k])[1])
    def flat(t):
        return np.concatenate([np.asarray(t[k]).reshape(5, -1) for k in sorted(t)], 1)

    new, old = flat(clipped), flat({k: deltas[k] * masks[k] for k in deltas})
    new_norms = np.linalg.norm(new, axis=1)
    assert np.all(new_norms <= c * (1 + 1e-6))
    cos = (new * old).sum(1) / (new_norms * np.linalg.norm(old, axis=1))
    np.testing.assert_allclose(cos, 1.0, rtol=1e-6)


def test_expected_holders_is_q_times_nominal_holders():
    level_masks = {"w": np.array([[1, 1, 1, 0], [1, 1, 0, 0], [1, 0, 0, 0]], np.float32)}
    got = privacy.expected_holders(level_masks, [10, 20, 30], 0.1)
    np.testing.assert_allclose(np.asarray(got["w"]), [6.0, 3.0, 1.0, 0.0], rtol=1e-6)


def average_fn(sigma, clip, divisor):
    return functools.partial(privacy.noisy_holder_average, noise_multiplier=sigma,
                             clip_norm=clip, divisor=divisor)


def test_without_noise_is_sum_over_fixed_divisor():
    deltas, masks = make_updates()
    divisor = {"a": np.full((4, 3), 2.5, np.float32), "b": np.arange(6, dtype=np.float32)}
    out = average_fn(0.0, 1.0, divisor)(deltas, masks, jax.random.key(0))
    for k in deltas:
        total = (deltas[k] * masks[k]).sum(0)
        want = np.where(divisor[k] > 0, total / np.where(divisor[k] > 0, divisor[k], 1), 0)
        np.testing.assert_allclose(np.asarray(out[k]), want, rtol=1e-6, atol=1e-7)
    # a scalar divisor serves every coordinate
    out = average_fn(0.0, 1.0, 4.0)(deltas, masks, jax.random.key(0))
    np.testing.assert_allclose(np.asarray(out["b"]), (deltas["b"] * masks["b"]).sum(0) / 4.0,
                               rtol=1e-6)


def test_noise_statistics_and_unheld_coordinates():
    # R copies of the same 6 coordinates in one leaf: noise is i.i.d. per coordinate, so
    # each column's R values are R independent draws of that coordinate's noisy average.
    rng, clients, reps = np.random.default_rng(0), 5, 4000
    d6 = rng.normal(size=(clients, 1, 6)).astype(np.float32)
    m6 = (rng.random((clients, 1, 6)) < 0.6).astype(np.float32)
    m6[:, :, :2] = 0.0                                  # no sampled client holds columns 0, 1
    deltas, masks = {"w": np.tile(d6, (1, reps, 1))}, {"w": np.tile(m6, (1, reps, 1))}
    div6 = np.array([0.0, 1.5, 2.0, 2.0, 4.0, 0.5], np.float32)
    divisor = {"w": np.tile(div6, (reps, 1))}
    sigma, clip = 0.8, 1.0
    out = jax.jit(average_fn(sigma, clip, divisor))(deltas, masks, jax.random.key(1))
    o = np.asarray(out["w"], np.float64)
    noisy = div6 > 0
    mean_want = (d6 * m6).sum(0)[0][noisy] / div6[noisy]
    std_want = sigma * clip / div6[noisy]
    assert np.all(np.abs(o.mean(0)[noisy] - mean_want) < 4 * std_want / np.sqrt(reps))
    np.testing.assert_allclose(o.std(0)[noisy], std_want, rtol=0.06)
    assert np.all(o[:, 0] == 0.0)   # no level holds it (divisor 0): unchanged, noise-free
    # column 1: held by no sampled client but holdable, so pure noise around 0 — leaving it
    # noise-free would reveal that none of its holders was sampled
    assert mean_want[0] == 0.0


def test_jits_with_traced_noise_multiplier():
    deltas, masks = make_updates()
    f = jax.jit(lambda s, k: privacy.noisy_holder_average(deltas, masks, k, noise_multiplier=s,
                                                          clip_norm=1.0, divisor=3.0))
    a, b = f(0.5, jax.random.key(0)), f(0.5, jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(a["a"]), np.asarray(b["a"]))
    assert not np.array_equal(np.asarray(a["a"]), np.asarray(f(0.5, jax.random.key(1))["a"]))


def reference_epsilon(accountant, rounds, q, sigma, delta):
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), rounds)
    return accountant.compose(event).get_epsilon(delta)


def test_epsilon_matches_dp_accounting_rdp():
    eps = privacy.epsilon_after(100, sampling_rate=0.1, noise_multiplier=1.0, delta=1e-5)
    assert eps == reference_epsilon(dp_accounting.rdp.RdpAccountant(), 100, 0.1, 1.0, 1e-5)
    assert eps == pytest.approx(7.90, abs=0.01)


def test_epsilon_matches_dp_accounting_pld_and_is_tighter():
    eps = privacy.epsilon_after(100, sampling_rate=0.1, noise_multiplier=1.0, delta=1e-5,
                                accountant="pld", pld_discretization=1e-3)
    ref = reference_epsilon(dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-3),
                            100, 0.1, 1.0, 1e-5)
    assert eps == ref
    assert 6.0 < eps < 7.90


def test_epsilon_edge_cases():
    assert privacy.epsilon_after(0, sampling_rate=0.1, noise_multiplier=1.0, delta=1e-5) == 0.0
    assert privacy.epsilon_after(5, sampling_rate=0.1, noise_multiplier=0.0,
                                 delta=1e-5) == float("inf")


def test_calibrate_noise_round_trips():
    target, rounds, q, delta, tol = 3.0, 50, 0.05, 1e-5, 1e-3
    sigma = privacy.calibrate_noise(target, rounds, sampling_rate=q, delta=delta, tol=tol)
    eps = privacy.epsilon_after(rounds, sampling_rate=q, noise_multiplier=sigma, delta=delta)
    assert eps <= target
    assert eps == pytest.approx(target, rel=0.01)
    assert privacy.epsilon_after(rounds, sampling_rate=q, noise_multiplier=sigma - 2 * tol,
                                 delta=delta) > target


@pytest.mark.parametrize("kwargs, bad", [
    (dict(noise_multiplier=-1.0), "-1.0"),
    (dict(noise_multiplier=float("nan")), "nan"),
    (dict(sampling_rate=0.0), "0.0"),
    (dict(sampling_rate=1.5), "1.5"),
    (dict(delta=1.0), "1.0"),
    (dict(delta=0.0), "0.0"),
    (dict(rounds=-3), "-3"),
    (dict(accountant="moments"), "moments"),
])
def test_accountant_rejects_bad_values(kwargs, bad):
    args = dict(rounds=10, sampling_rate=0.1, noise_multiplier=1.0, delta=1e-5) | kwargs
    rounds = args.pop("rounds")
    with pytest.raises(ValueError, match=bad):
        privacy.epsilon_after(rounds, **args)


def test_mechanism_rejects_bad_values():
    deltas, masks = make_updates()
    with pytest.raises(ValueError, match="clip_norm.*0.0"):
        privacy.clip_updates(deltas, masks, 0.0)
    with pytest.raises(ValueError, match="noise_multiplier.*-0.5"):
        average_fn(-0.5, 1.0, 2.0)(deltas, masks, jax.random.key(0))
    with pytest.raises(ValueError, match="divisor.*-2.0"):
        average_fn(1.0, 1.0, -2.0)(deltas, masks, jax.random.key(0))
    with pytest.raises(ValueError, match="target_epsilon.*-1"):
        privacy.calibrate_noise(-1, 10, sampling_rate=0.1, delta=1e-5)
    with pytest.raises(ValueError, match=r"clients_per_level.*\[3, 0\]"):
        privacy.expected_holders({"w": jnp.ones((2, 3))}, [3, 0], 0.1)


def test_missing_dp_accounting_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "dp_accounting", None)
    with pytest.raises(ImportError, match="pip install dp-accounting"):
        privacy.epsilon_after(10, sampling_rate=0.1, noise_multiplier=1.0, delta=1e-5)


def test_clip_and_noisy_sum_ignore_nan_outside_the_mask():
    """NaN·0 = NaN: multiplying by the mask would make the client's norm NaN and wipe its
    whole clipped update. Selecting by the mask gives exactly the update with 0 there."""
    deltas, masks = make_updates()
    clean = {k: np.where(masks[k] > 0, deltas[k], 0).astype(np.float32) for k in deltas}
    dirty = {k: np.where(masks[k] > 0, deltas[k], np.nan).astype(np.float32) for k in deltas}
    dirty["b"][3, masks["b"][3] == 0] = -np.inf
    assert all(np.isnan(dirty[k]).any() for k in dirty)
    c = 1.5
    got, got_norms = privacy.clip_updates(dirty, masks, c)
    want, want_norms = privacy.clip_updates(clean, masks, c)
    ref, ref_norms = np_clip(clean, masks, c)
    np.testing.assert_array_equal(np.asarray(got_norms), np.asarray(want_norms))
    np.testing.assert_allclose(np.asarray(got_norms), ref_norms, rtol=1e-5)
    for k in deltas:
        np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want[k]))
        np.testing.assert_allclose(np.asarray(got[k]), ref[k], rtol=1e-5, atol=1e-7)
    # the server's noisy sum over holders drops what a client sends outside its mask too
    noisy = average_fn(0.5, c, 2.0)
    a, b = noisy(dirty, masks, jax.random.key(4)), noisy(clean, masks, jax.random.key(4))
    for k in deltas:
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]))


# ----------------------------------------------------------------------------- a σ that changed

Q, DELTA = 0.1, 1e-5


@pytest.fixture(scope="module")
def sigmas():
    """σ calibrated for ε = 2 over 100 and over 200 rounds (q = 0.1, δ = 1e-5)."""
    return {n: privacy.calibrate_noise(2.0, n, sampling_rate=Q, delta=DELTA) for n in (100, 200)}


def reference_history(accountant, segments, q, delta):
    """dp_accounting composing each segment's rounds directly (no privacy.py code)."""
    for rounds, sigma in segments:
        accountant.compose(dp_accounting.PoissonSampledDpEvent(
            q, dp_accounting.GaussianDpEvent(sigma)), rounds)
    return accountant.get_epsilon(delta)


def test_epsilon_for_history_composes_the_segments(sigmas):
    """Target 2 over 100 rounds, resumed to 200 and recalibrated: accounting every round at
    the new σ logs 2.00, the rounds actually run at each σ compose to 2.47."""
    s100, s200 = sigmas[100], sigmas[200]
    assert s200 > s100
    history = [(100, s100), (100, s200)]
    eps = privacy.epsilon_for_history(history, sampling_rate=Q, delta=DELTA, accountant="rdp")
    assert eps == pytest.approx(reference_history(dp_accounting.rdp.RdpAccountant(), history,
                                                  Q, DELTA), rel=1e-12)
    assert eps == pytest.approx(2.47, abs=0.01)
    logged = privacy.epsilon_after(200, sampling_rate=Q, noise_multiplier=s200, delta=DELTA)
    assert logged == pytest.approx(2.0, abs=1e-3) and eps > logged + 0.4
    # the same σ twice is 200 rounds at σ100
    same = privacy.epsilon_for_history([(100, s100), (100, s100)], sampling_rate=Q, delta=DELTA)
    assert same == pytest.approx(reference_history(
        dp_accounting.rdp.RdpAccountant(), [(100, s100), (100, s100)], Q, DELTA), rel=1e-12)
    assert same == pytest.approx(privacy.epsilon_after(200, sampling_rate=Q,
                                                       noise_multiplier=s100, delta=DELTA))
    assert same == pytest.approx(2.86, abs=0.01)


def test_epsilon_for_history_pld_matches_dp_accounting():
    history = [(30, 1.0), (20, 2.0)]
    eps = privacy.epsilon_for_history(history, sampling_rate=Q, delta=DELTA, accountant="pld",
                                      pld_discretization=1e-3)
    ref = reference_history(dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-3),
                            history, Q, DELTA)
    assert eps == pytest.approx(ref, rel=1e-6)


def test_epsilon_after_is_the_one_segment_history():
    kw = dict(sampling_rate=Q, delta=DELTA)
    one = privacy.epsilon_for_history([(100, 1.0)], **kw)
    assert one == privacy.epsilon_after(100, noise_multiplier=1.0, **kw)
    assert one == pytest.approx(7.90, abs=0.01)
    assert privacy.epsilon_for_history([(0, 0.0), (100, 1.0), (0, 3.0)], **kw) == one
    assert privacy.epsilon_for_history([], **kw) == 0.0
    assert privacy.epsilon_for_history([(3, 0.0)], **kw) == float("inf")


@pytest.mark.parametrize("segments, message", [
    ([(10, -1.0)], r"segments\[0\] noise_multiplier .*-1.0"),
    ([(10, 1.0), (-2, 1.0)], r"segments\[1\] num_rounds .*-2"),
    ([(10, 1.0, 3)], r"segments\[0\] must be a \(num_rounds, noise_multiplier\) pair"),
])
def test_epsilon_for_history_rejects_bad_segments(segments, message):
    with pytest.raises(ValueError, match=message):
        privacy.epsilon_for_history(segments, sampling_rate=Q, delta=DELTA)


def test_calibrate_remaining_keeps_the_whole_run_within_the_target(sigmas):
    s100 = sigmas[100]
    tol = 1e-4
    for target in (2.0, 3.0):
        sigma = privacy.calibrate_remaining(target, [(100, s100)], 100, sampling_rate=Q,
                                            delta=DELTA, accountant="rdp", tol=tol)
        history = [(100, s100), (100, sigma)]
        eps = reference_history(dp_accounting.rdp.RdpAccountant(), history, Q, DELTA)
        assert eps <= target and eps == pytest.approx(target, rel=1e-3)
        assert (sigma > s100) == (target == 2.0)   # ε = 2 spent already: far more noise
        assert reference_history(dp_accounting.rdp.RdpAccountant(),
                                 [(100, s100), (100, sigma - 2 * tol)], Q, DELTA) > target
    # resumed half-way with the same num_rounds: σ stays (within tol)
    half = privacy.calibrate_remaining(2.0, [(50, s100)], 50, sampling_rate=Q, delta=DELTA,
                                       tol=tol)
    assert half == pytest.approx(s100, abs=2 * tol)


def test_calibrate_remaining_with_nothing_spent_is_calibrate_noise():
    kw = dict(sampling_rate=0.05, delta=DELTA, tol=1e-3)
    want = privacy.calibrate_noise(3.0, 50, **kw)
    assert privacy.calibrate_remaining(3.0, [], 50, **kw) == want
    assert privacy.calibrate_remaining(3.0, [(0, 0.0)], 50, **kw) == want


def test_calibrate_remaining_refuses_a_spent_budget(sigmas):
    spent = [(200, sigmas[100])]          # ε ≈ 2.86
    with pytest.raises(ValueError, match=r"spent ε = 2\.86\d* ≥ target_epsilon = 2 "):
        privacy.calibrate_remaining(2.0, spent, 100, sampling_rate=Q, delta=DELTA)
    with pytest.raises(ValueError, match=r"spent ε = 2\.86\d* ≥ target_epsilon = 2 "):
        privacy.calibrate_remaining(2.0, spent, 0, sampling_rate=Q, delta=DELTA)
    with pytest.raises(ValueError, match=r"spent ε = inf ≥ target_epsilon = 2 "):
        privacy.calibrate_remaining(2.0, [(5, 0.0)], 10, sampling_rate=Q, delta=DELTA)
    # nothing left to run, within budget: no noise needed
    assert privacy.calibrate_remaining(3.0, spent, 0, sampling_rate=Q, delta=DELTA) == 0.0
