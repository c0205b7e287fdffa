"""Run in a subprocess by test_engine_scale.py (devices must be set before jax starts).

  python _engine_worker.py sharded OUT.json
      one process with the devices XLA_FLAGS forces: the sharded strategy (with and
      without chunks, client counts that do and do not divide the device count) and the
      server step on its outputs, stacked and streamed, against the single-device vmap
      round.
  python _engine_worker.py train WORKDIR PORT PROCESS_ID NUM_PROCESSES [ROUNDS [STORE]]
      one of several processes joined by jax.distributed on localhost (through the CLI's
      --distributed path, main.initialize_distributed), running train_and_evaluate
      (sharded over every process's devices) on a short default run of ROUNDS rounds
      (default 3); with STORE, under helpers.mock_gcs(STORE), so a gs:// WORKDIR is one
      bucket shared by every process, as on a pod.

``sharded`` writes the largest absolute differences it found, as JSON.
"""
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fiarse_jax import models, policies
from fiarse_jax.core import server
from fiarse_jax.data import stack_clients
from fiarse_jax.federated import devices, engine
from fiarse_jax.federated.client import make_client_fns
from fiarse_jax.federated.server_round import make_streaming_round


def problem(num_clients: int, compute_dtype=None, hidden=(16, 8)):
    rng = np.random.default_rng(0)
    model = models.build_model("mlp", 4, {"hidden_sizes": hidden})
    sizes = rng.integers(3, 30, num_clients)
    x = rng.normal(size=(int(sizes.sum()), 8, 8, 1)).astype(np.float32)
    y = rng.integers(0, 4, int(sizes.sum())).astype(np.int32)
    data = stack_clients(x, y, np.split(np.arange(sizes.sum()), np.cumsum(sizes)[:-1]))
    params = model.init(jax.random.PRNGKey(0), x[:1])["params"]

    def loss(p, xb, yb, key, spec=None):
        logits = model.apply({"params": p}, xb).astype(jnp.float32)
        return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

    policy = policies.build_policy("fiarse", (1.0, 0.5, 0.25), {"gradient": "tcb"})
    fns = make_client_fns(loss, policy, optax.sgd(0.1), num_steps=3, batch_size=8,
                          compute_dtype=compute_dtype)
    state = policy.prepare(params, 0, jax.random.PRNGKey(0))
    keys = jax.random.split(jax.random.PRNGKey(7), num_clients)
    levels = jnp.asarray(np.arange(num_clients) % 3)
    specs = jax.vmap(policy.client_spec, in_axes=(None, 0, 0))(state, levels, keys)
    return fns, params, specs, data, keys


def max_diff(a, b) -> float:
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
               for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def compare(cases) -> dict:
    """Per (clients, chunk): the sharded round on the first ``clients`` clients of one
    problem against the single-device vmap round on all of them (clients are independent,
    so its first rows are the reference)."""
    fns, params, specs, data, keys = problem(max(n for n, _ in cases))
    ref = engine.make_round_runner(fns, "vmap")(params, specs, data, keys)
    runs = {}
    for n, chunk in cases:
        first = lambda tree: jax.tree_util.tree_map(lambda a: a[:n], tree)  # noqa: E731
        ref_n = first(ref)
        ref_params = server.aggregate(params, ref_n.delta, ref_n.mask)
        out = engine.make_round_runner(fns, "sharded", clients_per_chunk=chunk)(
            params, first(specs), first(data), first(keys))
        new_params = server.aggregate(devices.replicate(params), out.delta, out.mask)
        # Streamed: per-device sums, psum-ed across devices; padding must add nothing.
        stream = make_streaming_round()
        sums, stats = engine.make_round_runner(
            fns, "sharded", clients_per_chunk=chunk, reduce=stream.contribution)(
            params, first(specs), first(data), first(keys))
        fresh = devices.replicate(jax.tree_util.tree_map(jnp.copy, params))   # donated
        streamed = stream.finish(fresh, sums, jax.random.PRNGKey(0), 0.0)
        run = {"replicated": jax.tree_util.tree_leaves(new_params)[0].sharding.is_fully_replicated,
               "result": max_diff(out, ref_n), "shape": list(out.loss.shape),
               "params": max_diff(new_params, ref_params),
               "streamed_params": max_diff(streamed, ref_params),
               "streamed_counts": max_diff(sums[1], jax.tree_util.tree_map(
                   lambda m: m.astype(jnp.float32).sum(0), ref_n.mask)),
               "streamed_loss": max_diff(stats.loss, ref_n.loss)}
        runs[f"{n}_clients_chunk_{chunk}"] = run
    return runs


def short_config():
    """The default config, 3 rounds, sharded, a checkpoint every round: shared with the test."""
    import os
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs"))
    import default
    cfg = default.get_config()
    cfg.num_rounds, cfg.eval_every, cfg.checkpoint_every, cfg.tensorboard = 3, 3, 1, False
    cfg.eval.batch_size = 1   # one batch length: one compile of the scorer, not one per length
    cfg.engine.strategy = "sharded"
    return cfg


if __name__ == "__main__":
    if sys.argv[1] == "train":
        import contextlib

        from helpers import mock_gcs

        from fiarse_jax.cli import main
        from fiarse_jax.experiment import train
        workdir, port, pid, nproc = sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
        rest = sys.argv[6:] + [None] * 2
        cfg = short_config()
        cfg.num_rounds = int(rest[0] or cfg.num_rounds)
        main.initialize_distributed(f"localhost:{port}", num_processes=nproc, process_id=pid)
        with mock_gcs(rest[1]) if rest[1] else contextlib.nullcontext():
            train.train_and_evaluate(cfg, workdir, progress=False)
        jax.distributed.shutdown()
        sys.exit(0)
    runs = {"devices": jax.device_count(), **compare([(8, 0), (11, 2)])}
    with open(sys.argv[2], "w") as f:
        json.dump(runs, f)
