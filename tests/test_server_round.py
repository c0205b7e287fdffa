"""server_round: screening + rule + DP + update, against NumPy; robustness wired end to end."""
import json
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "configs"))
import default as default_config  # noqa: E402
from helpers import override  # noqa: E402

from fiarse_jax.cli import robustness  # noqa: E402
from fiarse_jax.core import rng
from fiarse_jax.experiment import build, train
from fiarse_jax.federated.server_round import make_server_round  # noqa: E402
from fiarse_jax.robust import validation


def updates(n=6, p=40, seed=0):
    rng = np.random.default_rng(seed)
    params = {"w": rng.normal(size=p).astype(np.float32)}
    deltas = {"w": (0.1 * rng.normal(size=(n, p))).astype(np.float32)}
    masks = {"w": (rng.random((n, p)) < 0.6).astype(np.float32)}
    masks["w"][:, :3] = 1.0            # some coordinates held by everyone
    masks["w"][:, 3] = 0.0             # ... one by nobody
    return params, deltas, masks


def np_holder_mean(d, m):
    n = m.sum(0)
    return np.where(n > 0, (d * m).sum(0) / np.maximum(n, 1), 0.0)


def test_nan_updates_are_rejected_and_the_rest_averaged():
    params, deltas, masks = updates()
    bad = deltas["w"].copy()
    bad[[1, 4]] = np.where(masks["w"][[1, 4]] > 0, np.nan, bad[[1, 4]])
    bad[2, masks["w"][2] == 0] = np.inf            # outside its mask: ignored, not rejected
    step = make_server_round()
    new, info = step({"w": params["w"].copy()}, {"w": bad}, masks, np.zeros(6, np.int32),
                     np.zeros(2, np.uint32), 0.0)
    keep = np.array([0, 2, 3, 5])
    np.testing.assert_array_equal(np.asarray(info["accepted"]), np.isin(np.arange(6), keep))
    assert [validation.REASONS[r] for r in np.asarray(info["reason"])[[1, 4]]] == ["non_finite"] * 2
    honest = np.where(masks["w"][keep] > 0, bad[keep], 0.0)
    expected = params["w"] - np_holder_mean(honest, masks["w"][keep])
    np.testing.assert_allclose(np.asarray(new["w"]), expected, rtol=1e-6, atol=1e-7)


def test_every_update_rejected_leaves_the_model_unchanged():
    params, deltas, masks = updates()
    new, info = make_server_round()({"w": params["w"].copy()},
                                    {"w": np.full_like(deltas["w"], np.nan)}, masks,
                                    np.zeros(6, np.int32), np.zeros(2, np.uint32), 0.0)
    assert not np.asarray(info["accepted"]).any()
    np.testing.assert_array_equal(np.asarray(new["w"]), params["w"])


def test_median_rule_is_wired_with_server_lr():
    params, deltas, masks = updates(n=5)
    new, _ = make_server_round(aggregator="median", server_lr=0.5)(
        {"w": params["w"].copy()}, deltas, masks, np.zeros(5, np.int32), np.zeros(2, np.uint32),
        0.0)
    med = np.array([np.median(deltas["w"][masks["w"][:, j] > 0, j]) if masks["w"][:, j].any()
                    else 0.0 for j in range(40)])
    np.testing.assert_allclose(np.asarray(new["w"]), params["w"] - 0.5 * med, rtol=1e-6,
                               atol=1e-7)


def test_dp_clips_each_client_then_divides_by_the_fixed_divisor():
    params, deltas, masks = updates()
    deltas["w"][0] *= 100                               # the one client the clip bites on
    divisor = np.full(40, 2.5, np.float32)
    new, _ = make_server_round(dp_noise_multiplier=1e-9, dp_clip_norm=0.3)(
        {"w": params["w"].copy()}, deltas, masks, np.zeros(6, np.int32), np.zeros(2, np.uint32),
        {"w": divisor})
    held = deltas["w"] * masks["w"]
    norms = np.linalg.norm(held, axis=1, keepdims=True)
    clipped = held * np.minimum(1.0, 0.3 / norms)
    np.testing.assert_allclose(np.asarray(new["w"]), params["w"] - clipped.sum(0) / divisor,
                               rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="aggregator = 'median'"):
        make_server_round(aggregator="median", dp_noise_multiplier=1.0)


def small(**fields):
    cfg = default_config.get_config()
    return override(cfg, **{"num_rounds": 3, "eval_every": 3, "checkpoint_every": 0,
                            "tensorboard": False, "engine.strategy": "vmap", **fields})


