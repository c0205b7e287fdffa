"""The FIARSE policy: each client gets its own level's threshold and mask."""
import chex
import jax
import jax.numpy as jnp
import pytest

from conftest import make_params
from fiarse_jax import masks, policies

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
