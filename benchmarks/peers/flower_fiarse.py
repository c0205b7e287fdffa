"""FIARSE and HeteroFL written as a Flower user writes them (flwr's Message API).

* ``ClientApp``: each virtual client (a SuperNode, run by Flower's Ray backend) reads its
  rows and capacity level from the workload file (``workload.export``), loads the global
  weights into a PyTorch CNN whose conv and linear layers use ``w ⊙ M`` in every forward
  (FIARSE: M = 1[|w| ≥ θ_r], re-evaluated each step with θ_r fixed for the round; HeteroFL:
  a fixed leading-channel mask per level), takes K SGD steps (lr 0.1) of batch B over a
  per-pass shuffle of its rows, and replies with its delta ``w_old − w_new``.
* ``HolderAverage`` (a ``FedAvg``): the server puts every level's θ_r (the ⌈r·N⌉-th largest
  |w| over all weights and biases) in the round's config, and averages each coordinate over
  the clients that hold it (FIARSE: 1[|w_global| ≥ θ_r] at the round's start, as
  ``fiarse_jax`` counts holders; HeteroFL: its mask), then ``w ← w − avg``.
* Clients are sampled by Flower (``fraction_train``) and run on Ray actors of one CPU each,
  PyTorch on one thread per actor (Flower's advice for CPU simulations).

``simulate`` runs it and returns per-round seconds (from the round's ``configure_train`` to
the end of its ``aggregate_train``: sending, the clients' training, replies, aggregation)
and the server-side evaluations (each size's sub-model on the global test set).
"""
from __future__ import annotations

import math
import os
import sys
import time
from typing import Any

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
_WORKLOADS: dict[str, Any] = {}   # per Ray actor process: the workload, read once


def _torch_cnn():
    """The PyTorch twin of ``fiarse_jax.models.CNN`` (benchmarks/torch_reference.py),
    its masked layers reading a per-layer ``theta`` buffer or a fixed ``mask``."""
    import torch
    import torch.nn.functional as F
    sys.path.insert(0, os.path.join(HERE, ".."))
    sys.path.insert(0, HERE)
    import torch_reference
    import workload
    net, _ = torch_reference._build("cnn", 10, {"features": workload.FEATURES,
                                                "hidden_sizes": workload.HIDDEN,
                                                "in_shape": (3, 32, 32)})
    fixed: dict[str, torch.Tensor] = {}

    def forward_with_masks(x):
        """The forward with fixed masks (HeteroFL): ``w ⊙ mask`` per layer."""
        for i, conv in enumerate(net.convs):
            x = F.relu(F.conv2d(x, conv.weight * fixed[f"convs.{i}.weight"],
                                conv.bias * fixed[f"convs.{i}.bias"], padding=1))
            if i < len(net.convs) - 1:
                x = F.max_pool2d(x, 2)
        x = x.flatten(1)
        for i, layer in enumerate(net.dense):
            x = F.linear(x, layer.weight * fixed[f"dense.{i}.weight"],
                         layer.bias * fixed[f"dense.{i}.bias"])
            if i < len(net.dense) - 1:
                x = F.relu(x)
        return x
    return net, fixed, forward_with_masks


def _load(path: str) -> dict:
    """The workload file's arrays and a PyTorch CNN, once per process."""
    if path not in _WORKLOADS:
        import torch
        torch.set_num_threads(1)
        z = np.load(path)
        w = {k: z[k] for k in z.files if not k.startswith(("init/", "mask/"))}
        w["masks"] = {k[5:]: z[k] for k in z.files if k.startswith("mask/")}
        w["net"], w["fixed"], w["masked_forward"] = _torch_cnn()
        _WORKLOADS[path] = w
    return _WORKLOADS[path]


def _images(w: dict, x: np.ndarray):
    """uint8 NHWC images as the normalised NCHW float32 tensor the CNN takes."""
    import torch
    x = (x.astype(np.float32) / 255 - w["mean"]) / w["std"]
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2), np.float32))


