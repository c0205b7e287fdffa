"""Streamed rounds (engine ``reduce`` + ``server_round.make_streaming_round``): the summed
server inputs against NumPy sums of the stacked results, the streamed server step against
the stacked one (NaN screen, DP noise), and whole runs streamed == stacked."""
import json
import os
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "configs"))
import default as default_config  # noqa: E402
from _engine_worker import problem  # noqa: E402
from helpers import override  # noqa: E402

from fiarse_jax.experiment import train  # noqa: E402
from fiarse_jax.experiment.config import ConfigError, round_options, validate_config  # noqa: E402
from fiarse_jax.federated import algorithm, engine
from fiarse_jax.federated.client import ClientResult  # noqa: E402
from fiarse_jax.federated.server_round import make_server_round, make_streaming_round  # noqa: E402


def np_sums(result: ClientResult):
    """Σ_i m_i·d_i and Σ_i m_i per leaf, and each client's delta norm, in NumPy float64."""
    d = [np.asarray(x, np.float64) for x in jax.tree_util.tree_leaves(result.delta)]
    m = [np.asarray(x, np.float64) for x in jax.tree_util.tree_leaves(result.mask)]
    norms = np.sqrt(sum((x.reshape(len(x), -1) ** 2).sum(1) for x in d))
    return [(x * y).sum(0) for x, y in zip(d, m)], [y.sum(0) for y in m], norms


@pytest.mark.parametrize("strategy,chunk", [("loop", 0), ("vmap", 0), ("vmap", 3)])
def test_streamed_sums_equal_numpy_sums_of_the_stacked_round(strategy, chunk):
    fns, params, specs, data, keys = problem(7)   # chunk 3 pads 7 clients to 9
    stacked = engine.make_round_runner(fns, "vmap")(params, specs, data, keys)
    totals, counts, norms = np_sums(stacked)
    stream = make_streaming_round()
    (got_totals, got_counts), stats = engine.make_round_runner(
        fns, strategy, clients_per_chunk=chunk, reduce=stream.contribution)(
        params, specs, data, keys)
    for got, want in zip(jax.tree_util.tree_leaves(got_totals), totals):
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-6)
    for got, want in zip(jax.tree_util.tree_leaves(got_counts), counts):
        np.testing.assert_array_equal(np.asarray(got), want)   # padding counted nowhere
    assert max(c.max() for c in counts) == 7 and min(c.min() for c in counts) < 7
    np.testing.assert_allclose(np.asarray(stats.loss), np.asarray(stacked.loss), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(stats.norm), norms, rtol=1e-4)
    assert np.asarray(stats.accepted).all() and not np.asarray(stats.reason).any()


def stacked_updates(n=6, p=40):
    rng = np.random.default_rng(0)
    mask = (rng.random((n, p)) < 0.6).astype(np.uint8)
    mask[:, 3] = 0                                          # a coordinate nobody holds
    delta = np.where(mask > 0, 0.1 * rng.normal(size=(n, p)), 0).astype(np.float32)
    delta[0] *= 50                                          # a client DP's clip bites on
    delta[[1, 4]] = np.where(mask[[1, 4]] > 0, np.nan, 0)   # rejected: non-finite
    delta[2, mask[2] == 0] = np.inf                         # outside its mask: ignored
    params = {"w": rng.normal(size=p).astype(np.float32), "b": np.ones(2, np.float32)}
    deltas = {"w": delta, "b": np.full((n, 2), 0.5, np.float32)}
    masks = {"w": mask, "b": np.ones((n, 2), np.uint8)}
    return params, ClientResult(deltas, masks, jnp.arange(n, dtype=jnp.float32))


@pytest.mark.parametrize("sigma,rule", [(0.0, "mean"), (0.7, "mean"), (0.0, "norm_bounded")])
def test_streamed_server_equals_the_stacked_server(sigma, rule):
    params, result = stacked_updates()
    n = result.loss.shape[0]
    key, divisor = jax.random.PRNGKey(3), {"w": np.full(40, 2.5, np.float32), "b": 3.0}
    kw = dict(server_lr=0.5, dp_noise_multiplier=sigma, dp_clip_norm=0.3, aggregator=rule,
              aggregator_options={"max_norm": 0.4} if rule == "norm_bounded" else {})
    copy = lambda: jax.tree_util.tree_map(jnp.array, params)   # noqa: E731 (donated)
    want, info = make_server_round(**kw)(copy(), result.delta, result.mask,
                                         np.zeros(n, np.int32), key, divisor)
    stream = make_streaming_round(**kw)
    sums, stats = jax.vmap(stream.contribution)(result)
    sums = jax.tree_util.tree_map(lambda a: a.sum(0), sums)
    got = stream.finish(copy(), sums, key, divisor)
    chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(stats.accepted), np.asarray(info["accepted"]))
    np.testing.assert_array_equal(np.asarray(stats.reason), np.asarray(info["reason"]))
    assert not np.asarray(stats.accepted)[[1, 4]].any() and np.asarray(stats.accepted).sum() == 4
    assert np.isfinite(np.asarray(got["w"])).all()


