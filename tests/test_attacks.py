"""attacks: seeded attacker choice, each update attack against a NumPy expectation, and
label flipping."""
import jax
import numpy as np
import pytest

from fiarse_jax import attacks

ATTACKERS = np.array([True, False, True, False, False, True])


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
    jitted = f(kind, deltas, masks, ATTACKERS, jax.random.key(3), scale=2.0)
    eager = attacks.attack_updates(kind, deltas, masks, ATTACKERS, jax.random.key(3), scale=2.0)
    for k in deltas:
        np.testing.assert_array_equal(np.asarray(jitted[k]), np.asarray(eager[k]))


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
    with pytest.raises(ValueError, match="num_classes.*1"):
        attacks.flip_labels(np.zeros((2, 3), np.int32), 1, np.array([True, False]))