def _level_forward(w: dict, method: str, level: int, theta: float):
    """The CNN's forward as a client of ``level`` computes: FIARSE's masked layers at
    ``theta``, or HeteroFL's fixed masks of the level."""
    import torch
    if method == "fiarse":
        theta_t = torch.tensor(theta)
        for m in w["net"].modules():
            if hasattr(m, "theta"):
                m.theta = theta_t
        return w["net"]
    for k, v in w["masks"].items():
        if k.startswith(f"{level}/"):
            w["fixed"][k.split("/", 1)[1]] = torch.from_numpy(v)
    return w["masked_forward"]


def _client_rows(w: dict, pid: int, server_round: int):
    """The client's rows (normalised, NCHW) and a generator seeded by (seed, round, id)."""
    import torch
    lo, hi = int(w["offsets"][pid]), int(w["offsets"][pid + 1])
    x = _images(w, w["x"][lo:hi])
    y = torch.from_numpy(w["y"][lo:hi].astype(np.int64))
    gen = torch.Generator().manual_seed(int(w["seed"]) * 1_000_003 + server_round * 10_007 + pid)
    return x, y, gen


def train(msg, context):
    """One client's local training: K masked SGD steps; replies with its delta."""
    import torch
    import torch.nn.functional as F
    from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

    cfg = msg.content["config"]
    w = _load(str(cfg["workload"]))
    pid = int(context.node_config["partition-id"])
    level = int(w["assignment"][pid])
    net = w["net"]
    start = {k: torch.from_numpy(v) for k, v in
             zip(w["param_names"], msg.content["arrays"].to_numpy_ndarrays())}
    net.load_state_dict(start)
    forward = _level_forward(w, str(cfg["method"]), level, float(cfg[f"theta-{level}"]))
    x, y, gen = _client_rows(w, pid, int(cfg["server-round"]))
    steps, batch, n = int(w["local_steps"]), int(w["batch_size"]), len(y)
    opt = torch.optim.SGD(net.parameters(), lr=float(w["learning_rate"]))
    order, cursor, losses = torch.randperm(n, generator=gen), 0, []
    for _ in range(steps):
        if cursor + batch > n:   # a new pass: a new shuffle
            order, cursor = torch.randperm(n, generator=gen), 0
        idx = order[cursor:cursor + batch]
        cursor += batch
        opt.zero_grad()
        loss = F.cross_entropy(forward(x[idx]), y[idx])
        loss.backward()
        opt.step()
        losses.append(loss.item())
    delta = {k: (start[k] - v).numpy() for k, v in net.state_dict().items()}
    reply = RecordDict({"arrays": ArrayRecord(numpy_ndarrays=list(delta.values()),
                                              keep_input=True),
                        "metrics": MetricRecord({"num-examples": n, "level": level,
                                                 "loss": float(np.mean(losses))})})
    return Message(content=reply, reply_to=msg)


def thresholds(arrays: list[np.ndarray], capacities) -> list[float]:
    """θ_r = the ⌈r·N⌉-th largest |w| over every array (all weights and biases); 0 when
    that is all N (as ``fiarse_jax.core.masks``: the same mask, every coordinate held)."""
    a = np.sort(np.concatenate([np.abs(v).ravel() for v in arrays]))[::-1]
    ks = [min(len(a), max(1, math.ceil(r * len(a)))) for r in capacities]
    return [0.0 if k == len(a) else float(a[k - 1]) for k in ks]


def holder_update(global_arrays: list[np.ndarray], updates) -> list[np.ndarray]:
    """``w − Σ_i d_i / Σ_i m_i`` per coordinate (``w`` where nobody holds it), over the
    ``(delta arrays, held masks)`` pairs of the round's clients; a client's delta is 0
    outside what it holds (its masked forward gives those coordinates no gradient)."""
    tot = [np.zeros_like(v) for v in global_arrays]
    cnt = [np.zeros_like(v) for v in global_arrays]
    for deltas, held in updates:
        for t, c, d, h in zip(tot, cnt, deltas, held):
            t += d
            c += h
    return [g - np.divide(t, c, out=np.zeros_like(t), where=c > 0)
            for g, t, c in zip(global_arrays, tot, cnt)]


