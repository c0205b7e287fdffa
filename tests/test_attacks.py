"""attacks: seeded attacker choice, each update attack against a NumPy expectation, and
label flipping."""
from statistics import NormalDist

import jax
import numpy as np
import pytest

from fiarse_jax.robust import attacks, validation

ATTACKERS = np.array([True, False, True, False, False, True])
# Rows 0 and 5 (attackers) sit at levels 0 and 3, which have no honest row; row 2 shares level 1
# with the two honest rows 1 and 3 (an even count: the median is the mean of the middle two).
LEVELS = np.array([0, 1, 1, 1, 2, 3])


def make_updates(seed=0):
    rng = np.random.default_rng(seed)
    n = len(ATTACKERS)
    deltas = {"a": rng.normal(size=(n, 20, 30)).astype(np.float32),
              "b": rng.normal(size=(n, 7)).astype(np.float32)}
    masks = jax.tree_util.tree_map(lambda d: (rng.random(d.shape) < 0.5).astype(np.float32),
                                   deltas)
    return deltas, masks


def run(kind, deltas, masks, **kwargs):
    return attacks.attack_updates(kind, deltas, masks, ATTACKERS, jax.random.key(0), **kwargs)


def expected_rows(kind, d, m, stale=None, scale=10.0):
    """The attackers' rows of one leaf as the module doc specifies (gaussian excluded)."""
    held = m > 0
    if kind == "none":
        return d
    if kind == "sign_flip":
        return -d
    if kind == "scale":
        return scale * d
    if kind == "free_rider":
        return np.zeros_like(d) if stale is None else stale
    flat = np.arange(d[0].size).reshape(d.shape[1:])
    bad = np.broadcast_to(np.where(flat % 2 == 0, np.nan, np.inf), d.shape)
    return np.where(held, bad, d)


@pytest.mark.parametrize("kind", ["none", "sign_flip", "scale", "free_rider", "nan"])
def test_deterministic_kinds_change_exactly_the_attackers_rows(kind):
    deltas, masks = make_updates()
    out = run(kind, deltas, masks, scale=-3.0)
    for k in deltas:
        got, d = np.asarray(out[k]), deltas[k]
        np.testing.assert_array_equal(got[~ATTACKERS], d[~ATTACKERS])
        want = expected_rows(kind, d, masks[k], scale=-3.0)
        np.testing.assert_array_equal(got[ATTACKERS], want[ATTACKERS])
    if kind == "nan":
        held = masks["a"][ATTACKERS] > 0
        bad = np.asarray(out["a"])[ATTACKERS][held]
        assert np.isnan(bad).any() and np.isposinf(bad).any() and not np.isfinite(bad).any()


def test_free_rider_replays_stale_update():
    deltas, masks = make_updates()
    stale, _ = make_updates(seed=1)
    out = run("free_rider", deltas, masks, stale=stale)
    for k in deltas:
        want = np.where(ATTACKERS.reshape((-1,) + (1,) * (deltas[k].ndim - 1)), stale[k],
                        deltas[k])
        np.testing.assert_array_equal(np.asarray(out[k]), want)


def test_gaussian_replaces_held_coordinates_with_noise():
    deltas, masks = make_updates()
    out = run("gaussian", deltas, masks, noise_std=2.0)
    got, d, held = np.asarray(out["a"]), deltas["a"], masks["a"] > 0
    np.testing.assert_array_equal(got[~ATTACKERS], d[~ATTACKERS])
    att_held = held & ATTACKERS[:, None, None]
    np.testing.assert_array_equal(got[~held], d[~held])          # unheld keep their value
    noise = got[att_held]
    assert not np.any(noise == d[att_held])
    assert abs(noise.mean()) < 0.2 and noise.std() == pytest.approx(2.0, rel=0.1)
    again = run("gaussian", deltas, masks, noise_std=2.0)       # same key, same noise
    np.testing.assert_array_equal(np.asarray(again["a"]), got)


@pytest.mark.parametrize("kind", attacks.KINDS)
def test_jit_with_static_kind_matches_eager(kind):
    deltas, masks = make_updates()
    f = jax.jit(attacks.attack_updates, static_argnames="kind")
    jitted = f(kind, deltas, masks, ATTACKERS, jax.random.key(3), scale=2.0, levels=LEVELS)
    eager = attacks.attack_updates(kind, deltas, masks, ATTACKERS, jax.random.key(3), scale=2.0,
                                   levels=LEVELS)
    for k in deltas:  # coordinated kinds reduce over rows: jit may fuse them differently (1 ulp)
        tol = 1e-6 if kind in attacks.COORDINATED else 0
        np.testing.assert_allclose(np.asarray(jitted[k]), np.asarray(eager[k]), rtol=tol, atol=tol)


