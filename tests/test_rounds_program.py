"""Rounds compiled together (``Algorithm.apply_rounds``) against one round at a time
(``Algorithm.apply``), and the training loop's stops (``algorithm.next_stop``)."""
import json
import os
import sys
from typing import NamedTuple

import jax
import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "configs"))
import default as default_config  # noqa: E402
from helpers import override  # noqa: E402

from fiarse_jax.core import rng  # noqa: E402
from fiarse_jax.experiment import build, train
from fiarse_jax.experiment.config import ConfigError, round_options  # noqa: E402
from fiarse_jax.federated import algorithm as algorithm_lib  # noqa: E402
from fiarse_jax.robust import privacy


def _config(**overrides):
    config = default_config.get_config()
    config.num_rounds, config.eval_every, config.checkpoint_every = 7, 3, 0
    config.client.local_steps = 5
    return override(config, **overrides)


def _ids(config, rounds):
    return [rng.sample_clients(config.seed, r, config.data.num_clients,
                               config.clients_per_round) for r in rounds]


def _run_both(config, rounds: int):
    """(params, stats) after ``rounds`` rounds one program each, and as one block."""
    run = build.build_run(config)
    alg = algorithm_lib.build_algorithm(run)
    copy = lambda t: jax.tree_util.tree_map(np.array, t)  # noqa: E731  (blocks donate params)
    state, one = alg.init(copy(run.init_params)), []
    for ids in _ids(config, range(rounds)):
        state, stats = alg.apply(state, ids)
        one.append(stats)
    block_state, block = alg.apply_rounds(alg.init(copy(run.init_params)),
                                          _ids(config, range(rounds)))
    assert block_state.round == state.round == rounds and len(block) == rounds
    return alg, (state, one), (block_state, block)


