"""Datasets from the user's files: ImageFolder trees (`image_folder`) and .npz arrays
(`arrays`), their cache, their errors, normalisation/augmentation and a run on them."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "configs"))
import default as default_config  # noqa: E402

from fiarse_jax.data import DATASETS, augment, files, load_dataset  # noqa: E402
from fiarse_jax.experiment.config import ConfigError, validate_config  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = ("cat", "ant", "bee")   # written unsorted: the loader sorts them


@pytest.fixture(autouse=True)
def user_cache(tmp_path, monkeypatch):
    """The user cache directory inside the test's tmp_path (never ~/.cache)."""
    path = tmp_path / "xdg"
    monkeypatch.setenv("XDG_CACHE_HOME", str(path))
    return path / "fiarse_jax"


def make_folder(root, n_train=4, n_test=2, size=8, mode="RGB", seed=0, fmt="png"):
    """root/{train,test}/<class>/<i>.<fmt> of random pixels; returns {relative path: pixels}."""
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "L": 1}[mode]
    pixels = {}
    for split, n in (("train", n_train), ("test", n_test)):
        for c in CLASSES:
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(n):
                a = rng.integers(0, 256, (size, size, channels), dtype=np.uint8)
                img = Image.fromarray(a[..., 0] if mode == "L" else a, mode)
                img.save(d / f"{i}.{fmt}")
                pixels[f"{split}/{c}/{i}.{fmt}"] = a
    return pixels


def cache_files(root, user_cache):
    """Every cache (or temporary) file the loader may have left, beside the data or not."""
    here = [p for p in root.iterdir() if p.name.startswith(".fiarse")] if root.is_dir() else []
    there = list(user_cache.iterdir()) if user_cache.is_dir() else []
    return here + there


# ------------------------------------------------------------------------- image_folder

def test_png_pixels_round_trip_with_sorted_classes_labels_and_separate_test(tmp_path):
    pixels = make_folder(tmp_path / "d")
    ds = files.load_image_folder(data_dir=str(tmp_path / "d"))
    assert ds.num_classes == 3
    assert ds.x.shape == (12, 8, 8, 3) and ds.x.dtype == np.uint8
    assert ds.test_x.shape == (6, 8, 8, 3) and ds.test_x.dtype == np.uint8
    assert ds.y.dtype == np.int32 and ds.test_y.dtype == np.int32
    # sorted classes: ant = 0, bee = 1, cat = 2; files in name order within a class
    assert ds.y.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    # The test split in the fixed mixed order: file j of the class-by-class list at the
    # position the permutation gives it.
    order = files.test_order(6)
    np.testing.assert_array_equal(order, np.random.default_rng(0).permutation(6))
    assert ds.test_y.tolist() == np.array([0, 0, 1, 1, 2, 2])[order].tolist()
    assert sorted(order.tolist()) == list(range(6)) and order.tolist() != list(range(6))
    for k, c in enumerate(sorted(CLASSES)):
        for i in range(4):
            np.testing.assert_array_equal(ds.x[4 * k + i], pixels[f"train/{c}/{i}.png"])
        for i in range(2):
            pos = int(np.flatnonzero(order == 2 * k + i)[0])
            np.testing.assert_array_equal(ds.test_x[pos], pixels[f"test/{c}/{i}.png"])


def test_jpeg_any_case_and_grayscale_keep_their_channels(tmp_path):
    make_folder(tmp_path / "rgb", fmt="JPG", size=16)
    ds = files.load_image_folder(data_dir=str(tmp_path / "rgb"))
    assert ds.x.shape == (12, 16, 16, 3)
    make_folder(tmp_path / "gray", fmt="jpeg", mode="L")
    ds = files.load_image_folder(data_dir=str(tmp_path / "gray"))
    assert ds.x.shape == (12, 8, 8, 1) and ds.test_x.shape == (6, 8, 8, 1)


def test_non_image_files_and_hidden_entries_are_skipped_and_test_may_lack_a_class(tmp_path):
    make_folder(tmp_path / "d")
    (tmp_path / "d" / "train" / "ant" / "notes.txt").write_text("not an image")
    (tmp_path / "d" / "train" / ".hidden").mkdir()
    for f in (tmp_path / "d" / "test" / "bee").iterdir():
        f.unlink()
    (tmp_path / "d" / "test" / "bee").rmdir()
    ds = files.load_image_folder(data_dir=str(tmp_path / "d"))
    assert ds.num_classes == 3 and len(ds.x) == 12
    # bee (1) is absent from test
    assert ds.test_y.tolist() == np.array([0, 0, 2, 2])[files.test_order(4)].tolist()


