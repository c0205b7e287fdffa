"""One convolution's forward and backward pass per XLA:CPU option set, beside PyTorch's.

Usage:
  python benchmarks/conv_options.py [--repeats 8] [--out benchmarks/results/conv_options_cpu.json]

At each CIFAR ResNet-18 stage's shape (batch 20; 32×32×64, 16×16×128, 8×8×256, 4×4×512,
3×3 kernels, NHWC), the gradient of ``sum(tanh(conv(x, w)))`` with respect to both inputs,
compiled with each option set below and timed after a warm-up call; the four shapes'
milliseconds are summed. PyTorch (its oneDNN convolutions, NCHW, all cores) runs the same
computation where it is installed. This is how ``federated.xla.compiler_options``' CPU
choice was checked against the other XLA:CPU options this jaxlib has
(docs/benchmarks.md, "What was tried against PyTorch's lead").
"""
from __future__ import annotations

import argparse
import json
import os
import time

SHAPES = [(32, 64, 64), (16, 128, 128), (8, 256, 256), (4, 512, 512)]   # (H=W, C_in, C_out)


def option_sets() -> dict[str, dict]:
    """Name -> XLA compiler options: XLA's defaults, ours, and ours plus each candidate."""
    from fiarse_jax.federated import xla
    ours = xla.compiler_options("auto")
    return {"XLA defaults": {}, "ours (engine.xla=auto)": ours,
            "ours + xla_cpu_use_onednn": {**ours, "xla_cpu_use_onednn": True},
            "ours + xla_cpu_use_xnnpack": {**ours, "xla_cpu_use_xnnpack": True},
            "ours + xla_cpu_enable_fast_math": {**ours, "xla_cpu_enable_fast_math": True}}


def _ms(fn, repeats: int) -> float:
    fn()
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t) / repeats * 1000


def time_jax(options: dict, repeats: int) -> float:
    """Summed milliseconds over ``SHAPES`` of the compiled gradient with ``options``."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    rng, total = np.random.default_rng(0), 0.0
    for hw, cin, cout in SHAPES:
        x = jnp.asarray(rng.random((20, hw, hw, cin)), jnp.float32)
        w = jnp.asarray(rng.random((3, 3, cin, cout)) * 0.01, jnp.float32)

        def f(x, w):
            y = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                             dimension_numbers=("NHWC", "HWIO", "NHWC"))
            return jnp.sum(jnp.tanh(y))

        step = jax.jit(jax.grad(f, argnums=(0, 1)),
                       compiler_options=options or None).lower(x, w).compile()
        total += _ms(lambda step=step, x=x, w=w: jax.block_until_ready(step(x, w)), repeats)
    return total


def time_torch(repeats: int) -> float | None:
    """The same in PyTorch (None where it is not installed)."""
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    total = 0.0
    for hw, cin, cout in SHAPES:
        x = torch.rand(20, cin, hw, hw, requires_grad=True)
        w = (torch.rand(cout, cin, 3, 3) * 0.01).requires_grad_()

        def step(x=x, w=w):
            x.grad = w.grad = None
            torch.tanh(torch.nn.functional.conv2d(x, w, padding=1)).sum().backward()

        total += _ms(step, repeats)
    return total


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=8)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                  "results", "conv_options_cpu.json"))
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error(f"--repeats {args.repeats}: expected at least 1")
    import jax
    result = {"backend": jax.default_backend(), "jax": jax.__version__, "shapes": SHAPES,
              "ms": {}}
    for name, options in option_sets().items():
        result["ms"][name] = time_jax(options, args.repeats)
        print(f"{name:34s} {result['ms'][name]:8.1f} ms", flush=True)
    torch_ms = time_torch(args.repeats)
    if torch_ms is not None:
        result["ms"]["PyTorch"] = torch_ms
        print(f"{'PyTorch':34s} {torch_ms:8.1f} ms")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
