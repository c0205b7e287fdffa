"""fiarse-jax reproduce: six variants on one schedule, beside the paper's cells."""
import json
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "configs"))
import digits_scalefl  # noqa: E402

from fiarse_jax.cli import reproduce  # noqa: E402
from fiarse_jax.experiment.config import ConfigError  # noqa: E402


def tiny():
    c = digits_scalefl.get_config()
    c.capacities = (1.0, 0.25, 1 / 16, 1 / 64)
    c.num_rounds, c.eval_every, c.checkpoint_every = 2, 2, 0
    c.paper = "cifar10_four"      # the paper's cells, to check the report's arithmetic
    # Test sets scored one sample per batch: one compile of the scorer per run, not one per
    # remainder length (the MLP has no batch statistics: the same numbers).
    c.eval.batch_size = 1
    return c


def test_the_six_variants_differ_only_in_method_and_options():
    configs = reproduce.variant_configs(tiny(), list(reproduce.VARIANTS))
    assert list(configs) == ["fiarse_tcb", "fiarse_masked", "heterofl", "fedrolex", "scalefl",
                             "fedavg_smallest"]
    assert [c.method for c in configs.values()] == ["fiarse", "fiarse", "heterofl", "fedrolex",
                                                    "scalefl", "fedavg_smallest"]
    assert configs["fiarse_tcb"].fiarse.gradient == "tcb"
    assert configs["fiarse_masked"].fiarse.gradient == "masked"
    base = tiny().to_dict()
    for v, c in configs.items():
        d = c.to_dict()
        assert {k for k in d if d[k] != base[k]} <= {"method", "fiarse", "model"}
        # Exit heads only where the method trains them: nothing else of the model changes.
        assert d["model"] == {**base["model"], "early_exits": v == "scalefl"}


def test_reproduce_report_numbers_are_the_runs_beside_the_paper(tmp_path):
    variants = ["fiarse_masked", "heterofl", "fedavg_smallest"]   # three keep the test short
    res = reproduce.reproduce(tiny(), str(tmp_path), variants)
    assert res["variants"] == variants and not res["failures"]
    labels = res["labels"]
    assert labels == ["1/64", "1/16", "1/4", "1"]
    s = res["summaries"]
    paper = reproduce.PAPER["cifar10_four"]
    text = (tmp_path / "reproduction.md").read_text()
    for v, n in res["numbers"].items():
        f = s[v]["final"]
        glob = 100 * np.mean([f["capacity_global_accuracy"][l] for l in labels])
        assert n["global"]["mean"] == pytest.approx(glob) and n["global"]["std"] == 0
        for l in labels:
            assert n["sizes"][l]["mean"] == pytest.approx(100 * f["local_accuracy_client_mean"][l])
        # The overall local number: the mean over clients of each one's own accuracy.
        per_client = [f["local_accuracy_client_mean"][l] for l in labels
                      for _ in range(s[v]["clients_per_level"][l])]
        assert n["local"]["mean"] == pytest.approx(100 * np.mean(per_client))
        ref = paper.get(reproduce.VARIANTS[v][2], {})
        row = next(r for r in text.splitlines() if r.startswith(f"| `{v}` |"))
        cells = [c.strip() for c in row.split("|")[2:-1]]
        expect = [(n["local"]["mean"], ref.get("local"))] + [
            (n["sizes"][l]["mean"], ref.get("sizes", {}).get(l)) for l in labels] + [
            (glob, ref.get("global"))]
        for cell, (ours, p) in zip(cells, expect):
            assert cell == (f"{ours:.2f} ({p:.2f}, {ours - p:+.2f})" if p else f"{ours:.2f}")
    heterofl_row = next(r for r in text.splitlines() if r.startswith("| `heterofl` |"))
    assert all(f"({c:.2f}, " in heterofl_row for c in [68.88, 60.24, 69.32, 72.18, 73.76, 66.05])
    assert "## Direction of the paper's claims" in text
    assert "`fiarse_masked` − `heterofl`, local:" in text
    assert json.loads((tmp_path / "reproduction.json").read_text())["paper"] == "cifar10_four"
    assert (tmp_path / "reproduction_vs_paper.png").stat().st_size > 10_000


