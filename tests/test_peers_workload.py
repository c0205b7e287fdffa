"""The peer benchmark's shared pieces (benchmarks/peers/), without Flower or PyTorch:
the parameter layout handed to PyTorch, and the server's thresholds."""
import os
import sys

import jax
import numpy as np

from fiarse_jax import masks
from fiarse_jax.models import build_model

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks", "peers"))
import flower_fiarse  # noqa: E402
import workload  # noqa: E402


def _conv_nchw(x, w, b):
    """3×3 SAME convolution in NumPy, NCHW input, OIHW kernel (PyTorch's layout)."""
    n, c, h, wd = x.shape
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    out = np.zeros((n, w.shape[0], h, wd), np.float64)
    for i in range(3):
        for j in range(3):
            out += np.einsum("nchw,oc->nohw", xp[:, :, i:i + h, j:j + wd], w[:, :, i, j])
    return out + b[None, :, None, None]


def _torch_style_forward(sd, x_nhwc):
    """The PyTorch CNN's forward (benchmarks/torch_reference.py) in NumPy on a state dict:
    NCHW, conv + ReLU, 2×2 max-pool between convs, flatten (c, h, w), dense layers."""
    x = x_nhwc.transpose(0, 3, 1, 2).astype(np.float64)
    convs = sorted(k[:-7] for k in sd if k.startswith("convs.") and k.endswith(".weight"))
    for i, name in enumerate(convs):
        x = np.maximum(_conv_nchw(x, sd[f"{name}.weight"], sd[f"{name}.bias"]), 0)
        if i < len(convs) - 1:
            n, c, h, w = x.shape
            x = x.reshape(n, c, h // 2, 2, w // 2, 2).max(axis=(3, 5))
    x = x.reshape(len(x), -1)
    denses = sorted(k[:-7] for k in sd if k.startswith("dense.") and k.endswith(".weight"))
    for i, name in enumerate(denses):
        x = x @ sd[f"{name}.weight"].T + sd[f"{name}.bias"]
        if i < len(denses) - 1:
            x = np.maximum(x, 0)
    return x


def test_flax_to_torch_gives_the_same_function_in_pytorchs_layout():
    """The converted weights, run the PyTorch way (NCHW, (c, h, w) flattening) in NumPy,
    give the flax CNN's logits."""
    model = build_model("cnn", 10, {"features": (4, 6), "hidden_sizes": (5,)})
    x = np.random.default_rng(0).normal(size=(3, 8, 8, 3)).astype(np.float32)
    params = model.init(jax.random.PRNGKey(1), x)
    sd = workload.flax_to_torch(params)
    assert sd["convs.1.weight"].shape == (6, 4, 3, 3) and sd["dense.0.weight"].shape == (5, 96)
    np.testing.assert_allclose(_torch_style_forward(sd, x), np.asarray(model.apply(params, x)),
                               rtol=1e-4, atol=1e-5)


def test_flower_servers_thresholds_are_fiarse_jaxs_global_thresholds():
    """θ_r of the Flower strategy (NumPy over its arrays) = ``fiarse_jax.masks``'
    global-scope thresholds over the same weights and biases, for the four sizes."""
    rng = np.random.default_rng(3)
    params = {"a": {"kernel": rng.normal(size=(7, 5)).astype(np.float32),
                    "bias": rng.normal(size=5).astype(np.float32)},
              "b": {"kernel": rng.normal(size=(5, 3)).astype(np.float32)}}
    ours = masks.importance_thresholds(params, workload.CAPACITIES, scope="global")
    theirs = flower_fiarse.thresholds(jax.tree_util.tree_leaves(params), workload.CAPACITIES)
    np.testing.assert_array_equal(np.asarray(ours).ravel()[:4], np.asarray(theirs, np.float32))


def test_synthetic_images_are_seeded_cifar_shaped_and_written_once(tmp_path):
    a = workload.synthetic_images(str(tmp_path / "a.npz"), n_train=600, n_test=100, seed=1)
    b = workload.synthetic_images(str(tmp_path / "b.npz"), n_train=600, n_test=100, seed=1)
    za, zb = np.load(a), np.load(b)
    assert za["x_train"].shape == (600, 32, 32, 3) and za["x_train"].dtype == np.uint8
    np.testing.assert_array_equal(za["x_train"], zb["x_train"])
    np.testing.assert_array_equal(za["y_test"], zb["y_test"])
    assert set(np.unique(za["y_train"])) == set(range(10))
    mtime = os.stat(a).st_mtime_ns
    workload.synthetic_images(a, n_train=10, seed=2)   # exists: not rewritten
    assert os.stat(a).st_mtime_ns == mtime