@pytest.mark.parametrize("overrides", [
    {},                                                   # FIARSE, loop (CPU's auto)
    {"engine.strategy": "vmap", "engine.clients_per_chunk": 4},
    {"method": "fedrolex"},                               # the round index moves the window
    {"dp.noise_multiplier": 1.0},                         # the server key draws the noise
    {"method": "fed_dropout"},                            # the spec key draws the sub-model
], ids=["fiarse", "vmap-chunked", "fedrolex", "dp", "fed_dropout"])
def test_a_block_of_rounds_equals_the_rounds_one_by_one(overrides):
    config = _config(**overrides)
    alg, (state, one), (block_state, block) = _run_both(config, 4)
    assert alg.rounds_per_program == 3   # eval_every: blocks of up to 3 rounds
    for a, b in zip(jax.tree_util.tree_leaves(state.params),
                    jax.tree_util.tree_leaves(block_state.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    for a, b in zip(one, block):
        assert b.train_loss == pytest.approx(a.train_loss, rel=1e-5)
        np.testing.assert_allclose(b.norms, a.norms, rtol=1e-5)
        assert (b.accepted == a.accepted).all() and (b.reason == a.reason).all()
        assert b.dp_epsilon == a.dp_epsilon
    np.testing.assert_array_equal(block_state.reputation, state.reputation)
    assert block_state.dp_segments == state.dp_segments


def test_stacked_server_inputs_run_one_round_per_program():
    config = _config(**{"server.aggregator": "median"})
    alg, (state, one), (block_state, block) = _run_both(config, 2)
    assert alg.rounds_per_program == 1 and not alg.streaming
    assert [s.train_loss for s in block] == [s.train_loss for s in one]


def test_the_training_loop_gives_the_same_run_either_way(tmp_path):
    """End to end: rounds.jsonl and metrics.jsonl of blocks (3, 3, 1 rounds) equal those of
    one program per round; evaluations fall where they did."""
    runs = {}
    for n in (0, 1):
        workdir = tmp_path / str(n)
        s = train.train_and_evaluate(_config(**{"engine.rounds_per_program": n}), str(workdir),
                                     progress=False)
        assert s["rounds_per_program"] == (3 if n == 0 else 1)
        runs[n] = [[json.loads(line) for line in (workdir / f).read_text().splitlines()]
                   for f in ("rounds.jsonl", "metrics.jsonl")]
    (rounds0, evals0), (rounds1, evals1) = runs[0], runs[1]
    assert [r["round"] for r in rounds0] == list(range(1, 8))
    assert [m["round"] for m in evals0] == [m["round"] for m in evals1] == [3, 6, 7]
    for a, b in zip(rounds0, rounds1):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        assert a["update_norm_mean"] == pytest.approx(b["update_norm_mean"], rel=1e-5)
    for a, b in zip(evals0, evals1):
        assert a["global_loss"] == pytest.approx(b["global_loss"], rel=1e-4)
        assert a["local_accuracy"] == pytest.approx(b["local_accuracy"], abs=0.01)


def _stops_by_hand(config, start, extra=()):
    """Every round count after ``start`` at which something happens on the host, from
    the definitions one by one."""
    stops, ckpt = [], config.checkpoint_every
    every = config.engine.get("rounds_per_program", 0)
    for done in range(start + 1, config.num_rounds + 1):
        if (done % config.eval_every == 0 or done == config.num_rounds
                or (ckpt and done % ckpt == 0) or (every and done % every == 0)
                or done in extra):
            stops.append(done)
    return stops


@pytest.mark.parametrize("fields", [
    {"num_rounds": 200, "eval_every": 20, "checkpoint_every": 50},
    {"num_rounds": 37, "eval_every": 10, "checkpoint_every": 0},
    {"num_rounds": 30, "eval_every": 7, "checkpoint_every": 4,
     "engine.rounds_per_program": 3},
    {"num_rounds": 5, "eval_every": 100, "checkpoint_every": 0},
])
@pytest.mark.parametrize("start", [0, 13])
def test_stops_are_the_evaluations_checkpoints_limits_and_extras(fields, start):
    config = override(default_config.get_config(), **fields)
    schedule = round_options(config).schedule
    for extra in ((), (start + 1, start + 2)):
        rnd, got = start, []
        while rnd < config.num_rounds:
            rnd = algorithm_lib.next_stop(schedule, rnd, extra)
            got.append(rnd)
        assert got == _stops_by_hand(config, start, extra), (fields, start, extra)
    everything = [0, *_stops_by_hand(config, 0)]
    assert algorithm_lib.max_block(schedule) == max(b - a for a, b in zip(everything,
                                                                        everything[1:]))


def test_a_bad_rounds_per_program_is_one_line(tmp_path):
    with pytest.raises(ConfigError) as err:
        train.train_and_evaluate(_config(**{"engine.rounds_per_program": -1}),
                                 str(tmp_path / "run"))
    assert str(err.value) == ("config.engine.rounds_per_program = -1: must be an integer "
                              "≥ 0")
    assert not (tmp_path / "run").exists()


def _poisoned_run(config, bad_round: int, build_run=build.build_run):
    """``build_run(config)`` with NaN rows for a client first sampled in ``bad_round``."""
    run = build_run(config)
    earlier = set(np.concatenate(_ids(config, range(bad_round))).tolist())
    victim = next(c for c in _ids(config, [bad_round])[0] if c not in earlier)
    x = np.array(run.data.train.x)
    x[victim] = np.nan
    return run._replace(data=run.data._replace(train=run.data.train._replace(x=jax.numpy.asarray(x))))


@pytest.mark.parametrize("per_program", [0, 1])
def test_divergence_inside_a_block_names_its_round_and_keeps_the_rounds_before(
        tmp_path, monkeypatch, per_program):
    config = _config(**{"engine.rounds_per_program": per_program})
    run = _poisoned_run(config, 1)   # the block is rounds 1–3: the second round diverges
    alg = algorithm_lib.build_algorithm(run)
    with pytest.raises(algorithm_lib.TrainingError, match="diverged in round 2 ") as err:
        alg.apply_rounds(alg.init(run.init_params), _ids(config, range(3)))
    assert len(err.value.rounds) == 1 and np.isfinite(err.value.rounds[0].train_loss)
    # the training loop logs that round before it stops
    monkeypatch.setattr(build, "build_run", lambda c, **kw: _poisoned_run(c, 1))
    with pytest.raises(train.TrainingError, match="diverged in round 2 "):
        train.train_and_evaluate(config, str(tmp_path / "run"), progress=False)
    rows = (tmp_path / "run" / "rounds.jsonl").read_text().splitlines()
    assert [json.loads(r)["round"] for r in rows] == [1]


class _Table(NamedTuple):   # a block's per-client results on the host, as rounds_program's
    loss: np.ndarray
    norm: np.ndarray
    accepted: np.ndarray
    reason: np.ndarray


@pytest.mark.parametrize("sigma", [0.0, 0.8])
def test_conclude_block_is_the_numpy_bookkeeping_of_each_round(sigma):
    """``conclude_block`` (the host's part of a block of rounds) against the round stats,
    screening record and DP history re-derived here in plain NumPy, round by round."""
    num_clients, C, n, capacity, min_flags = 12, 4, 3, 5, 1
    attackers = np.zeros(num_clients, bool)
    attackers[[2, 7]] = True
    rules = algorithm_lib.HostRules(attackers, num_classes=10, min_flags=min_flags,
                                    sampling_rate=C / num_clients, dp_delta=1e-5,
                                    dp_accountant="rdp", client_lr=0.1, server_lr=1.0)
    r = np.random.default_rng(0)
    rows = np.stack([np.sort(r.choice(num_clients, C, replace=False)) for _ in range(n)])
    reason = r.choice([0, 0, 1, 2, 3, 4], (capacity, C)).astype(np.int32)
    reason[:, 0] = 0   # an honest-or-not client always accepted: no round is all non-finite
    accepted = (reason == 0) | (reason == 3) & (r.random((capacity, C)) < 0.5)   # flagged, kept
    table = _Table(r.random((capacity, C)).astype(np.float32), r.random((capacity, C)),
                   accepted, reason)
    start = algorithm_lib.ServerState("params", 5, sigma, ((5, sigma),),
                                      np.zeros((num_clients, 2), np.int32))
    out = []
    state = algorithm_lib.conclude_block(rules, start, "new", rows, table, 0.25, out)

    screened, flagged = np.zeros(num_clients, int), np.zeros(num_clients, int)
    for i, stats in enumerate(out):
        ids, acc, why = rows[i], accepted[i], reason[i]
        for c, w in zip(ids, why):
            screened[c] += w != 4            # "reputation": refused unread, not screened
            flagged[c] += w in (1, 2, 3)     # non_finite, norm_outlier, direction
        assert stats.train_loss == float(np.mean(table.loss[i]))
        np.testing.assert_array_equal(stats.norms, table.norm[i][acc])
        assert stats.attackers == sum(attackers[c] for c in ids)
        assert stats.honest_rejected == sum(1 for c, a in zip(ids, acc) if not a and not attackers[c])
        assert stats.excluded_total == int(((flagged >= min_flags) & (2 * flagged > screened)).sum())
        assert stats.seconds == 0.25
        if sigma:
            eps = privacy.epsilon_for_history([(5 + i + 1, sigma)], sampling_rate=C / num_clients,
                                              delta=1e-5, accountant="rdp")
            assert stats.dp_epsilon == eps and (i == 0 or eps > out[i - 1].dp_epsilon)
        else:
            assert stats.dp_epsilon is None
    assert len(out) == n and state.round == 5 + n and state.params == "new"
    np.testing.assert_array_equal(state.reputation, np.stack([screened, flagged], 1))
    assert state.dp_segments == ((5 + n, sigma),)   # the σ history is kept without DP too


def test_conclude_block_stops_at_a_diverged_round_keeping_the_rounds_before():
    rules = algorithm_lib.HostRules(np.zeros(6, bool), 10, 0, 0.5, 1e-5, "rdp", 0.1, 1.0)
    table = _Table(np.array([[0.5, 0.7], [np.nan, 0.2], [0.1, 0.1]], np.float32),
                   np.ones((3, 2)), np.ones((3, 2), bool), np.zeros((3, 2), np.int32))
    state, out = algorithm_lib.ServerState(None, 0, 0.0, (), np.zeros((6, 2), np.int32)), []
    with pytest.raises(algorithm_lib.TrainingError, match=r"diverged in round 2 \(mean client "
                       r"loss nan\); lower config.client.learning_rate \(0.1\) or "
                       r"config.server.learning_rate \(1.0\)"):
        algorithm_lib.conclude_block(rules, state, None, np.array([[0, 1], [2, 3], [4, 5]]),
                                     table, 1.0, out)
    assert [s.train_loss for s in out] == [pytest.approx(0.6)]
