"""The typed options: the config parsed once at the boundary (``config.round_options``)."""
import dataclasses
import os
import sys

import pytest

from fiarse_jax.experiment.config import round_options, validate_config
from fiarse_jax.federated.run import Options

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "configs"))
import default as default_config  # noqa: E402


def test_the_default_config_parses_to_the_option_classes_defaults():
    """The classes' defaults are configs/default.py's, so a library user who builds
    ``Options()`` by hand runs what the command line runs by default."""
    assert round_options(default_config.get_config()) == Options()


@pytest.mark.parametrize("field,value,section,attr,expect", [
    ("client.local_steps", 5, "client", "local_steps", 5),
    ("client.betas", [0.9, 0.95], "client", "betas", (0.9, 0.95)),
    ("server.aggregator", "trimmed_mean", "server", "aggregator_options", {"beta": 0.2}),
    ("engine.clients_per_chunk", "auto", "engine", "clients_per_chunk", "auto"),
    ("engine.rounds_per_program", 3, "schedule", "rounds_per_program", 3),
    ("eval.batch_size", 0, "eval", "batch_size", 20),        # 0: the clients' batch size
    ("eval.batch_size", 50, "eval", "batch_size", 50),
    ("dp.target_epsilon", 4.0, "dp", "target_epsilon", 4.0),
    ("attack.levels", (1,), "attack", "levels", (1,)),
    ("data.num_clients", 40, "schedule", "num_clients", 40),
])
def test_a_config_field_reaches_its_option(field, value, section, attr, expect):
    config = default_config.get_config()
    node, name = config, field.split(".")
    for part in name[:-1]:
        node = node[part]
    node[name[-1]] = value
    options = round_options(config)
    assert getattr(getattr(options, section), attr) == expect
    # and nothing else moved
    untouched = Options()._replace(**{section: getattr(options, section)})
    assert options == untouched


def test_a_config_without_the_optional_fields_gets_the_defaults():
    """Older configs lack fields added later; their options are the classes' defaults."""
    config = default_config.get_config()
    for section, field in (("client", "local_epochs"), ("client", "betas"),
                           ("engine", "xla"), ("engine", "reduce"),
                           ("engine", "rounds_per_program"), ("server", "screen"),
                           ("server", "exclude_after_flags")):
        with config.unlocked():
            del config[section][field]
    validate_config(config)
    assert round_options(config) == Options()


def test_options_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        Options().client.local_steps = 3