def test_reproduce_over_seeds_mean_std_and_a_stopped_command_resumes(tmp_path):
    variants = ["fiarse_masked", "heterofl"]
    first = reproduce.reproduce(tiny(), str(tmp_path), variants, seeds=[0, 1])
    per_seed = {}
    for seed in (0, 1):
        for v in variants:
            d = tmp_path / f"seed_{seed}" / v
            summary = json.loads((d / "summary.json").read_text())
            assert summary["config"]["seed"] == seed
            per_seed[seed, v] = summary
    # The seed drives the partition: the two seeds' clients hold different data.
    assert (json.loads((tmp_path / "seed_0" / "heterofl" / "partition.json").read_text())
            != json.loads((tmp_path / "seed_1" / "heterofl" / "partition.json").read_text()))
    labels = first["labels"]
    for v in variants:
        glob = [100 * np.mean([per_seed[s, v]["final"]["capacity_global_accuracy"][l]
                               for l in labels]) for s in (0, 1)]
        g = first["numbers"][v]["global"]
        assert g["seeds"] == pytest.approx(glob)
        assert g["mean"] == pytest.approx(np.mean(glob))
        assert g["std"] == pytest.approx(np.std(glob, ddof=1))
        row = next(r for r in first["table"].splitlines() if r.startswith(f"| `{v}` |"))
        assert f"{np.mean(glob):.2f} ± {np.std(glob, ddof=1):.2f}" in row
    assert "mean ± std over 2 seeds" in first["table"]
    assert set(first["numbers_per_seed"]) == {"0", "1"}
    # A stopped command: seed 1's heterofl never finished. The rerun trains only it.
    import shutil
    shutil.rmtree(tmp_path / "seed_1" / "heterofl")
    kept = {p: p.stat().st_mtime_ns for p in tmp_path.glob("seed_*/*/metrics.jsonl")}
    again = reproduce.reproduce(tiny(), str(tmp_path), variants, seeds=[0, 1])
    assert all(p.stat().st_mtime_ns == t for p, t in kept.items())
    assert (tmp_path / "seed_1" / "heterofl" / "summary.json").exists()
    assert again["numbers"]["heterofl"]["global"]["seeds"] == pytest.approx(
        first["numbers"]["heterofl"]["global"]["seeds"])   # the same run, bit for bit


def test_reproduce_checks_every_variant_before_any_run(tmp_path):
    c = tiny()
    c.model.early_exits = False          # scalefl cannot run: nothing may start
    with pytest.raises(ConfigError, match="variant 'scalefl'"):
        reproduce.reproduce(c, str(tmp_path / "r"))
    assert not (tmp_path / "r").exists()
    with pytest.raises(ConfigError, match="unknown \\['fedprox'\\]"):
        reproduce.reproduce(tiny(), str(tmp_path / "r"), ["fiarse_tcb", "fedprox"])
    c = tiny()
    c.paper = "mnist"
    with pytest.raises(ConfigError, match="config.paper = 'mnist'"):
        reproduce.reproduce(c, str(tmp_path / "r"))


def _fake(local, glob, labels, paper_key="cifar10_four", method="fiarse"):
    """One variant's ``numbers`` entry with the given accuracies (%)."""
    ref = reproduce.PAPER.get(paper_key, {}).get(method, {})
    return {"local": local, "sizes": {l: local for l in labels}, "global": glob,
            "capacity_global": {l: glob for l in labels}, "full_model": glob,
            "params_held": {l: 10 for l in labels}, "kept_fraction": {l: 0.5 for l in labels},
            "exit_params_held": {l: None for l in labels},
            "paper": {"local": ref.get("local"),
                      "sizes": {l: ref.get("sizes", {}).get(l) for l in labels},
                      "global": ref.get("global")}}


def test_report_keeps_a_variant_missing_from_the_first_seed_and_odd_sizes():
    labels = ["1/2", "1"]            # sizes the paper's table does not have
    per_seed = {0: {"fiarse_masked": _fake(40.0, 38.0, labels)},
                1: {"fiarse_masked": _fake(42.0, 39.0, labels),
                    "heterofl": _fake(30.0, 29.0, labels, method="heterofl")},
                2: {"fiarse_masked": _fake(44.0, 40.0, labels),
                    "heterofl": _fake(34.0, 31.0, labels, method="heterofl")}}
    agg = reproduce.aggregate(per_seed)
    assert list(agg) == ["fiarse_masked", "heterofl"]     # failed in seed 0, not dropped
    assert agg["heterofl"]["local"]["seeds"] == [30.0, 34.0]
    assert agg["heterofl"]["num_seeds"] == 2
    text = reproduce.markdown(per_seed, labels, {"heterofl (seed 0)": "boom"}, "cifar10_four",
                              {"data": "x", "global test": "y"})
    row = next(r for r in text.splitlines() if r.startswith("| `heterofl` |"))
    assert "32.00 ± 2.83 (68.88, -36.88)" in row           # overall local beside the paper's
    assert "heads n/a" in text                              # a summary without the field
    assert "`fiarse_masked` − `heterofl`, local: +11.00 ± 1.41, above in 2 of 2 seeds" in text
    one = {0: {"fiarse_masked": _fake(40.0, 38.0, labels)},
           1: {"fiarse_masked": _fake(42.0, 39.0, labels), "heterofl": _fake(30.0, 29.0, labels)}}
    row = next(r for r in reproduce.markdown(one, labels, {}, "", {"data": "x"}).splitlines()
               if r.startswith("| `heterofl` |"))
    assert "30.00 (1 seed)" in row                          # not "± 0.00"
