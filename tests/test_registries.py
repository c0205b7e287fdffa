"""The option checker (``options``), the method registry (``policies``) and the model
registry (``models``): the config checks they own, with the messages ``validate_config``
reports after its ``config.`` prefix, and a toy method and model registered in a test."""
import dataclasses
import os
import re
import sys
from collections.abc import Sequence
from typing import ClassVar, Literal, get_args

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from conftest import make_params

from fiarse_jax import models, policies
from fiarse_jax.core import fiarse, masks
from fiarse_jax.policies import base, scalefl, structured
from fiarse_jax.robust import aggregators
from fiarse_jax.utils import options

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "configs"))
import default as default_config  # noqa: E402

# ------------------------------------------------------------------ the option checker


def builder(data, *, mode: Literal["a", "b"] = "a", rate: float = 0.5, steps: int = 3,
            flag: bool = False, label: str = "x", sizes: Sequence[int] = (1, 2),
            limit: float | None = None, untyped=1.5, ctx=None):
    """A hand-written builder: ``data`` is positional (not an option), ``ctx`` skipped."""


SKIP = ("ctx",)


def check(opts, fn=builder, skip=SKIP):
    return options.check_options("toy", fn, opts, skip=skip)


def test_defaults_are_the_keyword_only_parameters_less_skip():
    assert options.defaults(builder, skip=SKIP) == {
        "mode": "a", "rate": 0.5, "steps": 3, "flag": False, "label": "x", "sizes": (1, 2),
        "limit": None, "untyped": 1.5}
    assert list(options.options_of(builder)) == [
        "mode", "rate", "steps", "flag", "label", "sizes", "limit", "untyped", "ctx"]
    assert options.options_of(builder)["mode"].choices == ("a", "b")


def test_check_options_fills_defaults_and_accepts_good_values():
    assert check(None) == options.defaults(builder, skip=SKIP)
    out = check({"mode": "b", "rate": 1, "sizes": [3], "limit": None, "untyped": 2})
    assert out["mode"] == "b" and out["rate"] == 1 and out["sizes"] == [3] and out["steps"] == 3
    assert check({"rate": np.float32(0.2), "steps": np.int64(2), "limit": 0.1})["limit"] == 0.1
    cfg = ml_collections.ConfigDict({"mode": "b", "flag": True})
    assert check(cfg)["flag"] is True


@pytest.mark.parametrize("opts,message", [
    ({"rat": 0.1}, "toy.rat = 0.1: is not an option of toy; options: ['flag', 'label', "
                   "'limit', 'mode', 'rate', 'sizes', 'steps', 'untyped']"),
    ({"ctx": 1}, "toy.ctx = 1: is not an option of toy;"),
    ({"mode": "c"}, "toy.mode = 'c': must be one of ['a', 'b']"),
    ({"mode": None}, "toy.mode = None: must be one of ['a', 'b']"),
    ({"rate": "0.5"}, "toy.rate = '0.5': must be a number"),
    ({"rate": True}, "toy.rate = True: must be a number"),
    ({"steps": 2.5}, "toy.steps = 2.5: must be an integer"),
    ({"steps": False}, "toy.steps = False: must be an integer"),
    ({"flag": 1}, "toy.flag = 1: must be True or False"),
    ({"label": 3}, "toy.label = 3: must be a string"),
    ({"sizes": 4}, "toy.sizes = 4: must be a sequence"),
    ({"limit": "x"}, "toy.limit = 'x': must be a number or None"),
    ({"untyped": "x"}, "toy.untyped = 'x': must be a number"),   # the default's type
])
def test_check_options_names_the_bad_field_and_value(opts, message):
    with pytest.raises(ValueError, match="^" + re.escape(message)) as e:
        check(opts)
    assert "\n" not in str(e.value)


