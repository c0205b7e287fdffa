"""validation's ``screen="core"`` and ``excluded``, against a NumPy construction, and why
the core matters: attackers among the few holders of the large-capacity coordinates pass
the per-holder screen and are caught on the core."""
import jax
import numpy as np
import pytest

from fiarse_jax.robust.validation import REASONS, validate_updates

OK, NON_FINITE, NORM, DIRECTION, REPUTATION = range(5)
assert REASONS == ("ok", "non_finite", "norm_outlier", "direction", "reputation")


def nested(levels, sizes=(40, 16, 6), seed=0, scale=0.3):
    """FIARSE-like nested sub-models on 40 coordinates: level l holds the first sizes[l]
    (the kept set of a smaller level inside every larger one's); honest updates share a
    direction, plus noise. Split into two leaves to exercise the pytree flattening."""
    rng = np.random.default_rng(seed)
    n, p = len(levels), sizes[0]
    mask = np.zeros((n, p), np.float32)
    for i, l in enumerate(levels):
        mask[i, :sizes[l]] = 1
    d = ((rng.normal(size=p) + scale * rng.normal(size=(n, p))) * mask).astype(np.float32)
    return d, mask


def tree(x):
    return {"a": x[:, :25].reshape(-1, 5, 5), "b": x[:, 25:]}


def numpy_core(d, mask, excluded, z_threshold=3.5, min_spread=0.1, cos_threshold=0.0):
    """The core screen re-derived: the columns every active (finite, not excluded) client
    holds; norms there against median/MAD of all active clients; direction against their
    coordinate-wise median; the first reason of: reputation, non_finite, norm, direction."""
    held = mask > 0
    finite = np.array([np.isfinite(d[i, held[i]]).all() for i in range(len(d))])
    active = finite & ~excluded
    core = held[active].all(axis=0)
    x = np.where(held & core & active[:, None], d, 0.0)
    norms = np.sqrt((x[:, core] ** 2).sum(axis=1))
    med = np.median(norms[active])
    scale = max(1.4826 * np.median(np.abs(norms[active] - med)), min_spread * med)
    z = np.abs(norms - med) / scale
    ref = np.median(x[active][:, core], axis=0)
    with np.errstate(invalid="ignore"):   # the non-finite row's NaN is never read
        cos = np.array([x[i, core] @ ref / (np.linalg.norm(x[i, core]) * np.linalg.norm(ref))
                        for i in range(len(d))])
    reason = np.zeros(len(d), int)
    for i in range(len(d)):
        if excluded[i]:
            reason[i] = REPUTATION
        elif not finite[i]:
            reason[i] = NON_FINITE
        elif z[i] > z_threshold:
            reason[i] = NORM
        elif cos[i] < cos_threshold:
            reason[i] = DIRECTION
    return reason


def test_core_screen_matches_numpy():
    levels = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 1, 0])
    d, mask = nested(levels)
    d[1] *= -1.0                  # level 0 sign flip
    d[4] *= 12.0                  # level 1 scaled
    d[7, 2] = np.nan              # level 2, non-finite on the core
    d[9, 30] = np.inf             # level 2, outside its mask: ignored
    excluded = np.zeros(len(levels), bool)
    excluded[11] = True           # excluded: out of every statistic, core included
    mask[11, :3] = 0              # (so its smaller mask does not shrink the core)
    want = numpy_core(d, mask, excluded)
    assert list(want) == [OK, DIRECTION, OK, OK, NORM, OK, OK, NON_FINITE, OK, OK, OK,
                          REPUTATION]
    accepted, reason = jax.jit(lambda a, m, l, e: validate_updates(
        a, m, l, screen="core", excluded=e))(tree(d), tree(mask), levels, excluded)
    np.testing.assert_array_equal(np.asarray(reason), want)
    np.testing.assert_array_equal(np.asarray(accepted), want == OK)


