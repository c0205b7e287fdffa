"""Cost accounting on a tiny MLP, every number worked out by hand."""
import jax
import jax.numpy as jnp

from fiarse_jax import models, policies

# MLP 4 → 6 → 3 (float32): Dense_0 4·6+6 = 30, Dense_1 6·3+3 = 21; N = 51.
from fiarse_jax.experiment import costs

CAPS = (1.0, 0.5)


def setup():
    model = models.build_model("mlp", 3, {"hidden_sizes": (6,)})
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4)))["params"]
    return model, params, model.unit_groups(params)


def dense_flops(widths):
    """XLA counts a dot as 2·in·out, a bias add as out, a ReLU as out."""
    (i, h, o) = widths
    return (2 * i * h + h + h) + (2 * h * o + o)


def test_structured_costs_by_hand():
    model, params, groups = setup()
    pol = policies.build_policy("heterofl", CAPS, {"scaler": False}, unit_groups=groups)
    c = costs.capacity_costs(model, params, pol, pol.prepare(params, 0, None), CAPS,
                             structured=True, unit_groups=groups, x_one=jnp.zeros((1, 4)))
    # r = 1/2 keeps 3 hidden units: Dense_0 4·3+3 = 15, Dense_1 3·3+3 = 12 → 27 scalars.
    half = c["1/2"]
    assert half["params_held"] == 27 and half["maskable_kept"] == 27
    assert half["bytes_down"] == half["bytes_up"] == 27 * 4
    assert half["flops"] == dense_flops((4, 3, 3)) and half["flops_basis"] == "shrunk dense"
    assert c["1"]["params_held"] == 51 and c["1"]["flops"] == dense_flops((4, 6, 3))
    assert half["flops_full"] == dense_flops((4, 6, 3))


def test_unstructured_costs_by_hand():
    model, params, groups = setup()
    caps = (1.0, 0.5, 0.25)
    pol = policies.build_policy("fiarse", caps)
    c = costs.capacity_costs(model, params, pol, pol.prepare(params, 0, None), caps,
                             structured=False, x_one=jnp.zeros((1, 4)))
    half, quarter = c["1/2"], c["1/4"]
    # ⌈51/2⌉ = 26 kept (Flax's zero biases tie only at θ = 0, i.e. r = 1).
    assert half["maskable_kept"] == 26 and half["params_held"] == 26
    assert half["bytes_down"] == 51 * 4                 # 26·(4+4) = 208 > dense 204: send dense
    assert quarter["maskable_kept"] == 13
    assert quarter["bytes_down"] == quarter["bytes_up"] == 13 * (4 + 4)  # value + int32 index
    assert half["flops"] == dense_flops((4, 6, 3)) and half["flops_basis"] == "masked dense"
    assert c["1"]["bytes_down"] == 51 * 4
    assert c["1"]["maskable_fraction"] == 1.0