def test_required_options_and_open_ended_builders():
    def needs(x, *, beta: float):
        pass

    def anything(x, *, beta: float = 0.1, **rest):
        pass

    with pytest.raises(ValueError, match=r"^toy\.beta is missing \(a required option of toy\)$"):
        check({}, needs, ())
    assert check({"beta": 1}, needs, ()) == {"beta": 1}
    assert check({"gamma": "g"}, anything, ()) == {"beta": 0.1, "gamma": "g"}
    with pytest.raises(ValueError, match="toy.beta = 'b': must be a number"):
        check({"beta": "b"}, anything, ())


def test_the_checker_serves_aggregation_rules_too():
    """Aggregation rules take their options keyword-only after (deltas, masks)."""
    assert options.check_options("trimmed_mean", aggregators.trimmed_mean, {"beta": 0.2}) \
        == {"beta": 0.2}
    with pytest.raises(ValueError, match=r"^trimmed_mean\.bta = 0\.2: is not an option"):
        options.check_options("trimmed_mean", aggregators.trimmed_mean, {"bta": 0.2})
    with pytest.raises(ValueError, match=r"^mean\.beta = 0\.2: is not an option of mean; "
                                         r"options: \[\]"):
        options.check_options("mean", aggregators.mean, {"beta": 0.2})


def test_choice_types_match_the_runtime_lists():
    assert get_args(base.Scope) == masks.SCOPES
    assert get_args(base.Gradient) == fiarse.GRADIENTS
    assert get_args(structured.Budget) == structured.BUDGETS == ("params", "width")


# ------------------------------------------------------------------- the method registry

DEFAULT = default_config.get_config()
MLP = {"name": "mlp", "hidden_sizes": (128,)}


@pytest.mark.parametrize("name", sorted(policies.METHODS))
def test_every_method_section_of_the_default_config_passes(name):
    section = DEFAULT.get(name)
    opts = policies.check_method_config(name, section)
    assert opts == {**policies.method_options(name), **dict(section or {})}
    assert policies.check_method_config(name, None) == policies.method_options(name)
    if name != "scalefl":   # scalefl needs a model with early exits
        policies.check_method_config(name, section, MLP, models.MLP)


def test_registry_views_and_flags():
    assert set(policies.POLICIES) == set(policies.METHODS)
    assert policies.STRUCTURED == frozenset(policies.POLICIES) - {"fiarse"}
    assert "fiarse" not in policies.STRUCTURED and "heterofl" in policies.STRUCTURED
    assert policies.POLICIES["heterofl"] is policies.heterofl_policy
    assert [n for n, s in policies.METHODS.items() if s.per_client_random_masks] == ["fed_dropout"]


BAD = [("fiarse", "scope", "blockwise", "must be one of ['global', 'layer']"),
       ("fiarse", "gradient", "exact", "must be one of ['masked', 'tcb']"),
       ("fiarse_neuron", "scope", "unit", "must be one of ['global', 'layer']"),
       ("heterofl", "scaler", 1, "must be True or False"),
       ("scalefl", "kd_weight", -1.0, "must be a finite number ≥ 0"),
       ("scalefl", "depth_exponent", float("inf"), "must be a finite number ≥ 0"),
       ("scalefl", "temperature", 0, "must be a finite number > 0"),
       ("heterofl", "scale", 2, "is not an option of heterofl; options: ['budget', 'scaler']"),
       ("fedavg_full", "budget", "params", "is not an option of fedavg_full; options: []")]
BAD += [(n, "budget", "layers", "must be one of ['params', 'width']")
        for n in ("fiarse_neuron", "heterofl", "fedrolex", "fed_dropout", "fedavg_smallest")]


@pytest.mark.parametrize("name,key,value,words", BAD)
def test_bad_method_options_fail_in_one_line(name, key, value, words):
    section = {**dict(DEFAULT.get(name) or {}), key: value}
    with pytest.raises(ValueError) as e:
        policies.check_method_config(name, section)
    assert str(e.value) == f"{name}.{key} = {value!r}: {words}"


