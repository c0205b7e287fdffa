"""The peer benchmark's shared pieces (benchmarks/peers/): the parameter layout handed to
PyTorch, the server's thresholds and update, and (with PyTorch) one client's training."""
import os
import sys

import jax
import numpy as np
import pytest

from fiarse_jax.core import masks
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
    """θ_r of the Flower strategy (NumPy over its arrays) = ``fiarse_jax.core.masks``'
    global-scope thresholds over the same weights and biases, for the four sizes."""
    rng = np.random.default_rng(3)
    params = {"a": {"kernel": rng.normal(size=(7, 5)).astype(np.float32),
                    "bias": rng.normal(size=5).astype(np.float32)},
              "b": {"kernel": rng.normal(size=(5, 3)).astype(np.float32)}}
    ours = masks.importance_thresholds(params, workload.CAPACITIES, scope="global")
    theirs = flower_fiarse.thresholds(jax.tree_util.tree_leaves(params), workload.CAPACITIES)
    np.testing.assert_array_equal(np.asarray(ours).ravel()[:4], np.asarray(theirs, np.float32))


def test_flower_servers_update_is_fiarse_jaxs_holder_average():
    """The Flower strategy's update (``holder_update``) = ``server.holder_average`` then
    ``apply_update`` on the same deltas and masks (three clients, overlapping holdings)."""
    from fiarse_jax.core import server
    rng = np.random.default_rng(4)
    shapes = [(6, 4), (4,)]
    g = [rng.normal(size=s).astype(np.float32) for s in shapes]
    masks = [[(rng.random(s) < p).astype(np.float32) for s in shapes] for p in (0.9, 0.5, 0.2)]
    deltas = [[rng.normal(size=s).astype(np.float32) * m for s, m in zip(shapes, ms)]
              for ms in masks]
    theirs = flower_fiarse.holder_update(g, list(zip(deltas, masks)))
    stack = lambda xs: [np.stack(a) for a in zip(*xs)]   # noqa: E731
    avg, _ = server.holder_average(stack(deltas), stack(masks))
    ours = server.apply_update(g, avg)
    for a, b in zip(theirs, ours):
        np.testing.assert_allclose(a, np.asarray(b), rtol=1e-6, atol=1e-6)


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


def test_flower_client_and_ours_train_the_same_given_the_same_rows(tmp_path):
    """One client's K steps on both sides from the same weights, θ and batch rows (ours'
    ``batch_rows``): the same mean loss and delta to float rounding, for a full and a
    1/64 client. Needs PyTorch (the ``peers`` or ``bench`` extra); skipped without it."""
    torch = pytest.importorskip("torch")
    import torch.nn.functional as F

    from fiarse_jax.experiment import build
    from fiarse_jax.federated.algorithm import client_fns
    from fiarse_jax.federated.client import batch_rows

    data = workload.synthetic_images(str(tmp_path / "d.npz"), n_train=1_500, n_test=50)
    config = workload.config(data, num_clients=8, clients_per_round=4, local_steps=5)
    run = build.build_run(config)
    path = workload.export(run, config, str(tmp_path / "w.npz"))
    z, fns, key = np.load(path), client_fns(run), jax.random.PRNGKey(5)
    names, state = list(z["param_names"]), run.prepare(run.init_params, 0, key)
    thetas = flower_fiarse.thresholds([z[f"init/{k}"] for k in names], z["capacities"])
    w = flower_fiarse._load(path)
    for cid in (0, 7):   # level 0 (full) and level 3 (1/64)
        level = int(run.assignment[cid])
        spec = run.policy.client_spec(state, level, key)
        mine = jax.tree_util.tree_map(lambda a: a[cid], run.data.train)
        st, rows = fns.init(run.init_params, spec, mine, key), []
        for k in range(fns.num_steps):
            rows.append(np.asarray(batch_rows(st.order_key, mine.count, mine.y.shape[0], k,
                                              20, int(np.min(run.data.train_sizes)))))
            st = fns.step(st, spec, mine, k)
        ours = fns.final(run.init_params, st, spec)
        net, start = w["net"], {k: torch.from_numpy(z[f"init/{k}"]) for k in names}
        net.load_state_dict(start)
        for m in net.modules():
            if hasattr(m, "theta"):
                m.theta = torch.tensor(thetas[level])
        x, y, _ = flower_fiarse._client_rows(w, cid, 0)
        opt, losses = torch.optim.SGD(net.parameters(), lr=0.1), []
        for idx in rows:
            opt.zero_grad()
            loss = F.cross_entropy(net(x[torch.from_numpy(idx)]), y[torch.from_numpy(idx)])
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert abs(float(ours.loss) - np.mean(losses)) < 1e-4
        delta = workload.flax_to_torch(ours.delta)
        for k, v in net.state_dict().items():
            np.testing.assert_allclose((start[k] - v).numpy(), delta[k], atol=1e-4)
