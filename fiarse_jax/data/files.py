"""Image datasets from local files: an ImageFolder tree (``image_folder``) or an .npz
file of arrays (``arrays``). Both need only ``config.data.data_dir``:

  fiarse-jax --config configs/default.py --workdir runs/mine \\
      --config.data.name=image_folder --config.data.data_dir=PATH --config.model.name=cnn

``image_folder``: ``data_dir/train/<class>/*`` and ``data_dir/test/<class>/*`` (the
torchvision ImageFolder layout; files ending .png, .jpg or .jpeg in any case, also in
sub-folders of a class folder; other files and hidden entries are skipped). Classes are
the train class folders sorted by name; a class's index is its position in that list.
``test/`` may lack classes but may not add any; without ``test/`` the dataset has no
separate test split (clients' test data are then carved from train, as for digits).
Images are decoded with Pillow to uint8 [n, H, W, C]: RGB files give 3 channels,
grayscale ("L") files 1; any other mode (RGBA, palette, 16-bit, CMYK) is an error naming
the file, as are images of another size or channel count than the first one, unreadable
files, empty class folders and a missing folder. The decoded arrays are cached (uint8,
uncompressed .npz) beside the data as ``data_dir/.fiarse_cache_<key>.npz``, or, where
``data_dir`` is not writable, in ``$XDG_CACHE_HOME/fiarse_jax`` (``~/.cache/fiarse_jax``);
the key hashes every file's relative path, size and mtime, so adding, removing or
changing a file rebuilds it (the stale cache is deleted). The cache is written atomically
(temporary file + rename); an unreadable one is rebuilt.

``arrays``: ``data_dir`` is the path of an .npz file with ``x_train``, ``y_train``,
``x_test``, ``y_test``. x: [n, H, W, C] or [n, H, W] (grayscale; a channel axis is added),
uint8 (or integers in 0..255) or float in [0, 1]; both splits alike. y: integer labels
0..K−1 ([n] or [n, 1]). K: the file's optional ``num_classes`` (a scalar) or the length of
its optional ``class_names``, else the largest label + 1 over both splits.

Normalisation and augmentation (``mean``, ``std``, ``augment``, all of config.data, None
= default) are ``augment.image_transforms``'s: 32×32 RGB images get CIFAR-10's mean and
the authors' std ``AUTHORS_CIFAR_STD`` (so real CIFAR-10 from files reproduces the paper's
pipeline) with crop-pad-4 + flip augmentation; other images the training split's own
per-channel mean and std, without augmentation.

Order: an image folder's test split is put in one fixed pseudo-random order
(``test_order``, seed 0), so that evaluation batches of the global test set mix classes as
CIFAR's own test order does (with static BN a single-class batch would be normalised
with its own class's statistics). The training split stays in file order (the partition
draws from it by label).

Every bad input is one ``ValueError`` line naming the file or value (``build_run`` reports
it as ``config.data: ...``), raised before any cache file is written. The config checks
run before any loading: ``check_image_folder``, ``check_arrays`` (``data_dir`` set, the
image options).
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import re
import secrets
import zipfile

import numpy as np

from fiarse_jax.data import augment as augment_lib
from fiarse_jax.data import checks
from fiarse_jax.data.types import Dataset

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
#: Bumped when the cache's contents change meaning (old caches are then rebuilt).
CACHE_VERSION = 1
ARRAY_KEYS = ("x_train", "y_train", "x_test", "y_test")
_CACHE_NAME = re.compile(r"^\.fiarse_cache_[0-9a-f]{16}\.npz$")
#: Image counts from which decoding shows a progress bar.
PROGRESS_FROM = 2000


# --------------------------------------------------------------------------- image_folder

def _is_image(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _class_dirs(split_dir: str) -> list[str]:
    with os.scandir(split_dir) as it:
        return sorted(e.name for e in it if e.is_dir() and not e.name.startswith("."))


def _class_files(root: str, class_dir: str) -> list[tuple[str, int, int]]:
    """(path relative to ``root``, size, mtime_ns) of every image under ``class_dir`` (and
    its sub-folders), sorted by path."""
    out = []
    skip = len(root) + 1

    def walk(directory):
        with os.scandir(directory) as it:
            for e in it:
                if e.name.startswith("."):
                    continue
                if e.is_dir():
                    walk(e.path)
                elif _is_image(e.name):
                    st = e.stat()
                    out.append((e.path[skip:], st.st_size, st.st_mtime_ns))

    walk(class_dir)
    if not out:
        raise ValueError(f"image_folder: class folder {class_dir} holds no images "
                         f"({', '.join(IMAGE_EXTENSIONS)})")
    return sorted(out)


def scan_image_folder(root: str) -> tuple[list[str], dict[str, list[tuple[str, int, int, int]]]]:
    """(classes, {split: [(relative path, size, mtime_ns, label)]}) of the tree at
    ``root``; ``test`` is absent from the dict when ``root/test`` is."""
    root = os.path.abspath(os.path.expanduser(root))
    if not os.path.exists(root):
        raise ValueError(f"image_folder: directory {root} does not exist")
    if not os.path.isdir(root):
        raise ValueError(f"image_folder: {root} is not a directory (expected "
                         f"{root}/train/<class>/ and {root}/test/<class>/ image folders)")
    train_dir = os.path.join(root, "train")
    if not os.path.isdir(train_dir):
        raise ValueError(f"image_folder: directory {train_dir} does not exist (expected "
                         f"{root}/train/<class>/ and {root}/test/<class>/ image folders)")
    classes = _class_dirs(train_dir)
    if not classes:
        raise ValueError(f"image_folder: no class folders in {train_dir} (expected "
                         f"{train_dir}/<class>/ folders of images)")
    index = {c: i for i, c in enumerate(classes)}
    splits = {}
    for split in ("train", "test"):
        split_dir = os.path.join(root, split)
        if split == "test" and not os.path.isdir(split_dir):
            continue
        names = _class_dirs(split_dir)
        extra = [c for c in names if c not in index]
        if extra:
            raise ValueError(f"image_folder: test class folder {os.path.join(split_dir, extra[0])}"
                             f" has no counterpart in {train_dir}")
        if not names:
            raise ValueError(f"image_folder: no class folders in {split_dir}")
        splits[split] = [(rel, size, mtime, index[c]) for c in names
                         for rel, size, mtime in _class_files(root, os.path.join(split_dir, c))]
    return classes, splits


def cache_key(splits: dict) -> str:
    """Hex digest of the file list (split, relative path, size, mtime) and CACHE_VERSION."""
    h = hashlib.sha256(f"fiarse_jax image_folder cache v{CACHE_VERSION}\n".encode())
    for split in sorted(splits):
        for rel, size, mtime, label in splits[split]:
            h.update(f"{split}\t{label}\t{rel}\t{size}\t{mtime}\n".encode())
    return h.hexdigest()


def user_cache_dir() -> str:
    """``$XDG_CACHE_HOME/fiarse_jax``, else ``~/.cache/fiarse_jax``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "fiarse_jax")


