"""benchmarks/suite.py times the round training runs: the suite builds its rounds with
training's builder (``build_run`` + ``build_algorithm``), and a round as the suite runs it
gives the same params as the same round run by ``train_and_evaluate``."""
import os
import sys

import jax
import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import suite  # noqa: E402

#: A small digits-shaped workload: 4 clients (≥ one per capacity level), K = 2, batch 10.
SPEC = {"kind": "jax", "model": "mlp", "model_kwargs": {"hidden_sizes": [16]}, "clients": 4,
        "steps": 2, "batch": 10, "samples": 20, "rounds": 1, "reduce": "stream"}


@pytest.mark.parametrize("strategy,program", [("loop", False), ("vmap", True)],
                         ids=["loop-one-program-per-round", "vmap-rounds-in-one-program"])
def test_benchmark_round_gives_the_training_rounds_params(tmp_path, monkeypatch, strategy,
                                                          program):
    """The suite's warm-up and timed rounds against ``train_and_evaluate`` on the same
    config (same rounds, checkpoints off): the same params, bit for bit."""
    from fiarse_jax.experiment import train
    from fiarse_jax.federated.algorithm import build_algorithm

    spec = {**SPEC, "strategy": strategy, "program": program}
    bench, alg, first_s, round_s = suite.run_rounds(spec)
    assert alg.rounds_per_program == (2 if program else 1) and first_s > 0 and round_s > 0

    finals = []

    def recording(run):   # training's algorithm, its states kept
        algorithm = build_algorithm(run)

        def apply_rounds(state, ids):
            state, stats = algorithm.apply_rounds(state, ids)
            finals.append(state)
            return state, stats

        return algorithm._replace(apply_rounds=apply_rounds)

    monkeypatch.setattr(train, "build_algorithm", recording)
    config = suite.round_config(spec)
    assert config.checkpoint_every == 0 and config.num_rounds == 2
    train.train_and_evaluate(config, str(tmp_path / "run"))
    trained = finals[-1]
    assert trained.round == bench.round == 2
    got, want = jax.device_get(bench.params), jax.device_get(trained.params)
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
    jax.tree_util.tree_map(np.testing.assert_array_equal, got, want)


def test_resnet_sweep_plot_reads_the_suites_ratios_and_draws(tmp_path):
    """``resnet_sweep_plot`` keeps the JAX rows that have a PyTorch ratio, from every file,
    and writes the PNG; a file without such rows is a one-line parser error."""
    import json

    import resnet_sweep_plot as rsp
    rows = [{"framework": "jax", "strategy": "loop", "clients": 3, "steps": k, "vs_torch": r}
            for k, r in ((5, 1.2), (20, 1.3))]
    rows += [{"framework": "torch", "strategy": "torch", "clients": 3, "steps": 5,
              "vs_torch": 1.0},
             {"framework": "jax", "strategy": "vmap", "clients": 3, "steps": 5,
              "error": "failed"}]
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps({"resnet": rows}))
    b.write_text(json.dumps({"resnet": [{**rows[0], "clients": 10, "vs_torch": 1.25,
                                         "variant": "program"}]}))
    found = rsp.rows([str(a), str(b)])
    assert [(r["clients"], r["steps"], rsp.label(r)) for r in found] == [
        (3, 5, "loop"), (3, 20, "loop"), (10, 5, "loop (program)")]
    rsp.main([str(a), str(b), "--out", str(tmp_path / "p.png")])
    assert (tmp_path / "p.png").stat().st_size > 0
    (tmp_path / "empty.json").write_text("{}")
    with pytest.raises(SystemExit):
        rsp.main([str(tmp_path / "empty.json"), "--out", str(tmp_path / "q.png")])


def test_conv_options_times_every_option_set_and_writes_json(tmp_path, monkeypatch):
    """``conv_options`` on a tiny shape: every option set compiles and is timed, ours is
    ``compiler_options("auto")``'s, and the JSON holds what was printed."""
    import json

    import conv_options

    from fiarse_jax.federated import xla
    sets = conv_options.option_sets()
    assert sets["ours (engine.xla=auto)"] == xla.compiler_options("auto")
    assert sets["XLA defaults"] == {} and len(sets) == 5
    monkeypatch.setattr(conv_options, "SHAPES", [(4, 2, 3)])
    monkeypatch.setattr(conv_options, "time_torch", lambda repeats: None)
    out = tmp_path / "conv.json"
    result = conv_options.main(["--repeats", "1", "--out", str(out)])
    assert json.loads(out.read_text())["ms"] == result["ms"]
    assert list(result["ms"]) == list(sets) and min(result["ms"].values()) > 0
    with pytest.raises(SystemExit):
        conv_options.main(["--repeats", "0", "--out", str(out)])
