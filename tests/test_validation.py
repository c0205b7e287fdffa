"""validation.validate_updates: attacks caught, honest clients accepted, and the
accepted set feeding every aggregator keeps non-finite updates out."""
import chex
import jax
import numpy as np
import pytest

from fiarse_jax.robust.aggregators import AGGREGATORS, aggregate_deltas
from fiarse_jax.robust.validation import REASONS, robust_z, validate_updates

N = 10
LEVELS = np.array([0] * 5 + [1] * 5)
OK, NON_FINITE, NORM, DIRECTION = (REASONS.index(r)
                                   for r in ("ok", "non_finite", "norm_outlier", "direction"))
OPTIONS = {"mean": {}, "median": {}, "trimmed_mean": {"beta": 0.2},
           "norm_bounded": {"max_norm": 1.0}, "multi_krum": {"num_byzantine": 2}}


def honest_updates(seed=0):
    """Level-1 clients hold the top half of "kernel"; everyone holds "scale"."""
    rng = np.random.default_rng(seed)
    base = {"kernel": rng.normal(size=(8, 3)), "scale": rng.normal(size=(4,))}
    masks = {"kernel": np.ones((N, 8, 3), np.float32), "scale": np.ones((N, 4), np.float32)}
    masks["kernel"][LEVELS == 1, 4:] = 0
    deltas = jax.tree_util.tree_map(
        lambda b, m: ((b + 0.3 * rng.normal(size=m.shape)) * m).astype(np.float32), base, masks)
    return deltas, masks


def attacked_updates():
    deltas, masks = honest_updates()
    deltas["kernel"][0, 0, 0] = np.nan      # level 0, non-finite on a held coordinate
    deltas["scale"][1, 2] = np.inf          # level 0
    for leaf in deltas.values():
        leaf[3] *= 50.0                     # level 0, norm outlier
        leaf[6] *= -1.0                     # level 1, sign flipped
    deltas["kernel"][8, 7, 0] = np.nan      # level 1, but outside its mask: ignored
    return deltas, masks


EXPECTED = [NON_FINITE, NON_FINITE, OK, NORM, OK, OK, DIRECTION, OK, OK, OK]


def test_honest_clients_are_accepted():
    accepted, reason = validate_updates(*honest_updates(), LEVELS)
    np.testing.assert_array_equal(reason, np.zeros(N))
    assert accepted.all()


def test_attacks_are_caught_with_their_reason_under_jit():
    deltas, masks = attacked_updates()
    accepted, reason = jax.jit(lambda d, m, l: validate_updates(d, m, l))(deltas, masks, LEVELS)
    np.testing.assert_array_equal(reason, EXPECTED)
    np.testing.assert_array_equal(accepted, np.array(EXPECTED) == OK)
    assert reason.dtype == np.int32 and accepted.dtype == bool


@pytest.mark.parametrize("name", sorted(AGGREGATORS))
def test_accepted_clients_aggregate_like_the_honest_ones_alone(name):
    deltas, masks = attacked_updates()
    accepted, _ = validate_updates(deltas, masks, LEVELS)
    agg, counts = aggregate_deltas(name, deltas, masks, client_weights=accepted, **OPTIONS[name])
    assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(agg))
    keep = np.array(EXPECTED) == OK
    honest = jax.tree_util.tree_map(lambda x: x[keep], (deltas, masks))
    if name == "multi_krum":   # m = p − f over the accepted: its picks among them (NumPy)
        from test_aggregators import np_krum_select
        f = OPTIONS[name]["num_byzantine"]
        picked = np_krum_select(*honest, f, int(keep.sum()) - f)
        want = aggregate_deltas("mean", *honest, client_weights=picked.astype(np.float32))
    else:
        want = aggregate_deltas(name, *honest, **OPTIONS[name])
    chex.assert_trees_all_close((agg, counts), want, rtol=1e-5, atol=1e-6)


def test_small_level_is_not_norm_tested():
    deltas, masks = honest_updates()
    levels = np.array([0] * 8 + [1] * 2)
    for leaf in deltas.values():
        leaf[9] *= 50.0  # alone with one peer in level 1: no norm test, same direction
    _, reason = validate_updates(deltas, masks, levels)
    np.testing.assert_array_equal(reason, np.zeros(N))
    _, reason = validate_updates(deltas, masks, np.zeros(N, int))  # one level of 10: caught
    assert reason[9] == NORM