def test_unknown_method():
    with pytest.raises(ValueError, match=r"^method = 'fedprox': must be one of \['fed_dropout', "):
        policies.check_method_config("fedprox", {})


def test_heterofl_scaler_needs_a_normalised_model():
    on = {"scaler": True}
    policies.check_method_config("heterofl", on)          # no model: section rules only
    with pytest.raises(ValueError, match=r"^heterofl\.scaler = True: model 'mlp' has no "
                                         r"normalisation layer .*; set it False$"):
        policies.check_method_config("heterofl", on, MLP, models.MLP)
    with pytest.raises(ValueError, match="model 'cnn' has no normalisation"):
        policies.check_method_config("heterofl", {}, {"name": "cnn"}, models.CNN)   # default on
    with pytest.raises(ValueError, match="model 'nope' has no normalisation"):
        policies.check_method_config("heterofl", on, {"name": "nope"}, None)
    policies.check_method_config("heterofl", on, {"name": "resnet18"}, models.ResNet18)
    policies.check_method_config("heterofl", {"scaler": False}, MLP, models.MLP)


@pytest.mark.parametrize("model,cls,found", [
    (MLP, models.MLP, "mlp early_exits=False hidden_sizes=(128,)"),
    ({"name": "mlp", "hidden_sizes": [16], "early_exits": True}, models.MLP,
     "mlp early_exits=True hidden_sizes=(16,)"),
    ({"name": "mlp", "early_exits": True}, models.MLP, "mlp early_exits=True hidden_sizes=(128,)"),
    ({"name": "resnet18", "widths": (4, 8), "early_exits": False}, models.ResNet18,
     "resnet18 early_exits=False widths=(4, 8)"),
    ({"name": "resnet18", "widths": (4,), "early_exits": True}, models.ResNet18,
     "resnet18 early_exits=True widths=(4,)"),
    ({"name": "cnn"}, models.CNN, "cnn early_exits=False"),
])
def test_scalefl_needs_early_exits_and_two_stages(model, cls, found):
    with pytest.raises(ValueError) as e:
        policies.check_method_config("scalefl", DEFAULT.scalefl, model, cls)
    assert str(e.value) == f"model = {found!r}: {scalefl.NEEDS}"


def test_scalefl_accepts_exit_models():
    for model, cls in (({"name": "mlp", "hidden_sizes": (16, 16), "early_exits": True}, models.MLP),
                       ({"name": "resnet18", "early_exits": True}, models.ResNet18)):
        policies.check_method_config("scalefl", DEFAULT.scalefl, model, cls)


def half_policy(capacities, *, unit_groups=None, keep: float = 0.5,
                rank: Literal["magnitude", "first"] = "magnitude"):
    """Toy method: every level keeps the largest-|w| ``keep`` of every leaf (``rank =
    "first"``: the leading entries), whatever its capacity."""
    del unit_groups
    n = len(capacities)

    def prepare(params, round_index, key):
        def theta(leaf):
            v = jnp.abs(leaf).ravel() if rank == "magnitude" else -jnp.arange(leaf.size, dtype=float)
            return jnp.full((n,), jnp.sort(v)[::-1][max(1, int(keep * leaf.size)) - 1])
        return jax.tree_util.tree_map(theta, params)

    def mask(params, spec):
        def keep_of(leaf, t):
            v = jnp.abs(leaf) if rank == "magnitude" else -jnp.arange(leaf.size, dtype=float).reshape(leaf.shape)
            return (v >= t).astype(leaf.dtype)
        return jax.tree_util.tree_map(keep_of, params, spec)

    return base.MaskPolicy(name="half", prepare=prepare, client_spec=base.select_level,
                           apply=lambda p, s: jax.tree_util.tree_map(jnp.multiply, p, mask(p, s)),
                           mask=mask)