def make_strategy(path: str, method: str, clients_per_round: int, num_clients: int,
                  eval_every: int, log: dict):
    """The ``FedAvg`` subclass averaging over holders (module docstring); ``log`` collects
    ``round_s`` and ``evals``."""
    from flwr.app import ArrayRecord, MetricRecord
    from flwr.serverapp.strategy import FedAvg
    w = np.load(path)
    names, caps = list(w["param_names"]), [float(c) for c in w["capacities"]]
    masks = {k[5:]: w[k] for k in w.files if k.startswith("mask/")}

    class HolderAverage(FedAvg):
        def configure_train(self, server_round, arrays, config, grid):
            self._t = time.perf_counter()
            self._global = arrays.to_numpy_ndarrays()
            self._thetas = thresholds(self._global, caps)
            config["workload"], config["method"] = path, method
            for i, t in enumerate(self._thetas):
                config[f"theta-{i}"] = t
            return super().configure_train(server_round, arrays, config, grid)

        def _held(self, level: int) -> list[np.ndarray]:
            if method == "fiarse":
                return [np.abs(v) >= self._thetas[level] for v in self._global]
            return [masks[f"{level}/{k}"] for k in names]

        def aggregate_train(self, server_round, replies):
            held, losses, updates = {}, [], []
            for m in replies:
                if m.has_error():
                    raise RuntimeError(f"a client failed: {m.error.reason}")
                level = int(m.content["metrics"]["level"])
                if level not in held:
                    held[level] = self._held(level)
                updates.append((m.content["arrays"].to_numpy_ndarrays(), held[level]))
                losses.append(float(m.content["metrics"]["loss"]))
            new = holder_update(self._global, updates)
            log["round_s"].append(time.perf_counter() - self._t)
            log["train_loss"].append(float(np.mean(losses)))
            return (ArrayRecord(numpy_ndarrays=new, keep_input=True),
                    MetricRecord({"loss": float(np.mean(losses))}))

    def evaluate(server_round: int, arrays) -> MetricRecord | None:
        if server_round == 0 or server_round % eval_every:
            return None
        t = time.perf_counter()
        acc = evaluate_levels(path, method, arrays.to_numpy_ndarrays())
        log["evals"].append({"round": server_round, "global_accuracy": acc,
                             "eval_s": time.perf_counter() - t})
        return MetricRecord({f"acc-{i}": a for i, a in enumerate(acc)})

    strategy = HolderAverage(fraction_train=clients_per_round / num_clients,
                             min_train_nodes=clients_per_round,
                             min_available_nodes=num_clients, fraction_evaluate=0.0)
    return strategy, evaluate


def evaluate_levels(path: str, method: str, arrays: list[np.ndarray]) -> list[float]:
    """Each size's sub-model's accuracy on the global test set (batches of 500)."""
    import torch
    w = _load(path)
    net, names = w["net"], list(w["param_names"])
    net.load_state_dict({k: torch.from_numpy(v) for k, v in zip(names, arrays)})
    x, y = _images(w, w["test_x"]), torch.from_numpy(w["test_y"].astype(np.int64))
    out = []
    for level, theta in enumerate(thresholds(arrays, w["capacities"])):
        forward = _level_forward(w, method, level, theta)
        with torch.no_grad():
            right = sum(int((forward(x[i:i + 500]).argmax(1) == y[i:i + 500]).sum())
                        for i in range(0, len(y), 500))
        out.append(right / len(y))
    return out


def simulate(path: str, *, method: str, clients_per_round: int, rounds: int,
             eval_every: int, num_cpus: int) -> dict:
    """Runs the Flower simulation of the workload at ``path``; returns the log."""
    from flwr.app import ArrayRecord, Context
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    z = np.load(path)
    num_clients = len(z["assignment"])
    init = [z[f"init/{k}"] for k in z["param_names"]]
    log: dict = {"round_s": [], "train_loss": [], "evals": []}
    server_app, client_app = ServerApp(), ClientApp()
    client_app.train()(train)

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        strategy, evaluate = make_strategy(path, method, clients_per_round, num_clients,
                                           eval_every, log)
        strategy.start(grid=grid, initial_arrays=ArrayRecord(numpy_ndarrays=init),
                       num_rounds=rounds, evaluate_fn=evaluate)

    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=num_clients,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"num_cpus": num_cpus,
                                                 "include_dashboard": False}})
    return log