def test_nan_attack_with_validation_trains_finite_and_logs_rejections(tmp_path):
    cfg = small(**{"attack.kind": "nan", "attack.fraction": 0.2, "server.validate": True,
                   "server.aggregator": "trimmed_mean"})
    summary = train.train_and_evaluate(cfg, str(tmp_path))
    rows = [json.loads(l) for l in (tmp_path / "rounds.jsonl").read_text().splitlines()]
    attackers = build.build_run(cfg).attackers
    assert summary["attackers"] == int(attackers.sum()) == 10
    for r in rows:   # every attacker in the round is caught, as non-finite
        ids = rng.sample_clients(cfg.seed, r["round"] - 1, 50, 10)
        assert r["attackers"] == r["rejected_non_finite"] == int(attackers[ids].sum())
        assert np.isfinite(r["update_norm_mean"])
    assert 0.0 < summary["final"]["global_accuracy"] <= 1.0


def test_label_flip_flips_exactly_the_attackers_rows():
    clean = build.build_run(small())
    run = build.build_run(small(**{"attack.kind": "label_flip", "attack.fraction": 0.2,
                                   "attack.levels": (2,)}))
    y0, y1 = np.asarray(clean.data.train.y), np.asarray(run.data.train.y)
    att = run.attackers
    assert att.sum() == 10 and set(clean.assignment[att]) == {2}
    np.testing.assert_array_equal(y1[att], 9 - y0[att])
    np.testing.assert_array_equal(y1[~att], y0[~att])


def test_dp_epsilon_per_round_equals_dp_accounting(tmp_path):
    import dp_accounting
    cfg = small(**{"dp.noise_multiplier": 1.0, "num_rounds": 2, "eval_every": 2})
    summary = train.train_and_evaluate(cfg, str(tmp_path))
    rows = [json.loads(l) for l in (tmp_path / "rounds.jsonl").read_text().splitlines()]
    for r in rows:    # q = 10 / 50, σ = 1, δ = 1e-5, r["round"] compositions
        acc = dp_accounting.rdp.RdpAccountant()
        acc.compose(dp_accounting.PoissonSampledDpEvent(
            0.2, dp_accounting.GaussianDpEvent(1.0)), r["round"])
        assert r["dp_epsilon"] == pytest.approx(acc.get_epsilon(1e-5), rel=1e-9)
    assert summary["dp"]["epsilon"] == rows[-1]["dp_epsilon"]


def test_robustness_command_writes_table_json_and_plot(tmp_path, monkeypatch):
    monkeypatch.setattr(robustness, "SCENARIOS", {
        "clean": ({}, ("mean",)),
        "sign_flip_20": ({"attack.kind": "sign_flip", "attack.fraction": 0.2},
                         ("median", "core+reputation"))})
    drawn = {}
    real_bars = robustness.plots.grouped_bars

    def bars(groups, series, *a, **kw):
        drawn.update(series)
        return real_bars(groups, series, *a, **kw)

    monkeypatch.setattr(robustness.plots, "grouped_bars", bars)
    result = robustness.robustness(small(num_rounds=2, eval_every=2), str(tmp_path))
    # Cells not run are absent from the plot (NaN: no bar), not drawn as 0 %.
    assert np.isnan(drawn["mean"][1]) and np.isnan(drawn["median"][0])
    assert drawn["mean"][0] > 0 and drawn["median"][1] > 0
    table = (tmp_path / "robustness.md").read_text()
    assert table == result["table"] and table.count("\n") == 2 + 3
    assert "| sign_flip_20 | `median` |" in table and "| sign_flip_20 | `core+reputation` |" in table
    assert "honest rejected" in table and "local 1 (honest)" in table
    for name, r in result["rejected"].items():   # the table's share, from rounds.jsonl
        rows = [json.loads(l) for l in (tmp_path / name / "rounds.jsonl").read_text().splitlines()]
        sent = sum(10 - x.get("attackers", 0) for x in rows)   # 10 clients per round
        assert r["honest_rejected_share"] == sum(x.get("rejected_honest", x["rejected"])
                                                 for x in rows) / sent
    assert (tmp_path / "robustness.png").stat().st_size > 0
    saved = json.loads((tmp_path / "robustness.json").read_text())
    assert set(saved["summaries"]) == {"clean-mean", "sign_flip_20-median", "sign_flip_20-core+reputation"}
    assert saved["summaries"]["sign_flip_20-median"]["config"]["server"]["aggregator"] == "median"
