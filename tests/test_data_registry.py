"""The dataset registry: a dataset of one's own added in one line is checked, loaded and
federated from config.data like the built-in ones; the built-in checks keep their messages."""
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "configs"))

import default as default_config  # noqa: E402

from fiarse_jax.data import (  # noqa: E402
    DATASETS,
    Dataset,
    DatasetSpec,
    check_data_config,
    federate,
    load_dataset,
    load_from_config,
    register_dataset,
)
from fiarse_jax.experiment.config import ConfigError, validate_config  # noqa: E402


def load_toy(*, size: int = 60, scale: float = 1.0) -> Dataset:
    """Random 4×4 grayscale images of 3 classes."""
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(size, 4, 4, 1)) * scale).astype(np.float32)
    return Dataset(x=x, y=np.arange(size, dtype=np.int32) % 3, num_classes=3)


def check_toy(data) -> None:
    if "size" in data and (not isinstance(data["size"], int) or data["size"] < 30):
        raise ValueError(f"data.size = {data['size']!r}: the toy dataset needs an integer ≥ 30")


@pytest.fixture
def toy():
    spec = register_dataset("toy", DatasetSpec(load_toy, ("size", "scale"), check_toy, "random"))
    try:
        yield spec
    finally:
        DATASETS.pop("toy", None)


def toy_config(**data):
    c = default_config.get_config()
    c.data.name, c.data.num_clients = "toy", 3
    c.clients_per_round = 3
    for k, v in data.items():
        c.data[k] = v
    return c


def test_a_registered_dataset_is_checked_loaded_and_federated(toy):
    c = toy_config(size=90, scale=2.0)
    validate_config(c)
    ds = load_from_config(c.data)   # gets size and scale; the image fields it does not take
    assert ds.x.shape == (90, 4, 4, 1) and ds.num_classes == 3
    np.testing.assert_array_equal(ds.x, load_toy(size=90, scale=2.0).x)
    fd = federate(ds, num_clients=3, alpha=1.0, test_fraction=0.2, min_client_size=2, seed=0,
                  partition="iid")
    assert fd.train_sizes.sum() + fd.test_sizes.sum() == 90 and fd.num_classes == 3
    with pytest.raises(ConfigError) as err:
        validate_config(toy_config(size=10))
    assert str(err.value) == "config.data.size = 10: the toy dataset needs an integer ≥ 30"
    with pytest.raises(ValueError, match="already registered"):
        register_dataset("toy", toy)


def test_the_toy_dataset_is_gone_after_its_test():
    assert "toy" not in DATASETS
    with pytest.raises(ConfigError, match=r"^config.data.name = 'toy': must be one of \['ag_news'"):
        validate_config(toy_config())
    with pytest.raises(ValueError, match="unknown dataset 'toy'"):
        load_dataset("toy")


def test_specs_name_their_loaders_lazily_and_take_their_options():
    assert DATASETS["digits"].options == () and DATASETS["digits"].check is None
    for name, spec in DATASETS.items():
        assert isinstance(spec.loader, str) and ":" in spec.loader, name
    ds = load_from_config(default_config.get_config().data)   # digits: mean/std/... ignored
    assert ds.x.shape == (1797, 8, 8, 1)


@pytest.mark.parametrize("data,message", [
    ({"name": "digits", "partition": "random"}, "data.partition = 'random': must be one of"),
    ({"name": "digits", "n_train": 0}, "data.n_train = 0: must be an integer ≥ 1"),
    ({"name": "cifar10", "mock_examples": -1}, "data.mock_examples = -1: must be an integer ≥ 0"),
    ({"name": "cifar10", "download": "yes"}, "data.download = 'yes': must be True or False"),
    ({"name": "cifar100", "data_dir": 3}, "data.data_dir = 3: must be a path or None"),
    ({"name": "cifar10", "mean": (0.5, 0.5), "std": (0.2,)}, "data.std = (0.2,): must have as many"),
    ({"name": "ag_news", "tokenizer": ""}, "data.tokenizer = '': must be 'bpe'"),
    ({"name": "ag_news", "vocab_size": 100}, "data.vocab_size = 100: must be an integer ≥ 261"),
    ({"name": "ag_news", "max_length": 2}, "data.max_length = 2: must be an integer ≥ 3"),
    ({"name": "arrays"}, "data.data_dir = None: dataset 'arrays' needs the path of an .npz file "
                         "holding x_train, y_train, x_test, y_test"),
    ({"name": "image_folder", "data_dir": ""}, "data.data_dir = '': dataset 'image_folder' needs "
                                               "a directory holding train/<class>/ and test/"),
    ({}, "data.name is missing"),
])
def test_built_in_checks_say_field_value_and_what_is_allowed(data, message):
    with pytest.raises(ValueError) as err:
        check_data_config(data)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_a_check_sees_only_its_own_dataset_s_fields():
    check_data_config({"name": "digits", "vocab_size": 1, "mean": ()})   # digits takes neither
    check_data_config({"name": "ag_news", "mean": ()})
    with pytest.raises(ValueError, match="data.mean = "):
        check_data_config({"name": "image_folder", "data_dir": "/x", "mean": ()})