def test_attackers_among_few_holders_pass_held_but_not_core():
    """Two of the three capacity-1 clients flip their sign. On the coordinates only level 0
    holds, the holder median is theirs; per-level norms cannot tell. On the core (held by all
    ten) they are two against eight."""
    levels = np.array([0, 0, 0, 1, 1, 1, 1, 2, 2, 2])
    d, mask = nested(levels, sizes=(40, 10, 4), seed=1)   # the default's 1, 1/4, 1/16
    d[[0, 1]] *= -1.0
    _, held = validate_updates(tree(d), tree(mask), levels, screen="held")
    _, core = validate_updates(tree(d), tree(mask), levels, screen="core")
    assert list(np.asarray(held)[:3]) == [OK, OK, DIRECTION]   # the honest one is rejected
    assert list(np.asarray(core)) == [DIRECTION] * 2 + [OK] * 8


def test_no_core_falls_back_to_held():
    """Disjoint sub-models (no coordinate every client holds): the core screen is the
    per-holder screen."""
    levels = np.array([0] * 4 + [1] * 4)
    rng = np.random.default_rng(1)
    mask = np.zeros((8, 40), np.float32)
    mask[:4, :20], mask[4:, 20:] = 1, 1
    d = ((rng.normal(size=40) + 0.3 * rng.normal(size=(8, 40))) * mask).astype(np.float32)
    d[1] *= -1.0
    d[6] *= 20.0
    a = validate_updates(tree(d), tree(mask), levels, screen="held")
    b = validate_updates(tree(d), tree(mask), levels, screen="core")
    np.testing.assert_array_equal(np.asarray(a[1]), np.asarray(b[1]))
    assert np.asarray(b[1])[1] == DIRECTION and np.asarray(b[1])[6] == NORM


def test_excluded_without_statistics_screens():
    """With only the finite screen, excluded clients are still refused."""
    d, mask = nested(np.array([0, 1, 2, 2]))
    d[2, 0] = d[3, 0] = np.nan
    _, reason = validate_updates(tree(d), tree(mask), np.array([0, 1, 2, 2]), z_threshold=None,
                                 cosine_threshold=None,
                                 excluded=np.array([True, False, False, True]))
    assert list(np.asarray(reason)) == [REPUTATION, OK, NON_FINITE, REPUTATION]


@pytest.mark.parametrize("kw, match", [({"screen": "all"}, "screen = 'all'"),
                                       ({"excluded": np.zeros(2, bool)}, "excluded has shape")])
def test_bad_screen_arguments_are_named(kw, match):
    d, mask = nested(np.array([0, 1, 2]))
    with pytest.raises(ValueError, match=match):
        validate_updates(tree(d), tree(mask), np.array([0, 1, 2]), **kw)


def test_direction_action_flag_uses_the_update_and_keeps_the_verdict():
    """direction_action="flag": an update against the consensus is aggregated (reason still
    ``direction``, for the record); a norm outlier and an excluded client are refused either
    way. The aggregate is the holder mean over exactly the used clients."""
    from fiarse_jax.federated.server_round import make_server_round
    levels = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2, 2])
    d, mask = nested(levels, seed=1)
    d[1] *= -1.0       # against the consensus
    d[4] *= 30.0       # norm outlier
    excluded = np.zeros(10, bool)
    excluded[8] = True
    used = {}
    for action in ("reject", "flag"):
        step = make_server_round(z_threshold=3.5, cosine_threshold=0.0, screen="core",
                                 direction_action=action)
        zeros = {"a": np.zeros((5, 5), np.float32), "b": np.zeros(15, np.float32)}
        new, info = step(zeros, tree(d), tree(mask), levels, jax.random.PRNGKey(0), 0.0,
                         excluded)
        assert list(np.asarray(info["reason"])) == [OK, DIRECTION, OK, OK, NORM, OK, OK, OK,
                                                    REPUTATION, OK], action
        used[action] = np.asarray(info["accepted"])
        keep = used[action][:, None] & (mask > 0)
        want = -(np.where(keep, d, 0).sum(0) / np.maximum(keep.sum(0), 1))   # w − 1·mean
        got = np.concatenate([np.asarray(new["a"]).ravel(), np.asarray(new["b"])])
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert list(np.where(~used["reject"])[0]) == [1, 4, 8]
    assert list(np.where(~used["flag"])[0]) == [4, 8]
    with pytest.raises(ValueError, match="direction_action = 'maybe'"):
        make_server_round(direction_action="maybe")
