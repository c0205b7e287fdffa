"""PyTorch reference of one FIARSE round, run the way the authors' code runs it.

The benchmark suite times this next to ``fiarse_jax`` to report speed ratios ours/reference.
Usage (one configuration per process, so ``peak_rss_mb`` is per configuration)::

    python benchmarks/torch_reference.py --model cnn --clients 10 --steps 20 --batch 20 \\
        --rounds 3 [--threads 2] [--json OUT]

Mirrored from the authors' code (HarliWu/FIARSE, ``fiarse/{server,worker}.py``,
``fiarse/model/model_utils.py``):

* Masked layers: every conv/linear weight and bias is used as ``w * (|w| >= θ)`` in each
  forward, so the mask follows the current weights during local training and autograd gives
  the plain masked gradient ``g ⊙ M`` — what their released runs trained with (their ``Bern``
  op returns a bool tensor, so its TCB backward never runs). BatchNorm is never masked.
* Global scope: θ_r = the k-th largest |w| over all maskable parameters.
* Clients run one after another: ``deepcopy`` of the global model, a fresh ``SGD(lr=0.1)``
  (no momentum, no weight decay), K steps of cross-entropy at batch B from a per-client data
  iterator that persists across rounds, then ``delta = old − new`` over the ``state_dict``.
* Server: ``avg = Σ delta / Σ 1[delta ≠ 0]`` per coordinate (0 where nobody changed it),
  ``w ← w − avg`` (η_g = 1). BN γ/β are averaged the same way.
* Models: the same architectures and parameter counts as ``fiarse_jax.models.CNN`` and
  ``fiarse_jax.models.ResNet18`` (CIFAR ResNet-18, static BN ``track_running_stats=False``,
  bias-free convs, 3×3 stem, no max-pool, 1×1 conv+BN projection shortcuts: 11,173,962).

Simplified (documented differences):

* θ per capacity level is computed once per round (``torch.kthvalue``) with k = ⌈r·N⌉ (our
  contract); the authors use k = ⌊r·N⌋ and run ``torch.topk`` again for every client
  (``per_client_topk=True`` / ``--per-client-topk`` does that, with k = ⌈r·N⌉).
* Random float data (500 samples per client, seeded; NCHW), no DataLoader and no augmentation:
  the authors' per-sample torchvision transforms are not timed, so this reference is, if
  anything, faster than their code. Batches follow a shuffled order per client (reshuffled at
  each epoch end); their loaders do not shuffle.
* The C clients of a round are the whole pool (no sampling) and capacity levels cycle over
  the clients; no evaluation, logging or ``gc.collect``/``empty_cache`` between clients.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import resource
import time
from collections.abc import Sequence
from typing import Any

DIGITS_SHAPE = (1, 8, 8)     # C, H, W of the CNN's digits-shaped input
CIFAR_SHAPE = (3, 32, 32)


def available() -> bool:
    """Whether PyTorch can be imported."""
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def _build(model: str, num_classes: int, model_kwargs: dict[str, Any]):
    """The torch model and its input shape (C, H, W); torch is imported here, lazily."""
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    def masked(w: torch.Tensor, theta: torch.Tensor | float) -> torch.Tensor:
        return w * (w.abs() >= theta)      # bool mask: autograd gives g ⊙ M

    class MaskedConv2d(nn.Conv2d):
        theta: torch.Tensor | float = 0.0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b = None if self.bias is None else masked(self.bias, self.theta)
            return F.conv2d(x, masked(self.weight, self.theta), b, self.stride, self.padding,
                            self.dilation, self.groups)

    class MaskedLinear(nn.Linear):
        theta: torch.Tensor | float = 0.0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.linear(x, masked(self.weight, self.theta), masked(self.bias, self.theta))

    class CNN(nn.Module):
        """fiarse_jax.models.CNN: 3×3 SAME conv (bias) + ReLU, 2×2 max-pool after each conv
        but the last, flatten, dense ReLU layers, dense classifier."""

        def __init__(self, features: Sequence[int] = (16, 32), hidden_sizes: Sequence[int] = (64,),
                     in_shape: tuple[int, int, int] = DIGITS_SHAPE):
            super().__init__()
            c, h, w = in_shape
            self.convs = nn.ModuleList()
            for i, f in enumerate(features):
                self.convs.append(MaskedConv2d(c, f, 3, padding=1))
                c = f
                if i < len(features) - 1:
                    h, w = h // 2, w // 2
            sizes = [c * h * w, *hidden_sizes, num_classes]
            self.dense = nn.ModuleList(MaskedLinear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for i, conv in enumerate(self.convs):
                x = F.relu(conv(x))
                if i < len(self.convs) - 1:
                    x = F.max_pool2d(x, 2)
            x = x.flatten(1)
            for layer in self.dense[:-1]:
                x = F.relu(layer(x))
            return self.dense[-1](x)

    def bn(c: int) -> nn.BatchNorm2d:      # static BN: batch statistics always, affine γ/β
        return nn.BatchNorm2d(c, track_running_stats=False, affine=True)

    class Block(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int):
            super().__init__()
            self.conv1, self.bn1 = MaskedConv2d(cin, cout, 3, stride, 1, bias=False), bn(cout)
            self.conv2, self.bn2 = MaskedConv2d(cout, cout, 3, 1, 1, bias=False), bn(cout)
            self.shortcut = nn.Sequential()
            if stride != 1 or cin != cout:
                self.shortcut = nn.Sequential(MaskedConv2d(cin, cout, 1, stride, bias=False), bn(cout))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = F.relu(self.bn1(self.conv1(x)))
            return F.relu(self.bn2(self.conv2(y)) + self.shortcut(x))

    class ResNet18(nn.Module):
        """fiarse_jax.models.ResNet18 (CIFAR variant, static BN)."""

        def __init__(self, widths: Sequence[int] = (64, 128, 256, 512),
                     blocks_per_stage: Sequence[int] = (2, 2, 2, 2)):
            super().__init__()
            self.stem = nn.Sequential(MaskedConv2d(3, widths[0], 3, 1, 1, bias=False), bn(widths[0]))
            layers, cin = [], widths[0]
            for s, (w, n) in enumerate(zip(widths, blocks_per_stage)):
                for b in range(n):
                    layers.append(Block(cin, w, 2 if s > 0 and b == 0 else 1))
                    cin = w
            self.layers = nn.Sequential(*layers)
            self.head = MaskedLinear(cin, num_classes)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.layers(F.relu(self.stem(x)))
            return self.head(x.mean(dim=(2, 3)))

    if model == "cnn":
        return CNN(**model_kwargs), DIGITS_SHAPE
    if model == "resnet18":
        return ResNet18(**model_kwargs), CIFAR_SHAPE
    raise ValueError(f"unknown model {model!r} (cnn | resnet18)")


def _maskable(net) -> list:
    """The masked layers (conv/linear), in module order."""
    return [m for m in net.modules() if hasattr(m, "theta")]


def _thresholds(net, capacities: Sequence[float], per_level_topk: bool = False) -> dict[float, Any]:
    """θ_r = the ⌈r·N⌉-th largest |w| over every maskable weight and bias.

    ``kthvalue`` per level (a selection, ~2.5× faster than one full sort of ResNet-18's 11 M
    magnitudes on CPU); ``per_level_topk`` uses ``torch.topk`` as the authors do.
    """
    import torch
    with torch.no_grad():
        absw = torch.cat([p.detach().abs().flatten() for m in _maskable(net)
                          for p in m.parameters(recurse=False)])
        n = absw.numel()
        ks = {r: min(n, max(1, math.ceil(r * n))) for r in capacities}
        if per_level_topk:
            return {r: torch.topk(absw, k).values[-1] for r, k in ks.items()}
        return {r: torch.kthvalue(absw, n - k + 1).values for r, k in ks.items()}


def run_reference(model: str = "cnn", clients: int = 10, steps: int = 20, batch: int = 20,
                  rounds: int = 3, threads: int | None = None,
                  capacities: Sequence[float] = (1.0, 0.25, 0.0625), warmup_rounds: int = 1,
                  model_kwargs: dict[str, Any] | None = None, seed: int = 0,
                  samples_per_client: int = 500, num_classes: int = 10,
                  device: str = "cpu", per_client_topk: bool = False) -> dict[str, Any]:
    """Time ``rounds`` FIARSE rounds (after ``warmup_rounds`` untimed ones) in PyTorch.

    Returns framework/version/threads, ``num_params`` (all) and ``num_maskable``, ``round_s``
    (mean seconds per timed round), ``round_times_s``, ``client_steps_per_s``
    (clients·steps/round_s), ``peak_rss_mb`` (this process's peak RSS), ``last_loss`` (mean
    training loss of the last round, a sanity check) and the configuration.
    ``per_client_topk``: recompute θ with ``torch.topk`` for every client, as the authors'
    server does, instead of once per round (same θ values; more work).
    """
    import torch
    import torch.nn.functional as F

    if threads is not None:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    dev = torch.device(device)
    net, shape = _build(model, num_classes, dict(model_kwargs or {}))
    net = net.to(dev).train()
    gen = torch.Generator().manual_seed(seed)
    xs = torch.randn(clients, samples_per_client, *shape, generator=gen).to(dev)
    ys = torch.randint(0, num_classes, (clients, samples_per_client), generator=gen).to(dev)
    orders = [torch.randperm(samples_per_client, generator=gen) for _ in range(clients)]
    cursor = [0] * clients

    def next_batch(c: int):
        """The client's next batch from its persistent shuffled order (reshuffled per epoch)."""
        if cursor[c] + batch > samples_per_client:
            orders[c], cursor[c] = torch.randperm(samples_per_client, generator=gen), 0
        idx = orders[c][cursor[c]:cursor[c] + batch].to(dev)
        cursor[c] += batch
        return xs[c, idx], ys[c, idx]

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def one_round() -> float:
        thetas = {} if per_client_topk else _thresholds(net, capacities)
        tot = {k: torch.zeros_like(v) for k, v in net.state_dict().items()}
        cnt = {k: torch.zeros_like(v) for k, v in net.state_dict().items()}
        losses = []
        for c in range(clients):
            local, level = copy.deepcopy(net), capacities[c % len(capacities)]
            theta = (_thresholds(local, (level,), per_level_topk=True)[level] if per_client_topk
                     else thetas[level])
            for m in _maskable(local):
                m.theta = theta
            old = copy.deepcopy(local.state_dict())
            opt = torch.optim.SGD(local.parameters(), lr=0.1)
            for _ in range(steps):
                x, y = next_batch(c)
                opt.zero_grad()
                loss = F.cross_entropy(local(x), y)
                loss.backward()
                opt.step()
                losses.append(loss.detach())
            for k, new in local.state_dict().items():
                delta = old[k] - new
                tot[k] += delta
                cnt[k] += delta != 0
            del local, old
        with torch.no_grad():
            state = net.state_dict()
            for k in state:
                state[k] -= torch.nan_to_num(tot[k] / cnt[k], nan=0.0, posinf=0.0, neginf=0.0)
        return float(torch.stack(losses).mean())

    times, loss = [], float("nan")
    for r in range(warmup_rounds + rounds):
        sync()
        t0 = time.perf_counter()
        loss = one_round()
        sync()
        if r >= warmup_rounds:
            times.append(time.perf_counter() - t0)
    round_s = sum(times) / len(times) if times else float("nan")
    return {
        "framework": "torch", "torch": torch.__version__, "threads": torch.get_num_threads(),
        "device": str(dev), "model": model, "model_kwargs": dict(model_kwargs or {}),
        "num_params": sum(p.numel() for p in net.parameters()),
        "num_maskable": sum(p.numel() for m in _maskable(net) for p in m.parameters(recurse=False)),
        "clients": clients, "steps": steps, "batch": batch, "capacities": list(capacities),
        "rounds": rounds, "warmup_rounds": warmup_rounds, "per_client_topk": per_client_topk,
        "round_s": round_s, "round_times_s": times,
        "client_steps_per_s": clients * steps / round_s if times else float("nan"),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # KiB on Linux
        "peak_device_mb": (torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda"
                           else None),
        "last_loss": loss,
    }


