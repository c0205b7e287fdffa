"""PyTorch reference of one FIARSE round, run the way the authors' code runs it, or tuned.

The benchmark suite times this next to ``fiarse_jax`` to report speed ratios ours/reference.
Usage (one configuration per process, so ``peak_rss_mb`` is per configuration)::

    python benchmarks/torch_reference.py --model cnn --clients 10 --steps 20 --batch 20 \\
        --rounds 3 [--threads 2] [--json OUT] \\
        [--tuned [--no-compile] [--no-bf16] [--no-channels-last]]

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

Tuned (``--tuned``, ``variant: tuned``): the same round (masked forward, θ per level, SGD
lr 0.1, data iterator, holder average; clients still one after another, as PyTorch FL
frameworks run them) the way a performance-minded framework would:

* One local model for all clients: each loads the global weights (``load_state_dict``)
  instead of a ``deepcopy``, and its delta is taken against the global model itself (no copy
  of the old weights). One SGD (stateless without momentum), fused where available
  (``foreach`` otherwise). θ is a tensor buffer shared by the masked layers, set in place.
* ``torch.compile(model)`` (default mode), compiled once (θ a buffer, so a new θ is no
  recompile) by a forward+backward before the rounds (``compile_s``), and at least one
  warm-up round; if compiling fails the round runs eagerly (``compiled: false``,
  ``compile_error``). ``--no-compile``: eager.
* bf16 autocast around forward and loss; parameters, gradients, optimiser and deltas stay
  float32 (``--no-bf16``: float32 throughout).
* ``channels_last`` model and inputs (``--no-channels-last``); ``cudnn.benchmark`` on CUDA.

With compile and bf16 off it computes the authors'-style round's global model to float
rounding (tests/test_torch_reference.py).
"""
from __future__ import annotations

import argparse
import contextlib
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
        theta: torch.Tensor      # a non-persistent buffer (below): not in the state_dict

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b = None if self.bias is None else masked(self.bias, self.theta)
            return F.conv2d(x, masked(self.weight, self.theta), b, self.stride, self.padding,
                            self.dilation, self.groups)

    class MaskedLinear(nn.Linear):
        theta: torch.Tensor

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
        net, shape = CNN(**model_kwargs), DIGITS_SHAPE
    elif model == "resnet18":
        net, shape = ResNet18(**model_kwargs), CIFAR_SHAPE
    else:
        raise ValueError(f"unknown model {model!r} (cnn | resnet18)")
    # θ is a tensor buffer, so a compiled forward reads it as an input: a new value (per
    # client or level) is no recompile. Non-persistent: state_dict/load_state_dict skip it.
    for m in net.modules():
        if isinstance(m, (MaskedConv2d, MaskedLinear)):
            m.register_buffer("theta", torch.zeros(()), persistent=False)
    return net, shape


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