def test_a_toy_method_registers_builds_and_checks():
    assert "half" not in policies.METHODS
    try:
        policies.register_method("half", policies.MethodSpec(half_policy, structured=False))
        assert "half" in policies.POLICIES and "half" not in policies.STRUCTURED
        assert policies.method_options("half") == {"keep": 0.5, "rank": "magnitude"}
        assert policies.check_method_config("half", {"keep": 0.25}, MLP, models.MLP) == {
            "keep": 0.25, "rank": "magnitude"}
        with pytest.raises(ValueError, match=r"^half\.rank = 'last': must be one of "
                                             r"\['first', 'magnitude'\]$"):
            policies.check_method_config("half", {"rank": "last"})
        with pytest.raises(ValueError, match="already registered"):
            policies.register_method("half", half_policy)

        params = make_params()
        policy = policies.build_policy("half", (1.0, 0.5), {"keep": 0.5})
        spec = policy.client_spec(policy.prepare(params, 0, jax.random.PRNGKey(0)), 1,
                                  jax.random.PRNGKey(1))
        m = policy.mask(params, spec)
        for leaf, kept in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(m)):
            assert int(kept.sum()) == max(1, int(0.5 * leaf.size))
            assert np.abs(leaf)[kept > 0].min() >= np.abs(leaf)[kept == 0].max(initial=0)
    finally:
        policies.METHODS.pop("half", None)
    assert "half" not in policies.POLICIES and "half" not in policies.STRUCTURED


def test_register_a_bare_builder_and_unregister():
    def full_copy(capacities, *, unit_groups=None):
        return policies.POLICIES["fedavg_full"](capacities, unit_groups=unit_groups)

    try:
        spec = policies.register_method("full_copy", full_copy)
        # A bare builder is unstructured (costs and exports stay dense) until its spec says so.
        assert not spec.structured and not spec.per_client_random_masks
        assert "full_copy" not in policies.STRUCTURED
        assert policies.build_policy("full_copy", (1.0,)).name == "fedavg_full"
    finally:
        assert policies.unregister_method("full_copy") is spec
    with pytest.raises(ValueError, match="Python identifier"):
        policies.register_method("bad name", full_copy)


# -------------------------------------------------------------------- the model registry


def test_depth_field_is_a_class_var_not_a_field():
    assert models.MLP.depth_field == "hidden_sizes" and models.ResNet18.depth_field == "widths"
    for cls in (models.MLP, models.ResNet18):
        assert "depth_field" not in {f.name for f in dataclasses.fields(cls)}
    assert getattr(models.CNN, "depth_field", None) is None


@pytest.mark.parametrize("section,message", [
    ({"name": "resnet1000"}, "model.name = 'resnet1000': must be one of ['cnn', 'mlp', "
                             "'resnet18', 'roberta']"),
    ({"hidden_sizes": (4,)}, "model.name is missing"),
    ({"name": "mlp", "num_classes": 3}, "model.num_classes = 3: is not a field of model 'mlp'; "
                                        "fields: ['early_exits', 'hidden_sizes']"),
    ({"name": "mlp", "features": (4,)}, "model.features = (4,): is not a field of model 'mlp';"),
    ({"name": "mlp", "hidden_sizes": [4, 0]}, "model.hidden_sizes = (4, 0): every size must be "
                                              "an integer ≥ 1"),
    ({"name": "cnn", "features": (4, True)}, "model.features = (4, True): every size must be"),
    ({"name": "mlp", "pretrained": None}, "model.pretrained = None: must be a path, a hub name "
                                          "or ''"),
])
def test_bad_model_sections_fail_in_one_line(section, message):
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        models.check_model_config(section)


def test_good_model_sections_pass():
    assert models.check_model_config(DEFAULT.model) is models.MLP
    assert models.check_model_config({"name": "resnet18", "widths": [4, 8], "pretrained": ""}) \
        is models.ResNet18
    assert models.check_model_config({"name": "roberta", "size": "tiny",
                                      "pretrained": "org/model"}) is models.RobertaClassifier