def _writable(directory: str) -> bool:
    return os.access(directory, os.W_OK | os.X_OK)


def cache_paths(root: str, key: str) -> list[tuple[str, re.Pattern]]:
    """Where the cache of ``root`` may live, in order of preference (beside the data,
    then the user cache directory), each with the pattern of its stale siblings."""
    path_tag = hashlib.sha256(os.path.abspath(root).encode()).hexdigest()[:12]
    return [(os.path.join(root, f".fiarse_cache_{key[:16]}.npz"), _CACHE_NAME),
            (os.path.join(user_cache_dir(), f"image_folder_{path_tag}_{key[:16]}.npz"),
             re.compile(rf"^image_folder_{path_tag}_[0-9a-f]{{16}}\.npz$"))]


def _read_cache(path: str, key: str) -> dict | None:
    """The cached arrays, or None when absent, for another file list, or unreadable."""
    if not os.path.isfile(path):
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["key"]) != key:
                return None
            out = {k: z[k] for k in z.files}
        ok = (out["x"].dtype == np.uint8 and out["x"].ndim == 4
              and out["y"].shape == (len(out["x"]),)
              and out["test_x"].shape[1:] == out["x"].shape[1:]
              and out["test_y"].shape == (len(out["test_x"]),))
        if not ok:
            raise ValueError("unexpected array shapes")
        return out
    except Exception as e:  # noqa: BLE001 — any damage means: rebuild
        print(f"image_folder: cache {path} is unreadable ({type(e).__name__}: {e}); rebuilding",
              flush=True)
        return None


