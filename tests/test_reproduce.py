"""fiarse-jax reproduce: six variants on one schedule, beside the paper's cells."""
import json
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "configs"))
import digits_scalefl  # noqa: E402

from fiarse_jax import reproduce  # noqa: E402
from fiarse_jax.config import ConfigError  # noqa: E402


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
    for c in configs.values():
        d = c.to_dict()
        assert {k for k in d if d[k] != base[k]} <= {"method", "fiarse"}


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
        assert n["global"] == pytest.approx(glob)
        for l in labels:
            assert n["local"][l] == pytest.approx(100 * f["local_accuracy_client_mean"][l])
        ref = paper.get(reproduce.VARIANTS[v][2], {}).get("global")
        cell = f"{glob:.2f} ({ref:.2f}, {glob - ref:+.2f})" if ref else f"{glob:.2f}"
        row = next(r for r in text.splitlines() if r.startswith(f"| `{v}` |") and "(" in r
                   or r.startswith(f"| `{v}` |") and v == "fedavg_smallest")
        assert cell in row, (v, cell, row)
    fiarse_row = next(r for r in text.splitlines() if r.startswith("| `fiarse_masked` |"))
    assert "(73.12, " in fiarse_row and "(82.04, " in fiarse_row
    assert "## Direction of the paper's claims" in text
    assert json.loads((tmp_path / "reproduction.json").read_text())["paper"] == "cifar10_four"
    assert (tmp_path / "reproduction_vs_paper.png").stat().st_size > 10_000


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