def test_choose_attackers_seeded_count_and_levels():
    a = attacks.choose_attackers(7, 50, 0.3)
    assert a.dtype == bool and a.shape == (50,) and a.sum() == 15
    np.testing.assert_array_equal(a, attacks.choose_attackers(7, 50, 0.3))
    assert not np.array_equal(a, attacks.choose_attackers(8, 50, 0.3))
    assert attacks.choose_attackers(0, 10, 0.25).sum() == 3       # 2.5 rounds half up
    assert attacks.choose_attackers(0, 10, 0.0).sum() == 0
    assignment = (np.arange(40) * 4) // 40                          # 4 levels of 10 clients
    r = attacks.choose_attackers(1, 40, 0.2, levels=[1, 3], assignment=assignment)
    assert r.sum() == 8 and set(assignment[r]) <= {1, 3}


def test_flip_labels_on_stacked_client_labels():
    y = np.array([[0, 1, 9, 3], [2, 2, 5, 0], [7, 8, 0, 1]], np.int32)
    got = np.asarray(attacks.flip_labels(y, 10, np.array([True, False, True])))
    np.testing.assert_array_equal(got, [[9, 8, 0, 6], [2, 2, 5, 0], [2, 1, 9, 8]])
    assert got.dtype == y.dtype


def test_bad_inputs_name_the_value():
    deltas, masks = make_updates()
    with pytest.raises(ValueError, match="'backdoor'"):
        run("backdoor", deltas, masks)
    with pytest.raises(ValueError, match="scale.*inf"):
        run("scale", deltas, masks, scale=float("inf"))
    with pytest.raises(ValueError, match="noise_std.*-1.0"):
        run("gaussian", deltas, masks, noise_std=-1.0)
    with pytest.raises(ValueError, match="fraction.*1.0"):
        attacks.choose_attackers(0, 10, 1.0)
    with pytest.raises(ValueError, match="fraction.*-0.1"):
        attacks.choose_attackers(0, 10, -0.1)
    with pytest.raises(ValueError, match="assignment"):
        attacks.choose_attackers(0, 10, 0.2, levels=[0])
    with pytest.raises(ValueError, match=r"levels \[5\]"):
        attacks.choose_attackers(0, 4, 0.2, levels=[5], assignment=np.zeros(4, int))
    with pytest.raises(ValueError, match="only 10 clients"):
        attacks.choose_attackers(0, 40, 0.5, levels=[0], assignment=(np.arange(40) * 4) // 40)
    with pytest.raises(ValueError, match="'adaptive' needs levels"):
        run("adaptive", deltas, masks)
    with pytest.raises(ValueError, match=r"'adaptive'.*shape \(3,\)"):
        run("adaptive", deltas, masks, levels=np.zeros(3, int))
    with pytest.raises(ValueError, match="num_classes.*1"):
        attacks.flip_labels(np.zeros((2, 3), np.int32), 1, np.array([True, False]))


# ----------------------------------------------------------------------------- coordinated attacks

def flat(tree):
    """[n, P] float64 view of a client-stacked pytree (leaves in tree order)."""
    leaves = jax.tree_util.tree_leaves(tree)
    return np.concatenate([np.asarray(x, np.float64).reshape(len(x), -1) for x in leaves], axis=1)


def partial_updates(seed=0):
    """make_updates, plus a coordinate that only attackers hold and one nobody holds."""
    deltas, masks = make_updates(seed)
    masks["b"][:, 0] = ATTACKERS                # only attackers hold b[0]
    masks["b"][:, 1] = 0                        # nobody holds b[1]
    return deltas, masks


def numpy_alie(d, m, att):
    n, f = len(att), int(att.sum())
    s = max(n // 2 + 1 - f, 1)
    z = NormalDist().inv_cdf((n - s) / n)
    out, held = d.copy(), m > 0
    for c in range(d.shape[1]):
        hon = held[:, c] & ~att
        if not hon.any():
            continue
        value = np.mean(d[hon, c]) - z * np.std(d[hon, c])
        for i in np.flatnonzero(att & held[:, c]):
            out[i, c] = value
    return out


def numpy_adaptive(d, m, att, levels):
    held = m > 0
    u = np.zeros(d.shape[1])
    for c in range(d.shape[1]):
        hon = held[:, c] & ~att
        if hon.any():
            u[c] = -np.mean(d[hon, c])
    norms = np.sqrt([(d[i][held[i]] ** 2).sum() for i in range(len(d))])
    out = d.copy()
    for i in np.flatnonzero(att):
        peers = ~att & (levels == levels[i])
        target = np.median(norms[peers] if peers.any() else norms[~att])
        ui = np.where(held[i], u, 0.0)
        size = np.linalg.norm(ui)
        out[i][held[i]] = (ui * target / size if size > 0 else np.zeros_like(ui))[held[i]]
    return out


@pytest.mark.parametrize("n,f", [(6, 3), (10, 2), (50, 10), (7, 0), (5, 4), (2, 1)])
def test_alie_z_is_baruchs_rule(n, f):
    flags = np.arange(n) < f
    s = max(n // 2 + 1 - f, 1)                  # clamped with an attacker majority (5, 4)
    want = NormalDist().inv_cdf((n - s) / n)
    got = float(jax.jit(attacks.alie_z)(flags))
    assert got == pytest.approx(want, abs=1e-5)


def test_alie_matches_numpy_and_is_coordinated():
    deltas, masks = partial_updates()
    out = jax.jit(attacks.attack_updates, static_argnames="kind")(
        "alie", deltas, masks, ATTACKERS, jax.random.key(0))
    got, d, m = flat(out), flat(deltas), flat(masks)
    assert all(np.asarray(x).dtype == np.float32 for x in jax.tree_util.tree_leaves(out))
    np.testing.assert_allclose(got, numpy_alie(d, m, ATTACKERS), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(got[~ATTACKERS], d[~ATTACKERS])
    np.testing.assert_array_equal(got[m == 0], d[m == 0])       # non-held keep their value
    only_attackers = d.shape[1] - 7                             # b[0]: no honest holder
    np.testing.assert_array_equal(got[:, only_attackers], d[:, only_attackers])
    rows = got[ATTACKERS]
    common = (m[ATTACKERS] > 0).all(axis=0) & ((m[~ATTACKERS] > 0).any(axis=0))
    assert common.sum() > 10
    np.testing.assert_array_equal(rows[:, common], np.broadcast_to(rows[0, common], rows[:, common].shape))
    assert not np.allclose(rows[0, common], d[0, common])


def test_adaptive_matches_numpy_with_and_without_honest_level_peers():
    deltas, masks = partial_updates(seed=2)
    out = jax.jit(attacks.attack_updates, static_argnames="kind")(
        "adaptive", deltas, masks, ATTACKERS, jax.random.key(0), levels=LEVELS)
    got, d, m = flat(out), flat(deltas), flat(masks)
    assert all(np.asarray(x).dtype == np.float32 for x in jax.tree_util.tree_leaves(out))
    np.testing.assert_allclose(got, numpy_adaptive(d, m, ATTACKERS, LEVELS), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got[~ATTACKERS], d[~ATTACKERS])
    np.testing.assert_array_equal(got[m == 0], d[m == 0])
    held, honest = m > 0, ~ATTACKERS
    norms = np.sqrt((np.where(held, d, 0.0) ** 2).sum(axis=1))
    hon_held = held & honest[:, None]
    hon_mean = np.where(hon_held, d, 0.0).sum(0) / np.maximum(hon_held.sum(0), 1)
    for i in np.flatnonzero(ATTACKERS):
        peers = honest & (LEVELS == LEVELS[i])
        target = np.median(norms[peers]) if peers.any() else np.median(norms[honest])
        row = np.where(held[i], got[i], 0.0)
        assert np.linalg.norm(row) == pytest.approx(target, rel=1e-5)
        cos = row @ hon_mean / (np.linalg.norm(row) * np.linalg.norm(np.where(held[i], hon_mean, 0)))
        assert cos == pytest.approx(-1.0, abs=1e-5)
    assert np.median(norms[[1, 3]]) == pytest.approx(np.linalg.norm(np.where(held[2], got[2], 0)), rel=1e-5)


def test_adaptive_sends_zeros_where_the_honest_consensus_vanishes():
    d = {"w": np.arange(12, dtype=np.float32).reshape(3, 4) + 1}
    m = {"w": np.array([[1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]], np.float32)}
    att = np.array([True, False, False])       # holds only coordinates no honest row holds
    out = attacks.attack_updates("adaptive", d, m, att, jax.random.key(0), levels=np.zeros(3, int))
    want = d["w"].copy()
    want[0, :2] = 0
    np.testing.assert_array_equal(np.asarray(out["w"]), want)


def test_adaptive_attacker_passes_the_norm_screen_that_catches_scaling():
    """The issue's requirement: the adaptive attacker's update passes the old norm screen."""
    rng = np.random.default_rng(5)
    n, p = 10, 240
    levels = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2, 2])
    attackers = np.zeros(n, bool)
    attackers[[1, 7]] = True                    # one at level 0 (3 clients), one at level 2
    width = np.array([p // 4, p // 2, p])[levels]
    masks = {"w": (np.arange(p)[None, :] < width[:, None]).astype(np.float32)}  # nested sub-models
    direction = rng.normal(size=p)
    deltas = {"w": (0.05 * (direction + 0.5 * rng.normal(size=(n, p)))).astype(np.float32)}

    def screen(kind, cosine_threshold=None):
        attacked = attacks.attack_updates(kind, deltas, masks, attackers, jax.random.key(0),
                                          scale=10.0, levels=levels)
        accepted, reason = validation.validate_updates(attacked, masks, levels, z_threshold=3.5,
                                                       cosine_threshold=cosine_threshold)
        return np.asarray(accepted), np.asarray(reason)

    accepted, _ = screen("scale")
    assert not accepted[attackers].any() and accepted[~attackers].all()
    accepted, _ = screen("adaptive")
    assert accepted.all()                       # norm screen only: the attackers get through
    accepted, reason = screen("adaptive", cosine_threshold=0.0)
    assert not accepted[attackers].any() and accepted[~attackers].all()
    assert (reason[attackers] == validation.REASONS.index("direction")).all()
