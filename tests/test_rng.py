"""Named random streams: no two consumers of a round ever share a key."""
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fiarse_jax.core import rng
from fiarse_jax.experiment import train
from fiarse_jax.federated import server_round

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "configs"))
import default as default_config  # noqa: E402


def _raw(key) -> tuple:
    return tuple(np.asarray(jax.random.key_data(key) if jnp.issubdtype(
        key.dtype, jax.dtypes.prng_key) else key).ravel().tolist())


def round_consumers(train_key, rnd: int, num_clients: int) -> dict[str, jax.Array]:
    """Every key a round hands out: the round's streams, each client's key and its
    streams."""
    streams = rng.round_streams(train_key, rnd)
    out = {f"round:{k}": v for k, v in streams.items()}
    keys = rng.client_keys(streams["clients"], jnp.arange(num_clients))
    for c in range(num_clients):
        out[f"client{c}"] = keys[c]
        for name, k in rng.client_streams(keys[c]).items():
            out[f"client{c}:{name}"] = k
    return out


def test_no_two_consumers_of_a_round_share_a_key():
    train_key = jax.random.split(jax.random.PRNGKey(0))[1]
    seen = {_raw(rng.eval_key(train_key)): "the run's evaluation key"}
    for rnd in (0, 1, 2, 799):
        for name, key in round_consumers(train_key, rnd, 100).items():
            raw = _raw(key)
            assert raw not in seen, f"round {rnd}: {name} has the key of {seen[raw]}"
            seen[raw] = f"round {rnd} {name}"


def test_dp_noise_is_uncorrelated_with_every_clients_draws():
    train_key = jax.random.PRNGKey(3)
    consumers = round_consumers(train_key, 0, 100)
    noise = np.asarray(jax.random.normal(consumers["round:server"], (4096,)))
    for c in range(100):
        for stream in ("", ":spec", ":order", ":steps"):
            draw = np.asarray(jax.random.normal(consumers[f"client{c}{stream}"], (4096,)))
            assert abs(np.corrcoef(noise, draw)[0, 1]) < 0.1, (c, stream)


@pytest.mark.parametrize("reduce", ["stream", "stack"])
def test_the_training_loop_hands_out_the_named_streams(tmp_path, monkeypatch, reduce):
    """One DP round: the key the server step draws its noise with is the round's
    ``server`` stream, and no client (nor any stream of a client) receives it; the
    clients' keys come from ``clients``."""
    given = {"streams": [], "clients": [], "server": []}
    real_streams, real_clients = rng.round_streams, rng.client_keys
    real_stream_round, real_server_round = (server_round.make_streaming_round,
                                            server_round.make_server_round)

    def stream_round(**kw):
        s = real_stream_round(**kw)

        def finish(params, sums, key, divisor):
            given["server"].append(key)
            return s.finish(params, sums, key, divisor)
        return s._replace(finish=finish)

    def server_step(**kw):
        step = real_server_round(**kw)

        def run(params, deltas, masks, levels, key, divisor, *excluded):
            given["server"].append(key)
            return step(params, deltas, masks, levels, key, divisor, *excluded)
        return run

    monkeypatch.setattr(server_round, "make_streaming_round", stream_round)
    monkeypatch.setattr(server_round, "make_server_round", server_step)

    def streams(train_key, rnd):
        out = real_streams(train_key, rnd)
        given["streams"].append(out)
        return out

    def clients(key, ids):
        out = real_clients(key, ids)
        given["clients"].append((key, out))
        return out

    monkeypatch.setattr(rng, "round_streams", streams)
    monkeypatch.setattr(rng, "client_keys", clients)
    c = default_config.get_config()
    c.num_rounds, c.eval_every, c.checkpoint_every = 1, 1, 0
    c.dp.noise_multiplier = 1.0
    c.engine.reduce = reduce
    # One round per program: the keys are concrete values (a block of rounds traces them;
    # test_rounds_program checks that block against these rounds, DP noise included).
    c.engine.rounds_per_program = 1
    train.train_and_evaluate(c, str(tmp_path / "run"), progress=False)
    s = given["streams"][0]
    assert len(given["server"]) == 1 and _raw(given["server"][0]) == _raw(s["server"])
    clients_key, keys = given["clients"][0]
    assert _raw(clients_key) == _raw(s["clients"])
    client_raw = {_raw(k) for k in keys} | {_raw(v) for k in keys
                                           for v in rng.client_streams(k).values()}
    assert _raw(s["server"]) not in client_raw and _raw(s["attack"]) not in client_raw