def test_tests_can_be_disabled_and_reference_given():
    deltas, masks = attacked_updates()
    _, reason = validate_updates(deltas, masks, LEVELS, z_threshold=None, cosine_threshold=None)
    np.testing.assert_array_equal(reason, [NON_FINITE, NON_FINITE] + [OK] * 8)
    deltas, masks = honest_updates()
    against = jax.tree_util.tree_map(lambda d: -d.mean(axis=0), deltas)
    _, reason = validate_updates(deltas, masks, LEVELS, reference=against)
    np.testing.assert_array_equal(reason, [DIRECTION] * N)


def test_robust_z_floor_covers_zero_mad():
    norms = np.array([1.0, 1.0, 1.0, 1.0, 50.0, 2.0, 2.0, 2.0, 0.0, 0.0, 0.0])
    groups = np.array([0, 0, 0, 0, 0, 1, 1, 1, 2, 2, 2])
    z, size = robust_z(norms, groups, np.ones(11, bool), 0.1)
    np.testing.assert_array_equal(size, [5] * 5 + [3] * 6)
    # group 0: MAD = 0, scale = 0.1 · median 1; groups 1, 2: no spread at all → z = 0
    np.testing.assert_allclose(z, [0, 0, 0, 0, 490, 0, 0, 0, 0, 0, 0], rtol=1e-5)
    z, _ = robust_z(norms, groups, np.arange(11) != 4, 0.0)  # invalid entries do not vote
    np.testing.assert_allclose(z, 0.0)


def test_robust_z_matches_numpy():
    rng = np.random.default_rng(1)
    norms, groups = rng.random(9) * 3, np.array([0, 1, 0, 1, 0, 1, 0, 1, 2])
    z, _ = robust_z(norms, groups, np.ones(9, bool), 0.1)
    for i in range(9):
        peers = norms[groups == groups[i]]
        med = np.median(peers)
        scale = max(1.4826 * np.median(np.abs(peers - med)), 0.1 * med)
        np.testing.assert_allclose(z[i], abs(norms[i] - med) / scale, rtol=1e-5)


@pytest.mark.parametrize("kwargs,message", [
    ({"z_threshold": 0.0}, r"z_threshold = 0.0 must be > 0 or None"),
    ({"min_spread": -1}, r"min_spread = -1 must be a finite number ≥ 0"),
    ({"cosine_threshold": 1.5}, r"cosine_threshold = 1.5 must be in \[-1, 1\] or None"),
])
def test_bad_thresholds_are_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        validate_updates(*honest_updates(), LEVELS, **kwargs)


def test_levels_shape_is_checked():
    with pytest.raises(ValueError, match=r"levels has shape \(3,\); expected \(10,\)"):
        validate_updates(*honest_updates(), np.zeros(3, int))


@pytest.mark.parametrize("dp_field", [("dp.noise_multiplier", 1.0), ("dp.target_epsilon", 4.0)])
def test_dp_refuses_the_norm_and_direction_screens(dp_field):
    """The norm/direction screens accept a client by the others' updates: DP's sensitivity
    bound (one client moves the sum by ≤ C) no longer holds, so the combination is refused;
    DP alone and the screens alone are fine (the non-finite screen runs either way)."""
    import os
    import sys
    sys.path.insert(0, os.path.dirname(__file__))
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "configs"))
    import default as default_config
    from helpers import override

    from fiarse_jax.experiment.config import ConfigError, validate_config

    field, value = dp_field
    validate_config(override(default_config.get_config(), **{field: value}))
    validate_config(override(default_config.get_config(), **{"server.validate": True}))
    cfg = override(default_config.get_config(), **{field: value, "server.validate": True})
    with pytest.raises(ConfigError, match=r"^config\.server\.validate = True: the norm and "
                       r"direction screens accept a client by the other clients' updates, "
                       r"which voids DP's sensitivity bound; set it False with dp\.\*"):
        validate_config(cfg)
