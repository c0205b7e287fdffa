"""The comparison command end to end on a tiny config."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "configs"))
import default as default_config  # noqa: E402

from fiarse_jax.cli import compare  # noqa: E402
from fiarse_jax.experiment.config import ConfigError  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny():
    c = default_config.get_config()
    c.num_rounds, c.eval_every = 2, 1
    # Test sets scored one sample per batch: one compile of the scorer per run, not one per
    # remainder length (the MLP has no batch statistics: the same numbers).
    c.eval.batch_size = 1
    return c


def test_compare_same_schedule_table_and_plots(tmp_path):
    res = compare.compare(tiny(), ["fiarse", "heterofl", "fedavg_full"], str(tmp_path))
    table = (tmp_path / "comparison.md").read_text()
    lines = table.strip().splitlines()
    assert lines[0].startswith("| method | local 1/16 | local 1/4 | local 1 |")
    assert [l.split("|")[1].strip() for l in lines[2:]] == ["`fiarse`", "`heterofl`", "`fedavg_full`"]
    for png in ("accuracy_vs_round.png", "accuracy_per_capacity.png"):
        assert (tmp_path / png).stat().st_size > 10_000
    s = res["summaries"]
    # Same partition and schedule: identical client counts per level and identical data sizes.
    assert s["fiarse"]["clients_per_level"] == s["heterofl"]["clients_per_level"]
    # fedavg_full's every level is the full model, so its per-level global numbers are equal.
    g = s["fedavg_full"]["final"]["capacity_global_accuracy"]
    assert len(set(g.values())) == 1 and g["1"] == s["fedavg_full"]["final"]["global_accuracy"]
    # The table's "global" column is the mean over sizes of each sub-model's global accuracy.
    f = s["fiarse"]["final"]["capacity_global_accuracy"]
    assert f"{100 * sum(f.values()) / 3:.2f}" in lines[2]
    assert json.loads((tmp_path / "comparison.json").read_text())["methods"] == [
        "fiarse", "heterofl", "fedavg_full"]


@pytest.mark.parametrize("methods,match", [(["fiarse", "fedprox"], "unknown \\['fedprox'\\]"),
                                           (["fiarse", "fiarse"], "listed twice"), ([], "unknown")])
def test_compare_rejects_bad_methods_before_any_run(tmp_path, methods, match):
    with pytest.raises(ConfigError, match=match):
        compare.compare(tiny(), methods, str(tmp_path / "cmp"))
    assert not (tmp_path / "cmp").exists()


def test_compare_cli(tmp_path):
    r = subprocess.run([sys.executable, "-m", "fiarse_jax", "compare", "--config",
                        os.path.join(REPO, "configs", "default.py"), "--methods", "fiarse,fedrolex",
                        "--workdir", str(tmp_path), "--config.num_rounds=1",
                        "--config.eval.batch_size=1"],   # one scorer compile per method
                       capture_output=True, text=True, timeout=300, cwd=REPO)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "| `fedrolex` |" in r.stdout and (tmp_path / "comparison.md").exists()
    r = subprocess.run([sys.executable, "-m", "fiarse_jax", "--config",
                        os.path.join(REPO, "configs", "default.py"), "--methods", "fiarse",
                        "--workdir", str(tmp_path / "x")], capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "--methods does not go with `train`" in r.stderr


def test_a_failing_method_leaves_the_others_and_marks_its_row(tmp_path, monkeypatch):
    from fiarse_jax.experiment import train
    real = train.train_and_evaluate

    def flaky(cfg, workdir, **kw):
        if cfg.method == "heterofl":
            raise train.TrainingError("training diverged in round 2 | (mean client loss nan)")
        return real(cfg, workdir, **kw)

    monkeypatch.setattr(train, "train_and_evaluate", flaky)
    res = compare.compare(tiny(), ["fiarse", "heterofl", "fedavg_full"], str(tmp_path))
    assert set(res["summaries"]) == {"fiarse", "fedavg_full"}
    assert res["failures"] == {"heterofl": "TrainingError: training diverged in round 2 \\| "
                                           "(mean client loss nan)"}
    rows = (tmp_path / "comparison.md").read_text().strip().splitlines()[2:]
    assert [r.split("|")[1].strip() for r in rows] == ["`fiarse`", "`fedavg_full`", "`heterofl`"]
    assert "**failed**: TrainingError: training diverged" in rows[-1]
    assert len(rows[-1].split(" | ")) == len(rows[0].split(" | "))   # same column count
    assert json.loads((tmp_path / "comparison.json").read_text())["failures"] == res["failures"]


@pytest.mark.parametrize("value,match", [
    ("", "--seeds '': expected distinct non-negative integers"),
    ("0,,1", "--seeds '0,,1': expected distinct non-negative integers"),
    ("0,-1", "--seeds '0,-1': -1 is negative"),
    ("1,2,1", "--seeds '1,2,1': 1 is listed twice"),
    ("0,1.5", "--seeds '0,1.5': '1.5' is not an integer"),
    ("a", "--seeds 'a': 'a' is not an integer")])
def test_bad_seeds_are_one_line_each(value, match):
    with pytest.raises(ConfigError) as err:
        compare.parse_seeds(value)
    assert str(err.value).startswith(match) and "\n" not in str(err.value)
    assert compare.parse_seeds(" 2, 0 ,1") == [2, 0, 1] and compare.parse_seeds(None) is None


def test_bad_seeds_on_the_command_line_stop_before_any_run(tmp_path):
    r = subprocess.run([sys.executable, "-m", "fiarse_jax", "compare", "--config",
                        os.path.join(REPO, "configs", "default.py"), "--methods", "fiarse",
                        "--workdir", str(tmp_path / "cmp"), "--seeds", "0,-3"],
                       capture_output=True, text=True, timeout=300, cwd=REPO)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == ["fiarse-jax: error: --seeds '0,-3': -3 is negative "
                                             "(seeds are ≥ 0)"]
    assert not (tmp_path / "cmp").exists()


def test_compare_over_seeds_shows_mean_and_std(tmp_path):
    c = tiny()
    c.num_rounds = 1
    res = compare.compare(c, ["fiarse", "heterofl"], str(tmp_path), seeds=[3, 4])
    rows = res["table"].strip().splitlines()[2:]
    for row, m in zip(rows, ["fiarse", "heterofl"]):
        runs = [res["summaries"][s][m] for s in ("3", "4")]
        assert [r["config"]["seed"] for r in runs] == [3, 4]
        full = [100 * r["final"]["global_accuracy"] for r in runs]
        assert f"{np.mean(full):.2f} ± {np.std(full, ddof=1):.2f}" in row
    assert (tmp_path / "seed_4" / "heterofl" / "summary.json").exists()
    assert (tmp_path / "accuracy_vs_round.png").stat().st_size > 10_000


def test_only_methods_that_train_exit_heads_are_built_with_them():
    """Exit heads a method never trains would take its budget (their initial magnitudes
    rank high under FIARSE): compare/reproduce build them only for scalefl, and every
    other parameter starts the same with or without them (Flax seeds a module by name)."""
    import digits_scalefl  # noqa: PLC0415
    import jax
    import jax.numpy as jnp

    from fiarse_jax import models, policies
    base = digits_scalefl.get_config()
    for m in policies.METHODS:
        cfg = compare.method_config(base, m)
        assert cfg.model.early_exits == (m == "scalefl"), m
        assert cfg.model.hidden_sizes == base.model.hidden_sizes
    for name, opts, x in [("mlp", {"hidden_sizes": (16, 16, 16)}, jnp.zeros((1, 64))),
                          ("resnet18", {"widths": (4, 8, 8, 8), "blocks_per_stage": (1, 1, 1, 1)},
                           jnp.zeros((1, 16, 16, 3)))]:
        init = {e: models.build_model(name, 10, {**opts, "early_exits": e}).init(
            jax.random.PRNGKey(0), x)["params"] for e in (True, False)}
        with_heads = dict(jax.tree_util.tree_flatten_with_path(init[True])[0])
        without = dict(jax.tree_util.tree_flatten_with_path(init[False])[0])
        assert len(with_heads) > len(without) and set(without) <= set(with_heads)
        for k, v in without.items():
            np.testing.assert_array_equal(v, with_heads[k], err_msg=f"{name} {k}")


def test_a_finished_run_is_read_back_only_when_it_measured_the_same_thing(tmp_path):
    from fiarse_jax.experiment import train
    c = tiny()
    c.num_rounds, c.eval_every = 2, 2
    run = str(tmp_path / "run")
    first = train.train_and_evaluate(c, run)
    assert compare.finished_summary(run, c) == json.loads(
        json.dumps(first, default=str))                            # read back as it is
    moved = c.copy_and_resolve_references()
    moved.engine.rounds_per_program = 1                            # how, not what: still read
    assert compare.finished_summary(run, moved) is not None
    for field, value in (("global_order", "dataset"), ("batch_size", 7)):
        other = c.copy_and_resolve_references()
        other.eval[field] = value                                  # another measurement
        assert compare.finished_summary(run, other) is None, field
    longer = c.copy_and_resolve_references()
    longer.num_rounds = 3
    assert compare.finished_summary(run, longer) is None
    # Rerun with the other order: the finished run is re-evaluated, not reported stale.
    other = c.copy_and_resolve_references()
    other.eval.global_order = "dataset"
    again = train.train_and_evaluate(other, run)
    assert again["global_test"]["order"] == "dataset" and again["final"]["round"] == 2
    assert again["final"]["global_accuracy"] == first["final"]["global_accuracy"]   # no BN


def test_a_busy_run_directory_stops_the_comparison_instead_of_racing_it(tmp_path):
    from fiarse_jax.experiment import workdir_lock
    with workdir_lock.hold(str(tmp_path / "cmp" / "heterofl")):   # another command's run
        with pytest.raises(workdir_lock.WorkdirBusy, match="is in use by process"):
            compare.compare(tiny(), ["fiarse", "heterofl", "fedavg_full"], str(tmp_path / "cmp"))
    assert (tmp_path / "cmp" / "fiarse" / "summary.json").exists()      # the one before it
    assert not (tmp_path / "cmp" / "fedavg_full").exists()              # none after it