def test_cache_is_written_and_the_second_load_decodes_nothing(tmp_path, monkeypatch,
                                                              user_cache):
    make_folder(tmp_path / "d")
    first = files.load_image_folder(data_dir=str(tmp_path / "d"))
    (cache,) = cache_files(tmp_path / "d", user_cache)
    assert cache.parent == tmp_path / "d" and cache.name.startswith(".fiarse_cache_")

    def no_decoding(*args, **kwargs):
        raise AssertionError("the second load decoded an image")

    monkeypatch.setattr(Image, "open", no_decoding)
    second = files.load_image_folder(data_dir=str(tmp_path / "d"))
    for a, b in zip(first[:2] + first[3:5], second[:2] + second[3:5]):
        np.testing.assert_array_equal(a, b)
    assert cache_files(tmp_path / "d", user_cache) == [cache]


def test_changed_files_rebuild_the_cache_and_drop_the_stale_one(tmp_path, user_cache):
    make_folder(tmp_path / "d")
    files.load_image_folder(data_dir=str(tmp_path / "d"))
    (old,) = cache_files(tmp_path / "d", user_cache)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "d" / "train" / "ant" / "9.png")
    ds = files.load_image_folder(data_dir=str(tmp_path / "d"))
    assert len(ds.x) == 13 and ds.y.tolist().count(0) == 5
    (new,) = cache_files(tmp_path / "d", user_cache)
    assert new != old


def test_a_corrupt_cache_is_rebuilt(tmp_path, user_cache, capsys):
    make_folder(tmp_path / "d")
    want = files.load_image_folder(data_dir=str(tmp_path / "d"))
    (cache,) = cache_files(tmp_path / "d", user_cache)
    cache.write_bytes(cache.read_bytes()[:100])    # truncated
    got = files.load_image_folder(data_dir=str(tmp_path / "d"))
    np.testing.assert_array_equal(got.x, want.x)
    assert "unreadable" in capsys.readouterr().out
    with np.load(cache) as z:                        # rewritten whole
        np.testing.assert_array_equal(z["x"], want.x)


def test_cache_goes_to_the_user_cache_dir_when_data_dir_is_not_writable(tmp_path, monkeypatch,
                                                                         user_cache):
    make_folder(tmp_path / "d")
    monkeypatch.setattr(files, "_writable", lambda directory: False)
    files.load_image_folder(data_dir=str(tmp_path / "d"))
    assert not [p for p in (tmp_path / "d").iterdir() if p.name.startswith(".")]
    (cache,) = user_cache.iterdir()
    assert cache.name.startswith("image_folder_") and cache.suffix == ".npz"
    monkeypatch.setattr(Image, "open", lambda *a, **k: pytest.fail("decoded again"))
    assert len(files.load_image_folder(data_dir=str(tmp_path / "d")).x) == 12


def test_read_only_data_dir_really_falls_back(tmp_path, user_cache):
    make_folder(tmp_path / "d")
    os.chmod(tmp_path / "d", 0o555)
    try:
        if os.access(tmp_path / "d", os.W_OK):
            pytest.skip("running as root: chmod does not make the directory read-only")
        ds = files.load_image_folder(data_dir=str(tmp_path / "d"))
        assert len(ds.x) == 12 and len(list(user_cache.iterdir())) == 1
    finally:
        os.chmod(tmp_path / "d", 0o755)


def _corrupt(root):
    (root / "train" / "bee" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    return "train/bee/1.png"


def _other_size(root):
    Image.fromarray(np.zeros((9, 8, 3), np.uint8)).save(root / "test" / "cat" / "1.png")
    return "test/cat/1.png"


def _grayscale_among_rgb(root):
    Image.fromarray(np.zeros((8, 8), np.uint8), "L").save(root / "train" / "cat" / "0.png")
    return "train/cat/0.png"


def _rgba(root):
    Image.fromarray(np.zeros((8, 8, 4), np.uint8), "RGBA").save(root / "train" / "ant" / "2.png")
    return "train/ant/2.png"


def _empty_class(root):
    (root / "train" / "dog").mkdir()
    return "train/dog"


def _test_only_class(root):
    (root / "test" / "emu").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "test" / "emu" / "0.png")
    return "test/emu"


