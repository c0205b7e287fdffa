"""The CIFAR path: augmentation against NumPy, TFDS loaders on mock data, the smoke config."""
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "configs"))

from fiarse_jax.data import augment, cifar  # noqa: E402
from fiarse_jax.data import tfds as tfds_data  # noqa: E402

tfds = pytest.importorskip("tensorflow_datasets")


def distinct_images(n, h=6, w=5, c=2):
    """Images whose pixels are all distinct and non-zero, so a crop identifies its offset."""
    return (np.arange(n * h * w * c, dtype=np.float32).reshape(n, h, w, c) + 1.0)


def test_random_crop_is_a_window_of_the_zero_padded_image():
    x = distinct_images(400)
    pad = 2
    out = np.asarray(augment.random_crop(jax.random.PRNGKey(0), jnp.asarray(x), pad))
    assert out.shape == x.shape
    padded = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    seen = set()
    for i in range(len(x)):
        hits = [(dy, dx) for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)
                if np.array_equal(out[i], padded[i, dy:dy + 6, dx:dx + 5])]
        assert len(hits) == 1, f"image {i} is not one window of the padded image"
        seen.add(hits[0])
    assert len(seen) == (2 * pad + 1) ** 2   # every offset occurs over 400 images


def test_random_flip_mirrors_about_half():
    x = distinct_images(1000)
    out = np.asarray(augment.random_flip(jax.random.PRNGKey(1), jnp.asarray(x)))
    flipped = np.array([np.array_equal(o, xi[:, ::-1]) for o, xi in zip(out, x)])
    same = np.array([np.array_equal(o, xi) for o, xi in zip(out, x)])
    assert np.all(flipped ^ same)
    assert 0.44 < flipped.mean() < 0.56      # Binomial(1000, 1/2): ±6 sd


def test_transforms_normalise_like_numpy():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    # The transforms' default constants are the authors' (the paper's CIFAR numbers).
    mean, std = np.array(augment.CIFAR10_MEAN), np.array(augment.AUTHORS_CIFAR_STD)
    want = (x / 255.0 - mean) / std
    got = np.asarray(augment.cifar_eval_transform()(jnp.asarray(x)))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    train = np.asarray(augment.cifar_train_transform()(jnp.asarray(x), jax.random.PRNGKey(0)))
    assert train.shape == x.shape and train.dtype == np.float32
    # Un-normalised, every training pixel is a source pixel value or zero padding, and
    # each image keeps most of its pixels (a crop moves at most 4 rows and 4 columns).
    raw = (train * std + mean) * 255.0
    np.testing.assert_allclose(raw, np.round(raw), atol=2e-3)
    for r, xi in zip(np.round(raw).astype(int), x):
        assert set(np.unique(r)) <= set(np.unique(xi)) | {0}


@pytest.mark.parametrize("name,classes", [("cifar10", 10), ("cifar100", 100)])
def test_tfds_loader_on_mock_data(name, classes):
    ds = cifar.load_cifar(name, mock_examples=30)
    assert ds.x.shape == (30, 32, 32, 3) and ds.x.dtype == np.uint8
    assert ds.test_x.shape == (30, 32, 32, 3) and ds.num_classes == classes
    assert ds.y.dtype == np.int32 and ds.y.min() >= 0 and ds.y.max() < classes
    assert ds.train_transform is not None and ds.eval_transform is not None


def test_missing_data_fails_fast_with_instructions(tmp_path, monkeypatch):
    t = time.time()
    with pytest.raises(tfds_data.DataUnavailable, match="not prepared under config.data.data_dir"):
        cifar.load_cifar("cifar10", data_dir=str(tmp_path))
    monkeypatch.setattr(tfds_data, "_online", lambda host, timeout=5.0: False)  # no network in tests
    with pytest.raises(tfds_data.DataUnavailable, match="cannot be reached"):
        cifar.load_cifar("cifar10", data_dir=str(tmp_path), download=True)
    assert time.time() - t < 30
    assert not any(tmp_path.rglob("*.array_record*"))


def test_smoke_config_runs_under_both_strategies_and_its_export_reproduces_accuracy(
        tmp_path, monkeypatch):
    import cifar_smoke
    from helpers import record_builds

    from fiarse_jax.experiment import export, train
    builds = record_builds(monkeypatch)   # the runs train built (no third ResNet init compile)
    out, runs = {}, {}
    for strategy in ("loop", "vmap"):
        c = cifar_smoke.get_config()
        c.num_rounds, c.engine.strategy = 1, strategy
        c.model.blocks_per_stage = (1, 1, 1, 1)   # the same code path at half the compile time
        out[strategy] = train.train_and_evaluate(c, str(tmp_path / strategy), progress=False)
        runs[strategy] = builds[-1]
    assert len(builds) == 2
    s = out["loop"]
    assert s["config"]["model"]["name"] == "resnet18" and s["num_classes"] == 10
    assert s["conv"] == ("canonical" if jax.default_backend() == "cpu" else "xla")
    assert s["clients_per_level"] == {"1": 2, "1/4": 2, "1/16": 2, "1/64": 2}
    # balanced Dirichlet: every client exactly n_train / n_test samples
    run = runs["loop"]
    assert set(run.data.train_sizes) == {40} and set(run.data.test_sizes) == {10}
    assert run.data.train.x.dtype == np.uint8          # stored as uint8, normalised on device
    for key in ("global_accuracy", "train_loss"):
        assert out["loop"]["final"][key] == pytest.approx(out["vmap"]["final"][key], abs=0.02)

    # The exported 1/4 sub-model, with its CIFAR preprocessing, gives the reported accuracy.
    info = export.export_submodel(str(tmp_path / "loop"), "1/4", str(tmp_path / "q.npz"))
    sub = export.load_submodel(str(tmp_path / "q.npz"))
    x, y = (np.asarray(a) for a in run.data.global_test())
    assert x.dtype == np.uint8 and info["input_transform"] == "cifar10"
    # Static BN: the global test set in its own order, in batches of the client batch size.
    b = c.client.batch_size
    pred = np.concatenate([np.argmax(np.asarray(sub.predict(x[i:i + b])), -1)
                           for i in range(0, len(y), b)])
    assert float(np.mean(pred == y)) == pytest.approx(
        s["final"]["capacity_global_accuracy"]["1/4"], abs=1e-12)