def test_model_needs_against_the_data():
    models.check_model_for_data({"name": "roberta", "pretrained": "x"}, token_ids=True,
                                data_name="ag_news")
    models.check_model_for_data({"name": "mlp", "pretrained": ""}, token_ids=False,
                                data_name="digits")
    with pytest.raises(ValueError, match=r"^model\.pretrained: model 'cnn' cannot load "
                                         r"pretrained weights \(only 'roberta' can\)$"):
        models.check_model_for_data({"name": "cnn", "pretrained": "x"}, token_ids=False,
                                    data_name="digits")
    with pytest.raises(ValueError, match=r"^model\.name = 'roberta' reads token ids; dataset "
                                         r"'digits' is not text \(use 'ag_news'\)$"):
        models.check_model_for_data({"name": "roberta"}, token_ids=False, data_name="digits",
                                    text_datasets=("ag_news",))


class Toy(nn.Module):
    """A toy exit model: ``widths`` dense layers, an exit after each."""

    widths: Sequence[int] = (4,)
    num_classes: int = 3
    early_exits: bool = False
    depth_field: ClassVar[str | None] = "widths"

    @nn.compact
    def __call__(self, x):
        for w in self.widths:
            x = nn.relu(nn.Dense(w)(x))
        return nn.Dense(self.num_classes)(x)


def test_a_toy_model_registers_and_checks():
    assert "toy" not in models.MODELS
    try:
        models.register_model("toy", Toy)
        assert models.model_fields("toy") == ["early_exits", "widths"]
        assert models.check_model_config({"name": "toy", "widths": [3, 2]}) is Toy
        with pytest.raises(ValueError, match=r"^model\.widths = \(3, -2\): every size"):
            models.check_model_config({"name": "toy", "widths": (3, -2)})
        with pytest.raises(ValueError, match=r"^model\.hidden_sizes = \(3,\): is not a field "
                                             r"of model 'toy'; fields: \['early_exits', 'widths'\]"):
            models.check_model_config({"name": "toy", "hidden_sizes": (3,)})
        model = models.build_model("toy", 5, {"widths": [3, 2]})
        out = model.apply(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 6))), jnp.zeros((2, 6)))
        assert out.shape == (2, 5)
        # the method rules read the class: scalefl takes any model with a depth_field
        policies.check_method_config("scalefl", {}, {"name": "toy", "widths": (3, 2),
                                                     "early_exits": True}, Toy)
        with pytest.raises(ValueError, match=r"^model = 'toy early_exits=True widths=\(4,\)'"):
            policies.check_method_config("scalefl", {}, {"name": "toy", "early_exits": True}, Toy)
        with pytest.raises(ValueError, match="already registered"):
            models.register_model("toy", Toy)
    finally:
        models.MODELS.pop("toy", None)
    with pytest.raises(ValueError, match="num_classes field"):
        models.register_model("plain", dict)
    assert "toy" not in models.MODELS and "plain" not in models.MODELS


# ------------------------------------------------------------------ aggregation rules


def test_the_active_aggregation_rule_options_are_checked_before_anything_runs(tmp_path):
    from fiarse_jax.experiment import train
    from fiarse_jax.experiment.config import ConfigError

    config = default_config.get_config()
    config.server.aggregator = "trimmed_mean"
    config.server.trimmed_mean.betta = 0.2          # a typo of beta
    with pytest.raises(ConfigError, match=r"^config.server.trimmed_mean.betta = 0.2: is not an "
                                          r"option of server.trimmed_mean; options: \['beta'\]$"):
        train.train_and_evaluate(config, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()
    # Another rule's section is not this run's: its keys are the rule's business when used.
    config = default_config.get_config()
    config.server.trimmed_mean.betta = 0.2
    from fiarse_jax.experiment.config import validate_config
    validate_config(config)
    assert aggregators.check_options("multi_krum", aggregators.multi_krum,
                                     {"num_byzantine": 1, "num_selected": None}) is None