def _no_class_folders(root):
    for split in ("train", "test"):
        for c in CLASSES:
            for f in (root / split / c).iterdir():
                f.unlink()
            (root / split / c).rmdir()
    return "train"


def _missing_train(root):
    (root / "train").rename(root / "training")
    return "train"


@pytest.mark.parametrize("break_it,words", [
    (_corrupt, "cannot read image"),
    (_other_size, "has shape (9, 8, 3)"),
    (_grayscale_among_rgb, "has shape (8, 8, 1)"),
    (_rgba, "image mode 'RGBA'"),
    (_empty_class, "holds no images"),
    (_test_only_class, "has no counterpart"),
    (_no_class_folders, "no class folders"),
    (_missing_train, "does not exist"),
])
def test_every_bad_tree_is_one_line_naming_it_and_leaves_no_cache(tmp_path, user_cache,
                                                                  break_it, words):
    root = tmp_path / "d"
    make_folder(root)
    bad = break_it(root)
    with pytest.raises(ValueError) as e:
        files.load_image_folder(data_dir=str(root))
    msg = str(e.value)
    assert "\n" not in msg and words in msg and str(root / bad) in msg, msg
    assert cache_files(root, user_cache) == []


def test_a_missing_directory_is_named(tmp_path):
    with pytest.raises(ValueError, match=f"directory {tmp_path / 'nowhere'} does not exist"):
        files.load_image_folder(data_dir=str(tmp_path / "nowhere"))


def test_size_mismatch_names_both_shapes(tmp_path):
    make_folder(tmp_path / "d")
    _other_size(tmp_path / "d")
    with pytest.raises(ValueError, match=r"has shape \(9, 8, 3\) \(RGB\), but .*train/ant/0.png "
                                         r"has \(8, 8, 3\)"):
        files.load_image_folder(data_dir=str(tmp_path / "d"))


# ------------------------------------------------------------------------------- arrays

def save_npz(path, **arrays):
    np.savez(path, **arrays)
    return str(path)


def good_arrays(seed=0, n=10, t=4, shape=(8, 8, 3)):
    rng = np.random.default_rng(seed)
    return {"x_train": rng.integers(0, 256, (n,) + shape, dtype=np.uint8),
            "y_train": np.arange(n) % 3, "x_test": rng.integers(0, 256, (t,) + shape, np.uint8),
            "y_test": np.arange(t) % 3}


def test_arrays_load_as_given(tmp_path):
    a = good_arrays()
    ds = files.load_arrays(data_dir=save_npz(tmp_path / "a.npz", **a))
    np.testing.assert_array_equal(ds.x, a["x_train"])
    np.testing.assert_array_equal(ds.test_x, a["x_test"])
    assert ds.y.tolist() == a["y_train"].tolist() and ds.y.dtype == np.int32
    assert ds.num_classes == 3


def test_arrays_grayscale_float_and_declared_classes(tmp_path):
    rng = np.random.default_rng(1)
    a = {"x_train": rng.random((6, 5, 5)), "y_train": np.zeros((6, 1), np.int64),
         "x_test": rng.random((2, 5, 5)), "y_test": np.array([1, 0]),
         "class_names": np.array(["a", "b", "c", "d"])}
    ds = files.load_arrays(data_dir=save_npz(tmp_path / "a.npz", **a))
    assert ds.x.shape == (6, 5, 5, 1) and ds.x.dtype == np.float32
    assert ds.y.tolist() == [0] * 6 and ds.num_classes == 4
    a.pop("class_names")
    ds = files.load_arrays(data_dir=save_npz(tmp_path / "b.npz", num_classes=7, **a))
    assert ds.num_classes == 7