def test_streaming_refuses_rules_that_are_not_sums_naming_them():
    with pytest.raises(ValueError, match="aggregator = 'median' is not a sum"):
        make_streaming_round(aggregator="median")
    with pytest.raises(ValueError, match="max_norm = -1"):
        make_streaming_round(aggregator="norm_bounded", aggregator_options={"max_norm": -1})
    with pytest.raises(ValueError, match="does not combine with aggregator = 'norm_bounded'"):
        make_streaming_round(aggregator="norm_bounded", aggregator_options={"max_norm": 1.0},
                             dp_noise_multiplier=1.0)


def small(**fields):
    return override(default_config.get_config(),
                    **{"num_rounds": 2, "eval_every": 2, "checkpoint_every": 0,
                       "tensorboard": False, "engine.strategy": "vmap", **fields})


def test_streamed_and_stacked_runs_agree(tmp_path):
    runs = {mode: train.train_and_evaluate(small(**{"engine.reduce": mode}),
                                           str(tmp_path / mode), progress=False)
            for mode in ("stack", "stream")}
    assert [runs[m]["server_inputs"] for m in ("stack", "stream")] == ["stacked", "streamed"]
    a, b = (runs[m]["final"] for m in ("stack", "stream"))
    assert a["global_accuracy"] == pytest.approx(b["global_accuracy"], abs=0.02)
    ra, rb = (json.loads((tmp_path / m / "rounds.jsonl").read_text().splitlines()[-1])
              for m in ("stack", "stream"))
    for k in ("train_loss", "update_norm_mean", "update_norm_max"):
        assert ra[k] == pytest.approx(rb[k], rel=1e-4), k
    assert ra["rejected"] == rb["rejected"] == 0


def test_stream_refuses_settings_that_need_every_update(tmp_path):
    with pytest.raises(ConfigError, match="reduce = 'stream'.*aggregator = 'median'"):
        train.train_and_evaluate(small(**{"engine.reduce": "stream",
                                          "server.aggregator": "median"}),
                                 str(tmp_path / "a"), progress=False)
    with pytest.raises(ConfigError, match="engine.reduce.*'sum'"):
        train.train_and_evaluate(small(**{"engine.reduce": "sum"}), str(tmp_path / "b"),
                                 progress=False)
    assert not any((tmp_path / d).exists() and os.listdir(tmp_path / d) for d in "ab")


@pytest.mark.parametrize("fields,blocked", [
    ({"server.validate": True}, "update validation"),
    ({"attack.kind": "sign_flip", "attack.fraction": 0.2}, "attack = 'sign_flip'"),
    ({"server.aggregator": "trimmed_mean"}, "aggregator = 'trimmed_mean'"),
    ({"attack.kind": "label_flip", "attack.fraction": 0.2}, None),   # acts on the data
    ({"dp.noise_multiplier": 0.5}, None),                            # DP-FedAvg is a sum
    ({"server.aggregator": "norm_bounded"}, None),                   # so is this
])
def test_config_check_refuses_stream_exactly_where_the_rule_needs_every_update(fields, blocked):
    cfg = small(**{"engine.reduce": "stream", **fields})
    if blocked is None:
        validate_config(cfg)
        assert algorithm.stream_updates(round_options(cfg))
    else:
        with pytest.raises(ConfigError, match=f"engine.reduce = 'stream'.*{blocked}"):
            validate_config(cfg)
        auto = small(**{"engine.reduce": "auto", **fields})
        validate_config(auto)
        assert not algorithm.stream_updates(round_options(auto))


@pytest.mark.parametrize("kw", [
    {}, {"dp_noise_multiplier": 0.7, "dp_clip_norm": 0.3},
    {"aggregator": "norm_bounded", "aggregator_options": {"max_norm": 0.4}}],
    ids=["mean", "dp", "norm_bounded"])
def test_contribution_ignores_nan_outside_the_mask(kw):
    """A client's NaN outside its mask neither rejects it nor reaches the sums: the same
    contribution as with 0 there, and NumPy's held sums / (clipped) norms."""
    rng = np.random.default_rng(5)
    n, p = 4, 30
    mask = (rng.random((n, p)) < 0.5).astype(np.uint8)
    clean = np.where(mask > 0, rng.normal(size=(n, p)), 0.0).astype(np.float32)
    dirty = np.where(mask > 0, clean, np.nan).astype(np.float32)
    dirty[1, mask[1] == 0] = np.inf
    contribution = jax.jit(jax.vmap(make_streaming_round(**kw).contribution))
    loss = jnp.zeros(n, jnp.float32)
    (got, got_counts), stats = contribution(ClientResult({"w": dirty}, {"w": mask}, loss))
    (want, want_counts), _ = contribution(ClientResult({"w": clean}, {"w": mask}, loss))
    np.testing.assert_array_equal(np.asarray(got["w"]), np.asarray(want["w"]))
    chex.assert_trees_all_equal(got_counts, want_counts)
    assert np.asarray(stats.accepted).all()
    norms = np.linalg.norm(clean.astype(np.float64), axis=1)
    np.testing.assert_allclose(np.asarray(stats.norm), norms, rtol=1e-5)
    bound = kw.get("dp_clip_norm", kw.get("aggregator_options", {}).get("max_norm", np.inf))
    scaled = clean * np.minimum(1.0, bound / norms)[:, None]
    np.testing.assert_allclose(np.asarray(got["w"]), scaled, rtol=1e-5, atol=1e-7)
    if "dp_clip_norm" not in kw:
        np.testing.assert_array_equal(np.asarray(got_counts["w"]), mask.astype(np.float32))
