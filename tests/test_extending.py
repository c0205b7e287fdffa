"""docs/extending.md runs as written: its code blocks, in order, register a method, a model
and a dataset, train with them and see a bad option refused. The registrations are undone
afterwards, so other tests on this worker see the built-in registries only."""
import contextlib
import io
import os
import re
import sys

import numpy as np

from fiarse_jax import models, policies
from fiarse_jax.data import DATASETS
from fiarse_jax.data.registry import check_data_config

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def _blocks() -> list[str]:
    with open(os.path.join(REPO, "docs", "extending.md"), encoding="utf-8") as f:
        return re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)


def test_the_extension_guide_runs_as_written(tmp_path, monkeypatch):
    blocks = _blocks()
    assert len(blocks) == 4   # method, model, dataset, run
    monkeypatch.chdir(tmp_path)   # the guide writes runs/ under the working directory
    monkeypatch.setattr(sys, "path", [os.path.join(REPO, "configs")] + sys.path)
    namespace: dict = {}
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            for block in blocks:
                exec(compile(block, "docs/extending.md", "exec"), namespace)
        summary = namespace["summary"]
        # The toy method really is a policy of the engine: level r holds about r of the 36
        # maskable parameters (one uniform draw: binomial noise of ±0.07 at r = 1/4).
        kept = summary["kept_fraction"]
        assert kept["1"] == 1.0 and kept["1/16"] < kept["1/4"] < 0.5
        # The linear model on blobs learns: the full model beats chance (25 %) well.
        assert summary["final"]["global_accuracy"] > 0.5
        assert summary["config"]["method"] == "random_mask"
        assert summary["config"]["model"] == {"name": "linear"}
        # The typo was refused in one line, before the run directory was made.
        assert ("config.random_mask.fixd = True: is not an option of random_mask; "
                "options: ['fixed']") in out.getvalue()
        assert not (tmp_path / "runs" / "extending_bad").exists()
        # The dataset's own check speaks through the registry.
        bad = dict(name="blobs", n=50)
        try:
            check_data_config(bad)
            raise AssertionError("data.n = 50 was accepted")
        except ValueError as e:
            assert str(e) == "data.n = 50: must be an integer ≥ 200"
        # The drawn masks are the policy's: the mask of level 1/16 is inside level 1/4's.
        policy = policies.build_policy("random_mask", (1.0, 0.25, 0.0625))
        params = {"Dense_0": {"kernel": np.ones((8, 4), np.float32),
                              "bias": np.ones((4,), np.float32)}}
        import jax
        state = policy.prepare(params, 0, jax.random.PRNGKey(3))
        small = policy.mask(params, policy.client_spec(state, 2, None))
        mid = policy.mask(params, policy.client_spec(state, 1, None))
        for s, m in zip(jax.tree_util.tree_leaves(small), jax.tree_util.tree_leaves(mid)):
            assert np.all(np.asarray(s) <= np.asarray(m))
    finally:
        policies.METHODS.pop("random_mask", None)
        models.MODELS.pop("linear", None)
        DATASETS.pop("blobs", None)