@pytest.mark.parametrize("change,words", [
    (lambda a: a.pop("y_test"), "has no 'y_test'"),
    (lambda a: a.update(y_train=a["y_train"][:-1]), "x_train has 10 images but y_train has 9"),
    (lambda a: a.update(y_test=np.array([0, 1, 2, -1])), "y_test holds label -1"),
    (lambda a: a.update(num_classes=2), "y_train holds label 2 but there are 2 classes"),
    (lambda a: a.update(x_train=np.zeros((10, 8), np.uint8)), "x_train has shape (10, 8)"),
    (lambda a: a.update(y_train=np.zeros((10, 2), int)), "y_train has shape (10, 2)"),
    (lambda a: a.update(y_train=np.zeros(10)), "labels must be integers"),
    (lambda a: a.update(x_test=np.zeros((4, 8, 8, 1), np.uint8)), "x_test images have shape"),
    (lambda a: a.update(x_test=np.zeros((4, 8, 8, 3))), "give both splits as uint8"),
    (lambda a: a.update(x_train=np.full((10, 8, 8, 3), 2.0)), "must be in [0, 1]"),
    (lambda a: a.update(x_train=np.full((10, 8, 8, 3), 300)), "must be in 0..255"),
    (lambda a: a.update(x_train=np.zeros((10, 3, 8, 8), np.uint8)),
     "x_train has shape (10, 3, 8, 8), which looks channels-first"),
])
def test_bad_arrays_are_one_line(tmp_path, change, words):
    a = good_arrays()
    change(a)
    with pytest.raises(ValueError) as e:
        files.load_arrays(data_dir=save_npz(tmp_path / "a.npz", **a))
    assert "\n" not in str(e.value) and words in str(e.value), str(e.value)


def test_arrays_path_must_be_an_npz_file(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        files.load_arrays(data_dir=str(tmp_path / "none.npz"))
    with pytest.raises(ValueError, match="is a directory"):
        files.load_arrays(data_dir=str(tmp_path))
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="junk.npz is not an .npz file \\(not a zip archive"):
        files.load_arrays(data_dir=str(tmp_path / "junk.npz"))
    np.save(tmp_path / "one.npy", np.zeros(3))
    with pytest.raises(ValueError, match="single array"):
        files.load_arrays(data_dir=str(tmp_path / "one.npy"))


# ------------------------------------------------------- normalisation and augmentation

def test_eval_transform_is_the_given_normalisation_and_augment_off_is_eval(tmp_path):
    make_folder(tmp_path / "d", size=8)
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 2.0)
    ds = files.load_image_folder(data_dir=str(tmp_path / "d"), mean=mean, std=std,
                                 augment=False)
    want = (ds.test_x / 255.0 - np.array(mean)) / np.array(std)
    got = np.asarray(ds.eval_transform(jnp.asarray(ds.test_x)))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    train = np.asarray(ds.train_transform(jnp.asarray(ds.test_x), jax.random.PRNGKey(0)))
    np.testing.assert_allclose(train, got)
    on = files.load_image_folder(data_dir=str(tmp_path / "d"), mean=mean, std=std, augment=True)
    aug = np.asarray(on.train_transform(jnp.asarray(ds.x), jax.random.PRNGKey(0)))
    assert aug.shape == ds.x.shape and not np.allclose(aug, np.asarray(on.eval_transform(ds.x)))


def test_defaults_32x32_rgb_is_the_authors_cifar_pipeline(tmp_path):
    make_folder(tmp_path / "d", size=32, n_train=2, n_test=1)
    ds = files.load_image_folder(data_dir=str(tmp_path / "d"))
    assert ds.eval_transform.normalisation == {"mean": augment.CIFAR10_MEAN,
                                               "std": augment.AUTHORS_CIFAR_STD}
    want = (ds.x / 255.0 - np.array(augment.CIFAR10_MEAN)) / np.array(augment.AUTHORS_CIFAR_STD)
    np.testing.assert_allclose(np.asarray(ds.eval_transform(ds.x)), want, rtol=1e-5, atol=1e-5)
    aug = np.asarray(ds.train_transform(jnp.asarray(ds.x), jax.random.PRNGKey(0)))
    assert not np.allclose(aug, want, atol=1e-3)    # augmentation on by default


def test_defaults_elsewhere_are_the_data_own_statistics_without_augmentation(tmp_path):
    make_folder(tmp_path / "d", size=8, mode="L")
    ds = files.load_image_folder(data_dir=str(tmp_path / "d"))
    x = ds.x / 255.0
    mean, std = ds.eval_transform.normalisation["mean"], ds.eval_transform.normalisation["std"]
    np.testing.assert_allclose(mean, [x.mean()], rtol=1e-9)
    np.testing.assert_allclose(std, [x.std()], rtol=1e-9)
    out = np.asarray(ds.eval_transform(ds.x))
    assert abs(out.mean()) < 1e-4 and abs(out.std() - 1) < 1e-4
    np.testing.assert_allclose(np.asarray(ds.train_transform(ds.x, jax.random.PRNGKey(0))), out)