def _ints(s: str) -> tuple[int, ...]:
    return tuple(int(v) for v in s.split(",") if v)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="cnn", choices=("cnn", "resnet18"))
    ap.add_argument("--clients", type=int, default=10, help="clients per round (trained in turn)")
    ap.add_argument("--steps", type=int, default=20, help="local SGD steps K")
    ap.add_argument("--batch", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds")
    ap.add_argument("--warmup", type=int, default=1, help="untimed rounds before")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--capacities", default="1,0.25,0.0625")
    ap.add_argument("--features", type=_ints, default=None, help="CNN conv widths, e.g. 16,32")
    ap.add_argument("--hidden", type=_ints, default=None, help="CNN hidden sizes, e.g. 64")
    ap.add_argument("--widths", type=_ints, default=None, help="ResNet stage widths")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--per-client-topk", action="store_true",
                    help="θ by torch.topk for every client (the authors' server) instead of once per round")
    ap.add_argument("--json", default=None, help="also write the result to this file")
    args = ap.parse_args(argv)
    kwargs = {k: v for k, v in (("features", args.features), ("hidden_sizes", args.hidden),
                                ("widths", args.widths)) if v is not None}
    result = run_reference(args.model, args.clients, args.steps, args.batch, args.rounds,
                           args.threads, tuple(float(c) for c in args.capacities.split(",")),
                           args.warmup, kwargs, args.seed, device=args.device,
                           per_client_topk=args.per_client_topk)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    return result


if __name__ == "__main__":
    main()