def _one_line(e: BaseException) -> str:
    """``Type: first line of the message`` of an exception, for a JSON field."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


def _fast_sgd(params) -> tuple[Any, str]:
    """``SGD(lr=0.1)`` with the fused kernel where this build has one for the device, else
    the ``foreach`` one (both without momentum or weight decay, as the authors'); its kind."""
    import torch
    params = list(params)
    try:
        return torch.optim.SGD(params, lr=0.1, fused=True), "fused"
    except (RuntimeError, ValueError):
        return torch.optim.SGD(params, lr=0.1, foreach=True), "foreach"


def run_reference(model: str = "cnn", clients: int = 10, steps: int = 20, batch: int = 20,
                  rounds: int = 3, threads: int | None = None,
                  capacities: Sequence[float] = (1.0, 0.25, 0.0625), warmup_rounds: int = 1,
                  model_kwargs: dict[str, Any] | None = None, seed: int = 0,
                  samples_per_client: int = 500, num_classes: int = 10,
                  device: str = "cpu", per_client_topk: bool = False, tuned: bool = False,
                  compile_model: bool = True, bf16: bool = True, channels_last: bool = True,
                  return_state: bool = False) -> dict[str, Any]:
    """Time ``rounds`` FIARSE rounds (after ``warmup_rounds`` untimed ones) in PyTorch.

    Returns framework/version/threads, ``num_params`` (all) and ``num_maskable``, ``round_s``
    (mean seconds per timed round), ``round_times_s``, ``client_steps_per_s``
    (clients·steps/round_s), ``peak_rss_mb`` (this process's peak RSS), ``last_loss`` (mean
    training loss of the last round, a sanity check), the configuration, and ``variant``
    (``authors`` | ``tuned``) with what the tuned round actually used: ``compiled``
    (``compile_error`` if compiling failed and it ran eagerly; ``compile_s``: the first
    compiled forward+backward, done before the rounds), ``bf16``, ``channels_last``, ``sgd``.
    ``per_client_topk``: recompute θ with ``torch.topk`` for every client, as the authors'
    server does, instead of once per round (same θ values; more work).
    ``tuned``: the same round the way a performance-minded framework runs it (module
    docstring); ``compile_model``, ``bf16`` and ``channels_last`` switch its parts (ignored
    without ``tuned``). When it compiles, at least one warm-up round runs.
    ``return_state``: add ``state``, the global ``state_dict`` after the last round (cloned,
    contiguous; not JSON) — the tests compare the two variants with it.
    """
    import torch
    import torch.nn.functional as F

    if threads is not None:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    dev = torch.device(device)
    bf16, channels_last = tuned and bf16, tuned and channels_last
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    net, shape = _build(model, num_classes, dict(model_kwargs or {}))
    net = net.to(dev, memory_format=fmt).train()
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
        return xs[c, idx].contiguous(memory_format=fmt), ys[c, idx]

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def loss_of(forward, x, y):
        """Cross-entropy of the forward, in bf16 autocast when asked (weights stay float32)."""
        with torch.autocast(dev.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
            return F.cross_entropy(forward(x), y)

    compiled, compile_error, compile_s, sgd = False, None, None, "default"
    if tuned:
        if dev.type == "cuda":
            torch.backends.cudnn.benchmark = True
        local = copy.deepcopy(net)          # the one local model: each client loads into it
        theta = torch.zeros((), device=dev)
        for m in _maskable(local):
            m.theta = theta                 # one buffer for all layers, set per client
        opt, sgd = _fast_sgd(local.parameters())   # stateless (no momentum): one for all
        forward = local
        if compile_model:
            t0 = time.perf_counter()
            try:   # compiles at the first call: run a forward and backward (no update) now
                candidate = torch.compile(local)   # same shapes and strides as the steps
                x0 = xs[0, :batch].contiguous(memory_format=fmt)
                loss_of(candidate, x0, ys[0, :batch]).backward()
                sync()
                forward, compiled, compile_s = candidate, True, time.perf_counter() - t0
            except Exception as e:   # no compiler, unsupported platform, ...: eager, recorded
                compile_error = _one_line(e)
            opt.zero_grad()
            if compiled:
                warmup_rounds = max(warmup_rounds, 1)

    def start_client(level_theta):
        """(module, its forward, optimizer, weights before training) of one client."""
        if tuned:
            local.load_state_dict(net.state_dict())
            theta.copy_(level_theta)
            return local, forward, opt, net.state_dict()   # the global stays put until the end
        fresh = copy.deepcopy(net)
        for m in _maskable(fresh):
            m.theta = level_theta
        return (fresh, fresh, torch.optim.SGD(fresh.parameters(), lr=0.1),
                copy.deepcopy(fresh.state_dict()))

    def one_round() -> float:
        thetas = {} if per_client_topk else _thresholds(net, capacities)
        tot = {k: torch.zeros_like(v) for k, v in net.state_dict().items()}
        cnt = {k: torch.zeros_like(v) for k, v in net.state_dict().items()}
        losses = []
        for c in range(clients):
            level = capacities[c % len(capacities)]
            module, fwd, opt_c, old = start_client(
                _thresholds(net, (level,), per_level_topk=True)[level] if per_client_topk
                else thetas[level])
            for _ in range(steps):
                x, y = next_batch(c)
                opt_c.zero_grad()
                loss = loss_of(fwd, x, y)
                loss.backward()
                opt_c.step()
                losses.append(loss.detach())
            for k, new in module.state_dict().items():
                delta = old[k] - new
                tot[k] += delta
                cnt[k] += delta != 0
            del module, fwd, opt_c, old
        with torch.no_grad():
            state = net.state_dict()
            for k in state:
                state[k] -= torch.nan_to_num(tot[k] / cnt[k], nan=0.0, posinf=0.0, neginf=0.0)
        return float(torch.stack(losses).float().mean())

    times, loss = [], float("nan")
    for r in range(warmup_rounds + rounds):
        sync()
        t0 = time.perf_counter()
        loss = one_round()
        sync()
        if r >= warmup_rounds:
            times.append(time.perf_counter() - t0)
    round_s = sum(times) / len(times) if times else float("nan")
    result = {
        "framework": "torch", "torch": torch.__version__, "threads": torch.get_num_threads(),
        "device": str(dev), "model": model, "model_kwargs": dict(model_kwargs or {}),
        "variant": "tuned" if tuned else "authors", "compiled": compiled,
        "compile_error": compile_error, "compile_s": compile_s, "bf16": bf16,
        "channels_last": channels_last, "sgd": sgd,
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
    if return_state:
        result["state"] = {k: v.detach().contiguous().clone() for k, v in net.state_dict().items()}
    return result


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
    ap.add_argument("--tuned", action="store_true",
                    help="the tuned round: one reused local model, torch.compile, bf16 autocast, "
                         "channels_last, fused SGD")
    ap.add_argument("--no-compile", action="store_true", help="with --tuned: eager")
    ap.add_argument("--no-bf16", action="store_true", help="with --tuned: float32 forward")
    ap.add_argument("--no-channels-last", action="store_true",
                    help="with --tuned: contiguous (NCHW) memory format")
    ap.add_argument("--json", default=None, help="also write the result to this file")
    args = ap.parse_args(argv)
    kwargs = {k: v for k, v in (("features", args.features), ("hidden_sizes", args.hidden),
                                ("widths", args.widths)) if v is not None}
    result = run_reference(args.model, args.clients, args.steps, args.batch, args.rounds,
                           args.threads, tuple(float(c) for c in args.capacities.split(",")),
                           args.warmup, kwargs, args.seed, device=args.device,
                           per_client_topk=args.per_client_topk, tuned=args.tuned,
                           compile_model=not args.no_compile, bf16=not args.no_bf16,
                           channels_last=not args.no_channels_last)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    return result


if __name__ == "__main__":
    main()
