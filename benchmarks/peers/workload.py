"""The workload both sides of the peer benchmark train: one file, read by each side.

CIFAR-shaped data (32×32×3 uint8, 10 classes; ``synthetic_images``: learnable, seeded, no
download), federated by ``fiarse_jax`` itself (Dirichlet(0.5) label skew over the clients,
capacity levels assigned in equal contiguous groups), the CNN of
``fiarse_jax.models.CNN`` (3×3 conv 16 and 32, 2×2 max-pool between, dense 64, dense 10),
four sizes (1, 1/4, 1/16, 1/64), K local SGD steps of batch B at learning rate 0.1.

``export`` writes what the other framework needs into one ``.npz``: each client's training
rows (flat, with offsets), its capacity level, the global test set, the normalisation, the
initial parameters in PyTorch's layout (``flax_to_torch``), and the hyper-parameters. So
both sides start from the same weights and train on the same rows.
"""
from __future__ import annotations

import os
import sys
from typing import Any

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

#: The four sizes (capacity ratios) of the benchmark, as in the paper's CIFAR tables.
CAPACITIES = (1.0, 0.25, 0.0625, 0.015625)
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
FEATURES, HIDDEN = (16, 32), (64,)


def synthetic_images(path: str, *, n_train: int = 50_000, n_test: int = 2_000,
                     seed: int = 0) -> str:
    """Writes (once) a learnable CIFAR-shaped ``arrays`` .npz at ``path`` and returns it.

    Each class is a smooth random colour pattern (4×4×3 Gaussian noise upsampled to 32×32);
    a sample is its class's pattern at a random contrast, shifted by up to 4 pixels (one
    shift per block of 5,000 samples), plus pixel noise. A small CNN learns it within tens
    of rounds, not in one.
    """
    if os.path.exists(path):
        return path
    rng = np.random.default_rng(seed)
    templates = np.kron(rng.normal(size=(10, 4, 4, 3)), np.ones((1, 8, 8, 1)))

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(0, 10, n)
        x = np.empty((n, 32, 32, 3), np.uint8)
        for lo in range(0, n, 5_000):
            hi = min(n, lo + 5_000)
            img = templates[y[lo:hi]] * rng.uniform(0.3, 1.0, (hi - lo, 1, 1, 1))
            dx, dy = rng.integers(-4, 5, 2)
            img = np.roll(img, (dx, dy), axis=(1, 2))
            img = 128 + 12 * img + rng.normal(0, 64, img.shape)
            x[lo:hi] = np.clip(img, 0, 255).astype(np.uint8)
        return x, y

    x, y = draw(n_train)
    tx, ty = draw(n_test)
    tmp = path + ".tmp.npz"
    np.savez(tmp, x_train=x, y_train=y, x_test=tx, y_test=ty, num_classes=10)
    os.replace(tmp, path)
    return path


def config(data_path: str, *, num_clients: int, clients_per_round: int, method: str = "fiarse",
           local_steps: int = 20, batch_size: int = 20, seed: int = 0,
           partition: str = "dirichlet", min_client_size: int = 10):
    """The ``fiarse_jax`` config of the workload (configs/default.py with its fields set).
    ``partition="iid"`` with a small ``min_client_size`` spreads the 50,000 rows over
    10,000 clients (the scaling run); Dirichlet(0.5) otherwise."""
    from common import load_config_file
    c = load_config_file("default.py")
    c.seed, c.method, c.capacities = seed, method, CAPACITIES
    c.data.name, c.data.data_dir = "arrays", data_path
    c.data.num_clients, c.data.min_client_size = num_clients, min_client_size
    c.data.partition = partition
    c.data.mean, c.data.std, c.data.augment = MEAN, STD, False
    c.model.name = "cnn"
    c.model.features, c.model.hidden_sizes = FEATURES, HIDDEN
    c.fiarse.gradient = "masked"     # what a PyTorch masked forward's autograd gives
    c.heterofl.budget = "params"
    c.clients_per_round = clients_per_round
    c.client.local_steps, c.client.batch_size, c.client.learning_rate = local_steps, batch_size, 0.1
    c.checkpoint_every = 0
    return c


def flax_to_torch(params: Any) -> dict[str, np.ndarray]:
    """The CNN's flax parameters as the PyTorch CNN's ``state_dict`` (benchmarks/
    torch_reference.py): conv kernels HWIO → OIHW, dense kernels (in, out) → (out, in), and
    the first dense layer's inputs reordered from NHWC's (h, w, c) flattening to NCHW's."""
    p = params["params"] if "params" in params else params
    out, convs = {}, sorted(k for k in p if k.startswith("Conv_"))
    denses = sorted((k for k in p if k.startswith("Dense_")), key=lambda k: int(k[6:]))
    for i, name in enumerate(convs):
        out[f"convs.{i}.weight"] = np.asarray(p[name]["kernel"]).transpose(3, 2, 0, 1)
        out[f"convs.{i}.bias"] = np.asarray(p[name]["bias"])
    c = out[f"convs.{len(convs) - 1}.weight"].shape[0]
    for i, name in enumerate(denses):
        k = np.asarray(p[name]["kernel"])
        if i == 0:   # rows (h, w, c) -> (c, h, w)
            hw = int(round((k.shape[0] // c) ** 0.5))
            k = k.reshape(hw, hw, c, -1).transpose(2, 0, 1, 3).reshape(k.shape[0], -1)
        out[f"dense.{i}.weight"] = np.ascontiguousarray(k.T)
        out[f"dense.{i}.bias"] = np.asarray(p[name]["bias"])
    return out


def export(run, config, path: str) -> str:
    """Writes the workload of ``run`` (built by ``fiarse_jax.experiment.build.build_run(config)``) for
    the other framework at ``path`` (see the module docstring) and returns ``path``."""
    data = run.data
    counts = np.asarray(data.train.count)
    xs, ys = np.asarray(data.train.x), np.asarray(data.train.y)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    gx, gy = data.global_test()
    torch_init = flax_to_torch(run.init_params)
    masks = {}
    if config.method == "heterofl":   # fixed per level: computed once, PyTorch's layout
        import jax
        state = run.prepare(run.init_params, 0, jax.random.PRNGKey(0))
        for level in range(len(run.capacities)):
            spec = run.policy.client_spec(state, level, jax.random.PRNGKey(0))
            held = flax_to_torch(run.policy.mask(run.init_params, spec))
            masks.update({f"mask/{level}/{k}": v.astype(np.float32) for k, v in held.items()})
    tmp = path + ".tmp.npz"
    np.savez(tmp, x=np.concatenate([xs[i, :n] for i, n in enumerate(counts)]),
             y=np.concatenate([ys[i, :n] for i, n in enumerate(counts)]),
             offsets=offsets, assignment=np.asarray(run.assignment),
             capacities=np.asarray(run.capacities), test_x=np.asarray(gx),
             test_y=np.asarray(gy), mean=np.asarray(MEAN), std=np.asarray(STD),
             local_steps=config.client.local_steps, batch_size=config.client.batch_size,
             learning_rate=config.client.learning_rate, seed=config.seed,
             param_names=np.asarray(list(torch_init)),
             **{f"init/{k}": v for k, v in torch_init.items()}, **masks)
    os.replace(tmp, path)
    return path
