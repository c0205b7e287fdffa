"""connectivity: levels whose initial sub-model is cut off from the input, re-derived."""
import math

import jax
import jax.numpy as jnp
import numpy as np

from fiarse_jax import models, policies
from fiarse_jax.core import connectivity
from fiarse_jax.core.masks import maskable_flags


def _theta(params, r):
    """The ⌈r·N⌉-th largest |w| over the maskable parameters, in NumPy."""
    leaves = [np.abs(np.asarray(l)).ravel() for l, f in
              zip(jax.tree_util.tree_leaves(params), maskable_flags(params)) if f]
    w = np.sort(np.concatenate(leaves))[::-1]
    return w[math.ceil(r * len(w)) - 1]


def test_the_default_mlp_level_one_sixteenth_starts_cut_at_its_output_layer():
    model = models.build_model("mlp", 10, {"hidden_sizes": (128,)})
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 64)))["params"]
    caps = (1.0, 0.25, 1 / 16)
    policy = policies.build_policy("fiarse", caps)
    got = connectivity.disconnected_levels(policy, model, params, policy.prepare(params, 0, None),
                                           ["1", "1/4", "1/16"])
    want = {}
    for r, label in zip(caps, ["1", "1/4", "1/16"]):
        theta = _theta(params, r)
        cut = [n for n in ("Dense_0", "Dense_1")
               if not (np.abs(np.asarray(params[n]["kernel"])) >= theta).any()]
        if cut:
            want[label] = cut
    assert got == want == {"1/16": ["Dense_1"]}
    assert "1/16: Dense_1" in connectivity.note(got) and connectivity.note({}) is None


def test_resnet_cuts_are_stem_projecting_blocks_and_head():
    model = models.build_model("resnet18", 10, {"widths": (4, 8), "blocks_per_stage": (1, 1)})
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)))["params"]
    ones = jax.tree_util.tree_map(jnp.ones_like, params)
    cuts = model.output_cuts()
    assert list(cuts) == ["stem", "stage2/block1", "head"]   # stage 1: identity shortcuts

    def without(mask, *paths):
        for p in paths:
            node = mask
            for k in p[:-1]:
                node = node[k]
            node[p[-1]] = jnp.zeros_like(node[p[-1]])
        return mask

    b = ("stage2", "block1")
    conv_path = without(jax.tree_util.tree_map(lambda x: x, ones), b + ("conv1", "kernel"))
    assert connectivity.empty_cuts(conv_path, cuts) == []          # the shortcut carries it
    both = without(conv_path, b + ("shortcut", "conv", "kernel"))
    assert connectivity.empty_cuts(both, cuts) == ["stage2/block1"]
    identity = without(jax.tree_util.tree_map(lambda x: x, ones),
                       ("stage1", "block1", "conv1", "kernel"))
    assert connectivity.empty_cuts(identity, cuts) == []
    assert connectivity.empty_cuts(without(identity, ("head", "kernel")), cuts) == ["head"]


def test_untrained_exit_heads_cut_off_the_cpu_resnets_smallest_level():
    """The CPU reproduction's ResNet: with exit heads FIARSE's 1/64 level holds no head
    weight at round 0 (the heads took its budget); built without them it does."""
    labels = ["1", "1/4", "1/16", "1/64"]
    found = {}
    for exits in (True, False):
        model = models.build_model("resnet18", 10, {"widths": (8, 16, 32, 64),
                                                    "blocks_per_stage": (1, 1, 1, 1),
                                                    "early_exits": exits})
        params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))["params"]
        policy = policies.build_policy("fiarse", (1.0, 1 / 4, 1 / 16, 1 / 64))
        found[exits] = connectivity.disconnected_levels(
            policy, model, params, policy.prepare(params, 0, None), labels)
        theta = _theta(params, 1 / 64)
        assert (not (np.abs(np.asarray(params["head"]["kernel"])) >= theta).any()) == exits
    assert found == {True: {"1/64": ["head"]}, False: {}}
