"""The FIARSE policy: each client gets its own level's threshold and mask."""
import chex
import jax
import jax.numpy as jnp
import pytest
from conftest import make_params

from fiarse_jax import policies
from fiarse_jax.core import masks

CAPS = (1.0, 0.25, 1 / 16)


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_each_client_gets_its_levels_threshold_and_mask(scope):
    params = make_params()
    policy = policies.build_policy("fiarse", CAPS, {"scope": scope})
    state = policy.prepare(params, 0, jax.random.PRNGKey(0))
    levels = jnp.array([2, 0, 1, 2])
    keys = jax.random.split(jax.random.PRNGKey(1), 4)
    specs = jax.jit(jax.vmap(policy.client_spec, in_axes=(None, 0, 0)))(state, levels, keys)
    for i, lvl in enumerate([2, 0, 1, 2]):
        spec = jax.tree_util.tree_map(lambda t: t[i], specs)
        chex.assert_trees_all_close(spec, masks.importance_threshold(params, CAPS[lvl], scope=scope))
        chex.assert_trees_all_close(policy.mask(params, spec),
                                    masks.importance_mask(params, CAPS[lvl], scope=scope))


def test_registry_errors():
    with pytest.raises(ValueError, match="unknown method 'fedprox'"):
        policies.build_policy("fedprox", CAPS)
    with pytest.raises(ValueError, match="'blockwise'"):
        policies.build_policy("fiarse", CAPS, {"scope": "blockwise"})
    with pytest.raises(TypeError):
        policies.build_policy("fiarse", CAPS, {"gradiant": "tcb"})


STRUCTURED_WITH_BUDGET = ["heterofl", "fedrolex", "fed_dropout", "fiarse_neuron",
                          "fedavg_smallest"]


@pytest.mark.parametrize("name", STRUCTURED_WITH_BUDGET)
def test_budget_option_and_maskability_rule_reach_the_structured_builders(name):
    """``config.<method>.budget`` passes through ``build_policy``; so does the model's
    ``is_maskable``, which sets what the parameter budget counts. Rule: only Dense_1's
    kernel (12 × 8 = 96) is maskable, so r = 1/4 asks for 24 = k0·k1: widths (6, 4)."""
    import inspect

    import numpy as np

    from fiarse_jax import models
    assert {"budget", "is_maskable"} <= set(inspect.signature(policies.POLICIES[name]).parameters)
    model = models.build_model("mlp", 3, {"hidden_sizes": (12, 8)})
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 5)))["params"]
    groups = model.unit_groups(params)
    caps = (1.0, 0.25)

    def kept(pol):
        state = pol.prepare(params, 0, jax.random.PRNGKey(0))
        spec = pol.client_spec(state, 1, jax.random.PRNGKey(0))
        return tuple(int(np.asarray(spec["units"][g]).sum()) for g in ("Dense_0", "Dense_1"))
    rule = lambda path, leaf: path == ("Dense_1", "kernel")   # noqa: E731
    assert kept(policies.build_policy(name, caps, {"budget": "width"}, unit_groups=groups,
                                      is_maskable=rule)) == (3, 2)     # ⌈C/4⌉
    assert kept(policies.build_policy(name, caps, {}, unit_groups=groups,
                                      is_maskable=rule)) == (6, 4)
    with pytest.raises(ValueError,
                       match=r"budget = 'layers': must be one of \['params', 'width'\]"):
        policies.build_policy(name, caps, {"budget": "layers"}, unit_groups=groups)