def _write_atomic(path: str, arrays: dict) -> None:
    """``np.savez`` to a temporary file beside ``path``, then rename it over ``path`` (a
    reader never sees a half-written cache; a failed write leaves nothing behind)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        with open(tmp, "xb") as f:   # mode 0o666 less the umask, as any file the user writes
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _remove_stale(path: str, pattern: re.Pattern) -> None:
    directory, keep = os.path.split(path)
    with contextlib.suppress(OSError), os.scandir(directory) as it:
        for e in it:
            if e.name != keep and pattern.match(e.name):
                with contextlib.suppress(OSError):
                    os.unlink(e.path)


def _decode(root: str, entries: list, expected: tuple | None, first: str | None,
            desc: str) -> tuple[np.ndarray, tuple, str]:
    """uint8 [n, H, W, C] of ``entries``' files; every image must have shape ``expected``
    (that of ``first``), or, when None, the shape of the first image decoded."""
    from PIL import Image
    try:
        from tqdm import tqdm
    except ImportError:   # a bar is a nicety
        tqdm = None
    it = entries
    if tqdm is not None and len(entries) >= PROGRESS_FROM:
        it = tqdm(entries, desc=f"decoding {desc}", unit="img", mininterval=1.0, leave=False)
    x = None
    for i, (rel, *_) in enumerate(it):
        path = os.path.join(root, rel)
        try:
            with Image.open(path) as img:
                mode = img.mode
                a = np.asarray(img) if mode in ("RGB", "L") else None
        except Exception as e:  # noqa: BLE001 — PIL raises OSError, SyntaxError, ValueError, ...
            raise ValueError(f"image_folder: cannot read image {path}: {e}") from None
        if a is None:
            raise ValueError(f"image_folder: {path} has image mode {mode!r}; only RGB and "
                             "grayscale ('L') are read (convert the files first)")
        if a.ndim == 2:
            a = a[..., None]
        if expected is None:
            expected, first = a.shape, path
        if a.shape != expected or a.dtype != np.uint8:
            raise ValueError(f"image_folder: {path} has shape {a.shape} ({mode}), but "
                             f"{first} has {expected}; all images must have one size and "
                             "channel count")
        if x is None:
            x = np.empty((len(entries),) + expected, np.uint8)
        x[i] = a
    return x, expected, first


def _build(root: str, splits: dict, cache_at: str) -> dict:
    n_train, n_test = len(splits["train"]), len(splits.get("test", ()))
    print(f"image_folder: decoding {n_train} train + {n_test} test images from {root} "
          f"(once; cached as {cache_at})", flush=True)
    x, shape, first = _decode(root, splits["train"], None, None, "train")
    y = np.array([e[3] for e in splits["train"]], np.int32)
    if "test" in splits:
        tx, _, _ = _decode(root, splits["test"], shape, first, "test")
    else:
        tx = np.zeros((0,) + shape, np.uint8)
    ty = np.array([e[3] for e in splits.get("test", ())], np.int32)
    return {"x": x, "y": y, "test_x": tx, "test_y": ty}


def read_image_folder(root: str) -> tuple[dict, list[str]]:
    """({x, y, test_x, test_y} uint8/int32 arrays, classes) of the tree at ``root``, from
    the cache when it holds this file list, else decoded (and then cached)."""
    root = os.path.abspath(os.path.expanduser(root))
    classes, splits = scan_image_folder(root)
    key = cache_key(splits)
    locations = cache_paths(root, key)
    for path, _ in locations:
        arrays = _read_cache(path, key)
        if arrays is not None:
            arrays.pop("key")
            return arrays, classes
    # Beside the data when that directory is writable, else (or when writing there fails)
    # in the user cache directory.
    targets = locations if _writable(root) else locations[1:]
    arrays = _build(root, splits, targets[0][0])
    for path, pattern in targets:
        try:
            _write_atomic(path, {**arrays, "key": np.array(key)})
        except OSError as e:
            print(f"image_folder: could not write the cache {path} ({e})", flush=True)
            continue
        _remove_stale(path, pattern)
        break
    return arrays, classes


def test_order(n: int) -> np.ndarray:
    """The fixed order (seed 0, whatever the run's seed) an image folder's test split is
    scored in."""
    return np.random.default_rng(0).permutation(n)


def load_image_folder(*, data_dir: str | None = None, mean=None, std=None,
                      augment: bool | None = None) -> Dataset:
    """The ImageFolder tree at ``data_dir`` as a ``Dataset`` (see the module docstring)."""
    if not data_dir:
        raise ValueError("image_folder needs config.data.data_dir: a directory holding "
                         "train/<class>/ and test/<class>/ image folders")
    arrays, classes = read_image_folder(data_dir)
    has_test = len(arrays["test_x"]) > 0
    train_transform, eval_transform, _ = augment_lib.image_transforms(
        arrays["x"], mean, std, augment)
    # A folder has no sample order of its own (files are read class by class). The
    # global test set is scored in its order in batches (static BN normalises with each
    # batch's statistics), so single-class batches would bend it: the test split gets one
    # fixed pseudo-random order, as CIFAR's own test order is mixed.
    order = test_order(len(arrays["test_y"]))
    return Dataset(x=arrays["x"], y=arrays["y"], num_classes=len(classes),
                   test_x=arrays["test_x"][order] if has_test else None,
                   test_y=arrays["test_y"][order] if has_test else None,
                   train_transform=train_transform, eval_transform=eval_transform)


# --------------------------------------------------------------------------------- arrays

def _images(name: str, x: np.ndarray) -> np.ndarray:
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4:
        raise ValueError(f"arrays: {name} has shape {x.shape}; expected [n, H, W, C] or "
                         "[n, H, W] (grayscale)")
    if len(x) == 0:
        raise ValueError(f"arrays: {name} is empty")
    if x.shape[1] in (1, 3, 4) and x.shape[-1] not in (1, 3, 4) and x.shape[-1] > x.shape[1]:
        # [n, C, H, W] (PyTorch's layout) would train as C×H images with W channels.
        raise ValueError(f"arrays: {name} has shape {x.shape}, which looks channels-first "
                         f"([n, C, H, W]); store images as [n, H, W, C] (e.g. "
                         f"np.transpose(x, (0, 2, 3, 1)))")
    if x.dtype == np.uint8:
        return x
    if np.issubdtype(x.dtype, np.integer):
        lo, hi = int(x.min()), int(x.max())
        if lo < 0 or hi > 255:
            raise ValueError(f"arrays: {name} ({x.dtype}) holds values in [{lo}, {hi}]; "
                             "integer pixels must be in 0..255")
        return x.astype(np.uint8)
    if np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float32)
        if not np.all(np.isfinite(x)):
            raise ValueError(f"arrays: {name} holds non-finite values")
        lo, hi = float(x.min()), float(x.max())
        if lo < 0 or hi > 1:
            raise ValueError(f"arrays: {name} (float) holds values in [{lo:g}, {hi:g}]; "
                             "float pixels must be in [0, 1] (or store uint8 0..255)")
        return x
    raise ValueError(f"arrays: {name} has dtype {x.dtype}; expected uint8 or float pixels")


def _labels(name: str, y: np.ndarray, n: int, x_name: str) -> np.ndarray:
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise ValueError(f"arrays: {name} has shape {y.shape}; expected [n] integer labels")
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"arrays: {name} has dtype {y.dtype}; labels must be integers")
    if len(y) != n:
        raise ValueError(f"arrays: {x_name} has {n} images but {name} has {len(y)} labels")
    if y.min() < 0:
        raise ValueError(f"arrays: {name} holds label {int(y.min())}; labels must be in 0..K-1")
    return y.astype(np.int32)


def read_arrays(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
    """(x, y, test_x, test_y, num_classes) of the .npz file at ``path``, checked."""
    path = os.path.expanduser(path)
    if not os.path.exists(path):
        raise ValueError(f"arrays: file {path} does not exist")
    if os.path.isdir(path):
        raise ValueError(f"arrays: {path} is a directory; config.data.data_dir must be an "
                         f".npz file holding {', '.join(ARRAY_KEYS)}")
    if os.path.isfile(path) and not zipfile.is_zipfile(path) and not path.endswith(".npy"):
        raise ValueError(f"arrays: {path} is not an .npz file (not a zip archive: an .npz is "
                         f"what np.savez writes, holding {', '.join(ARRAY_KEYS)})")
    try:
        z = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f"arrays: cannot read {path} as an .npz file: {e}") from None
    if not isinstance(z, np.lib.npyio.NpzFile):
        raise ValueError(f"arrays: {path} is a single array, not an .npz file holding "
                         f"{', '.join(ARRAY_KEYS)}")
    with z:
        missing = [k for k in ARRAY_KEYS if k not in z.files]
        if missing:
            raise ValueError(f"arrays: {path} has no {missing[0]!r} (it holds "
                             f"{sorted(z.files)}; needed: {', '.join(ARRAY_KEYS)})")
        try:
            raw = {k: z[k] for k in z.files
                   if k in ARRAY_KEYS + ("num_classes", "class_names")}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
            raise ValueError(f"arrays: cannot read {path}: {e}") from None
    x, tx = _images("x_train", raw["x_train"]), _images("x_test", raw["x_test"])
    if tx.shape[1:] != x.shape[1:]:
        raise ValueError(f"arrays: x_test images have shape {tx.shape[1:]} but x_train "
                         f"images {x.shape[1:]}")
    if (x.dtype == np.uint8) != (tx.dtype == np.uint8):
        raise ValueError(f"arrays: x_train is {raw['x_train'].dtype} but x_test is "
                         f"{raw['x_test'].dtype}; give both splits as uint8 or both as float")
    y = _labels("y_train", raw["y_train"], len(x), "x_train")
    ty = _labels("y_test", raw["y_test"], len(tx), "x_test")
    num_classes = int(max(y.max(), ty.max())) + 1
    given = {}
    if "num_classes" in raw:
        k = raw["num_classes"]
        if k.ndim != 0 or not np.issubdtype(k.dtype, np.integer) or int(k) < 1:
            raise ValueError(f"arrays: num_classes = {k!r} must be a positive integer scalar")
        given["num_classes"] = int(k)
    if "class_names" in raw:
        if raw["class_names"].ndim != 1:
            raise ValueError(f"arrays: class_names has shape {raw['class_names'].shape}; "
                             "expected one name per class")
        given["class_names"] = len(raw["class_names"])
    if len(set(given.values())) > 1:
        raise ValueError(f"arrays: num_classes = {given['num_classes']} but class_names has "
                         f"{given['class_names']} names")
    if given:
        k = next(iter(given.values()))
        for name, labels in (("y_train", y), ("y_test", ty)):
            if labels.max() >= k:
                raise ValueError(f"arrays: {name} holds label {int(labels.max())} but there "
                                 f"are {k} classes ({next(iter(given))}); labels must be in "
                                 f"0..{k - 1}")
        num_classes = k
    return x, y, tx, ty, num_classes


def load_arrays(*, data_dir: str | None = None, mean=None, std=None,
                augment: bool | None = None) -> Dataset:
    """The .npz file at ``data_dir`` as a ``Dataset`` (see the module docstring)."""
    if not data_dir:
        raise ValueError("arrays needs config.data.data_dir: the path of an .npz file "
                         f"holding {', '.join(ARRAY_KEYS)}")
    x, y, tx, ty, num_classes = read_arrays(data_dir)
    train_transform, eval_transform, _ = augment_lib.image_transforms(x, mean, std, augment)
    return Dataset(x=x, y=y, num_classes=num_classes, test_x=tx, test_y=ty,
                   train_transform=train_transform, eval_transform=eval_transform)


# --------------------------------------------------------------------------- config checks

def _config_check(name: str, needs: str):
    def check(data) -> None:
        checks.data_dir(data)
        if not data.get("data_dir"):
            checks.fail("data_dir", data.get("data_dir"), f"dataset {name!r} needs {needs}")
        augment_lib.check_image_options(data)
    check.__doc__ = f"config.data for {name!r}: ``data_dir`` set, and the image options."
    return check


check_image_folder = _config_check(
    "image_folder", "a directory holding train/<class>/ and test/<class>/ image folders")
check_arrays = _config_check("arrays", f"the path of an .npz file holding {', '.join(ARRAY_KEYS)}")
