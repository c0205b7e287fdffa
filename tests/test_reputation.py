"""reputation: the record and the exclusion rule by hand; in training, a killed and resumed
run excludes exactly whom the uninterrupted run does, bit for bit; DP refuses it."""
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "configs"))
import default as default_config  # noqa: E402
from helpers import override  # noqa: E402

from fiarse_jax.experiment import checkpoint, train  # noqa: E402
from fiarse_jax.experiment.config import ConfigError, validate_config  # noqa: E402
from fiarse_jax.experiment.metrics import read_jsonl  # noqa: E402
from fiarse_jax.robust import reputation


def test_record_and_rule_by_hand():
    record = reputation.fresh(5)
    ids = np.array([0, 1, 2, 4])
    # reasons: ok, norm_outlier, reputation (not screened), direction
    record = reputation.update(record, ids, np.array([0, 2, 4, 3]))
    np.testing.assert_array_equal(record, [[1, 0], [1, 1], [0, 0], [0, 0], [1, 1]])
    record = reputation.update(record, np.array([1, 4]), np.array([1, 0]))
    np.testing.assert_array_equal(record[[1, 4]], [[2, 2], [2, 1]])
    everyone = np.arange(5)
    # client 1: 2 flags in 2 rounds; client 4: 1 flag in 2 rounds (not a majority)
    np.testing.assert_array_equal(reputation.excluded(record, everyone, 2), [0, 1, 0, 0, 0])
    np.testing.assert_array_equal(reputation.excluded(record, everyone, 1), [0, 1, 0, 0, 0])
    assert not reputation.excluded(record, everyone, 0).any()   # off
    record[4] = [4, 2]                                       # half, not more than half
    assert not reputation.excluded(record, everyone, 2)[4]
    s = reputation.summary(record, 2, np.array([0, 1, 0, 0, 1], bool))
    assert s["excluded"] == [1] and (s["excluded_attackers"], s["excluded_honest"]) == (1, 0)
    assert (s["flagged_attackers"], s["flagged_honest"]) == (4, 0)


def attacked(num_rounds=18, **over):
    c = default_config.get_config()
    c.num_rounds, c.eval_every, c.checkpoint_every, c.keep_checkpoints = num_rounds, 9, 3, 5
    c.client.local_steps = 3
    return override(c, **{"attack.kind": "sign_flip", "attack.fraction": 0.2,
                          "server.validate": True, "server.screen": "core",
                          "server.z_threshold": 7.0, "server.direction_action": "flag",
                          "server.exclude_after_flags": 2, **over})


def rows(workdir, name):
    out = read_jsonl(os.path.join(workdir, name))
    for r in out:
        r.pop("round_time_s", None)
        r.pop("elapsed_s", None)
    return out


def test_resume_keeps_the_record_exactly(tmp_path):
    full, cut = str(tmp_path / "full"), str(tmp_path / "cut")
    want = train.train_and_evaluate(attacked(), full, progress=False)
    train.train_and_evaluate(attacked(num_rounds=9), cut, progress=False)
    got = train.train_and_evaluate(attacked(), cut, progress=False)
    assert got["resumed_from_round"] == 9
    assert rows(cut, "rounds.jsonl") == rows(full, "rounds.jsonl")
    assert rows(cut, "metrics.jsonl") == rows(full, "metrics.jsonl")
    assert got["reputation"] == want["reputation"]
    metas = []
    for d in (full, cut):
        ckpt = checkpoint.RunCheckpoints(d, read_only=True)
        (step, meta), _ = ckpt.latest_meta()
        ckpt.close()
        metas.append((step, meta["reputation"]))
    assert metas[0] == metas[1] and metas[0][0] == 18
    assert np.asarray(metas[0][1]).sum(axis=0)[0] > 0   # rounds screened were recorded
    # The record does its job on this run: attackers, flagged on the core, are excluded and
    # refused; the rows show it.
    r = rows(full, "rounds.jsonl")
    assert want["reputation"]["excluded_attackers"] >= 1, want["reputation"]
    assert want["reputation"]["excluded_honest"] == 0
    assert [x["excluded_total"] for x in r] == sorted(x["excluded_total"] for x in r)
    assert r[-1]["excluded_total"] == len(want["reputation"]["excluded"])
    assert sum(x["rejected_reputation"] for x in r) >= 1
    assert all(x["rejected_honest"] <= x["rejected"] for x in r)
    # direction_action = "flag": flagged updates are used, so none is rejected as direction
    assert sum(x["flagged"] for x in r) >= 1 and sum(x["rejected_direction"] for x in r) == 0


@pytest.mark.parametrize("over, field", [
    ({"dp.noise_multiplier": 0.5, "server.validate": False}, "server.exclude_after_flags"),
    ({"dp.noise_multiplier": 0.5, "server.exclude_after_flags": 0, "server.direction_action": "reject"},
     "server.validate"),
    ({"server.exclude_after_flags": -1}, "server.exclude_after_flags"),
    ({"server.screen": "everything"}, "server.screen"),
    ({"server.exclude_after_flags": 0}, "server.direction_action"),   # a flag nobody reads
])
def test_bad_or_dp_combinations_are_one_line(over, field):
    with pytest.raises(ConfigError) as err:
        validate_config(attacked(**over))
    assert "\n" not in str(err.value) and field in str(err.value)


def test_clean_twin_trains_as_the_clean_run_and_scores_the_honest_clients(tmp_path):
    """attack.kind = none with attack.fraction > 0 marks the attacked run's clients without
    any of them attacking: the same training as a run with no fraction, plus the honest
    clients' local accuracy (over the clients the attacked twin's rows are scored on)."""
    def cfg(**over):
        c = default_config.get_config()
        c.num_rounds, c.eval_every, c.checkpoint_every, c.client.local_steps = 3, 3, 0, 3
        return override(c, **over)

    plain = train.train_and_evaluate(cfg(), str(tmp_path / "plain"), progress=False)
    twin = train.train_and_evaluate(cfg(**{"attack.fraction": 0.2}), str(tmp_path / "twin"),
                                    progress=False)
    assert twin["attackers"] == 0 and plain["attackers"] == 0
    for key in ("global_accuracy", "local_accuracy", "train_loss"):
        assert twin["final"][key] == plain["final"][key], key
    assert "local_accuracy_honest" not in plain["final"]
    assert set(twin["final"]["local_accuracy_honest"]) == set(twin["capacities"])
    assert twin["final"]["local_accuracy_honest"] != twin["final"]["local_accuracy"]