def test_constants_must_fit_the_channels(tmp_path):
    make_folder(tmp_path / "d", mode="L")
    with pytest.raises(ValueError, match="has 3 values but the images have 1 channel"):
        files.load_image_folder(data_dir=str(tmp_path / "d"), mean=(0.5, 0.5, 0.5))
    with pytest.raises(ValueError, match="must be > 0"):
        files.load_image_folder(data_dir=str(tmp_path / "d"), std=(0.0,))


def test_cifar_constants_true_and_authors():
    assert augment.CIFAR10_STD == (0.2470, 0.2435, 0.2616)
    assert augment.AUTHORS_CIFAR_STD == (0.2023, 0.1994, 0.2010)
    for name in ("cifar10_resnet18", "cifar100_resnet18"):
        c = __import__(name).get_config()
        assert tuple(c.data.mean) == augment.CIFAR10_MEAN
        assert tuple(c.data.std) == augment.AUTHORS_CIFAR_STD


# ------------------------------------------------------------------- registry and config

def test_registry_loads_both_with_their_options(tmp_path):
    make_folder(tmp_path / "d")
    assert DATASETS["image_folder"].options == ("data_dir", "mean", "std", "augment")
    assert DATASETS["arrays"].options == ("data_dir", "mean", "std", "augment")
    for name in ("cifar10", "cifar100"):
        assert set(augment.IMAGE_OPTIONS) <= set(DATASETS[name].options)
    ds = load_dataset("image_folder", data_dir=str(tmp_path / "d"), mean=None, std=None,
                      augment=None)
    assert ds.num_classes == 3 and len(ds.x) == 12
    ds = load_dataset("arrays", data_dir=save_npz(tmp_path / "a.npz", **good_arrays()))
    assert ds.num_classes == 3 and len(ds.x) == 10


def config_for(name, data_dir, **data):
    c = default_config.get_config()
    c.data.name, c.data.data_dir = name, data_dir
    for k, v in data.items():
        c.data[k] = v
    return c


@pytest.mark.parametrize("name", ["image_folder", "arrays"])
def test_config_needs_data_dir_for_file_datasets(name):
    validate_config(default_config.get_config())          # digits needs none
    with pytest.raises(ConfigError, match=rf"config.data.data_dir = None: dataset '{name}' "
                                          "needs"):
        validate_config(config_for(name, None))
    validate_config(config_for(name, "/some/where"))


@pytest.mark.parametrize("field,value,words", [
    ("mean", (), "non-empty tuple"), ("mean", (0.5, float("nan")), "finite"),
    ("std", (0.5, 0.0, 0.5), "each > 0"), ("std", (0.5, 0.5), "as many values as data.mean"),
    ("augment", "yes", "True, False or None"),
])
def test_config_checks_normalisation_fields(field, value, words):
    c = config_for("image_folder", "/x", mean=(0.5, 0.5, 0.5))
    # default.py's fields are typed placeholders (a str never reaches data.augment there);
    # a config file of one's own may hold anything.
    c.data = ml_collections.ConfigDict({**c.data.to_dict(), field: value})
    with pytest.raises(ConfigError, match=f"config.data.{field} = .*{words}"):
        validate_config(c)


def test_loader_errors_reach_build_run_as_config_errors(tmp_path):
    from fiarse_jax.experiment import build
    with pytest.raises(ConfigError, match="config.data: image_folder: directory .* does not"):
        build.build_run(config_for("image_folder", str(tmp_path / "missing")))


# ------------------------------------------------------------------------------ end to end

def test_cli_trains_on_an_image_folder_from_two_overrides(tmp_path):
    make_folder(tmp_path / "d", n_train=20, n_test=5, size=8)
    r = subprocess.run(
        [sys.executable, "-m", "fiarse_jax", "--config", os.path.join(REPO, "configs",
                                                                      "default.py"),
         "--workdir", str(tmp_path / "run"), "--config.data.name=image_folder",
         f"--config.data.data_dir={tmp_path / 'd'}", "--config.model.name=cnn",
         "--config.num_rounds=2", "--config.eval_every=1", "--config.checkpoint_every=0",
         "--config.data.num_clients=3", "--config.clients_per_round=3",
         "--config.data.min_client_size=2", "--config.data.alpha=100.0",
         "--config.client.local_steps=2", "--config.tensorboard=False"],
        capture_output=True, text=True, timeout=300, cwd=REPO)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "image_folder: decoding 60 train + 15 test images" in r.stdout
    assert (tmp_path / "run" / "summary.json").exists()
    import json
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["num_classes"] == 3 and summary["config"]["data"]["name"] == "image_folder"
