"""The benchmark suite: round throughput and peak memory per execution strategy, the
PyTorch reference side by side, scaling curves, and the cost of mask extraction.

Usage:
  python benchmarks/suite.py [--quick] [--sections strategies,resnet,size,masks,text,memory]
      [--cnn-clients 10,100,1000] [--resnet-steps 100] [--rounds 2] [--no-torch]
      [--no-torch-tuned]
      [--reduce stream|stack|stream,stack] [--memory-chunks 1,5]
      [--out benchmarks/results/suite_<backend>.json]

Every measurement runs in its own subprocess (so peak memory is its own, and the sharded
strategy can force host devices on CPU), all pinned to the same CPU cores; PyTorch gets
``torch.set_num_threads(len(cores))``. A round is what the server does per round in both
frameworks: thresholds of every level from |w|, the clients' K local steps (masked
gradient, as the authors' released runs), and the holder-average step, its inputs summed
while the clients train (``--reduce stream``, what training does by default) or stacked
first. Times are per round after one warm-up (compile) round. Sections:

* ``strategies``: the CNN on digits-shaped data at each ``--cnn-clients`` count per round,
  for loop / vmap / vmap chunked / sharded, and the PyTorch reference (benchmarks/
  torch_reference.py, clients one after another, the mask recomputed in every forward)
  twice: as the authors' code runs it (``vs torch``) and tuned (one reused local model,
  ``torch.compile``, bf16 autocast, channels_last; ``vs tuned``, ``--no-torch-tuned`` skips it).
* ``resnet``: CIFAR ResNet-18 (11.2 M params) on CIFAR-shaped synthetic data, 10 clients.
* ``size``: time per round vs CNN width at 10 clients (best strategy and PyTorch).
* ``text``: the RoBERTa classifier (``small`` on CPU, ``roberta_base`` on an accelerator)
  on random token ids, AdamW clients, per strategy: client steps/s, tokens/s, peak memory
  with one client at a time (``vmap:1``) and with a chunk of clients.
* ``memory``: XLA's buffer assignment (``compiled.memory_analysis()``) of one whole vmap
  round, compiled for this backend but never run, for ``roberta_base`` at
  ``--text-clients`` and the CNN at 1,000 clients, per ``--memory-chunks`` chunk size
  and with the server's inputs stacked or streamed: the per-round peak, and from two
  chunk sizes what each client in a chunk adds (per-client training memory).
* ``masks``: thresholds of all levels (``policy.prepare``: one k-th-largest pass) for ResNet-18
  and a 100 M-parameter synthetic pytree, beside the ResNet round.

Also: XLA's FLOP count of a client step (always compiled for the CPU: XLA's GPU cost
analysis leaves cuDNN convolutions out), the achieved FLOP/s and, on a GPU whose peak is
known (``PEAK_FLOPS``), the model FLOPs utilisation. Prints tables, writes JSON and a PNG
of the scaling curves beside it. ``--quick`` shrinks everything to seconds (the tests run it).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
CAPACITIES = (1.0, 0.25, 0.0625)
#: Dense peak FLOP/s per chip by compute dtype (vendor datasheets; f32 = TF32 tensor cores).
PEAK_FLOPS = {"H100": {"bfloat16": 989e12, "float32": 495e12},
              "H200": {"bfloat16": 989e12, "float32": 495e12},
              "A100": {"bfloat16": 312e12, "float32": 156e12}}


# ---------------------------------------------------------------- one measurement (child)

def _peak_memory_mb() -> tuple[float, str]:
    import jax
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return stats["peak_bytes_in_use"] / 2**20, "device"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "host RSS"


def _data(model: str, clients: int, samples: int, kw: dict | None = None):
    """Random per-client data of digits (8×8×1 float), CIFAR (32×32×3 uint8) or token-id
    (``[max_length]`` int32, no padding: every token is real) shape."""
    import numpy as np

    from fiarse_jax.data import stack_clients
    rng = np.random.default_rng(0)
    n = clients * samples
    if model == "resnet18":
        x = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    elif model == "roberta":
        kw = kw or {}
        x = rng.integers(5, kw.get("vocab_size", 1000), (n, kw.get("max_length", 128)),
                         dtype=np.int32)
        x[:, 0] = 0   # <s>
    else:
        x = rng.normal(size=(n, 8, 8, 1)).astype(np.float32)
    y = rng.integers(0, 10, n).astype(np.int32)
    return stack_clients(x, y, np.split(np.arange(n), clients))


def _setup(spec: dict, clients: int, steps: int):
    """(params, policy, client fns, data) of one benchmark configuration: FIARSE with the
    masked gradient (the authors' released runs) on the model's own maskable leaves;
    SGD lr 0.1, or AdamW lr 1e-4 for the text model (the paper's optimisers)."""
    import jax
    import optax

    from fiarse_jax import models, policies
    from fiarse_jax.build import COMPUTE_DTYPES, make_model_fns
    from fiarse_jax.client import make_client_fns
    from fiarse_jax.data import augment

    name, kw = spec["model"], dict(spec.get("model_kwargs", {}))
    model = models.build_model(name, 10, kw)
    data = _data(name, clients, spec.get("samples", 100), kw)
    cifar = name == "resnet18"
    x_one = augment.cifar_eval_transform()(data.x[0, :1]) if cifar else data.x[0, :1]
    params = jax.jit(model.init)(jax.random.PRNGKey(0), x_one)["params"]
    policy = policies.build_policy("fiarse", CAPACITIES, {"gradient": "masked"},
                                   is_maskable=getattr(model, "is_maskable", None))
    _, loss_fn = make_model_fns(model, policy)
    opt = optax.adamw(1e-4, b1=0.9, b2=0.95, weight_decay=0.0) if name == "roberta" else \
        optax.sgd(0.1)
    fns = make_client_fns(loss_fn, policy, opt, num_steps=steps, batch_size=spec["batch"],
                          augment=augment.cifar_train_transform() if cifar else None,
                          compute_dtype=COMPUTE_DTYPES[spec.get("dtype", "float32")])
    return params, policy, fns, data


def _round_fn(spec: dict, policy, fns, clients: int):
    """``one_round(params, r) -> params``: thresholds, the clients, the server step, with the
    server's inputs stacked or streamed (``spec['reduce']``) as training does."""
    import jax
    import jax.numpy as jnp

    from fiarse_jax import engine
    from fiarse_jax.server_round import make_server_round, make_streaming_round

    strategy, streamed = spec["strategy"], spec.get("reduce", "stream") == "stream"
    stream = make_streaming_round()
    levels = jnp.arange(clients) % len(CAPACITIES)
    if spec.get("program") and streamed:   # the whole round as one program, as training runs it
        clients_in = engine.program_runner(fns, strategy, clients_per_chunk=spec.get("chunk", 0),
                                           reduce=stream.contribution)

        def whole(params, r, data):
            key = jax.random.PRNGKey(r)
            keys = jax.random.split(key, clients)
            specs = jax.vmap(policy.client_spec, in_axes=(None, 0, 0))(
                policy.prepare(params, r, key), levels, keys)
            return stream.finish(params, clients_in(params, specs, data, keys)[0], key, 0.0)

        return engine.jit(whole, engine.compiler_options(spec.get("xla", "auto")),
                          donate_argnums=0)
    run = engine.make_round_runner(fns, strategy, clients_per_chunk=spec.get("chunk", 0),
                                   reduce=stream.contribution if streamed else None,
                                   xla=spec.get("xla", "auto"))
    prepare = jax.jit(policy.prepare)
    specs_fn = jax.jit(jax.vmap(policy.client_spec, in_axes=(None, 0, 0)))
    server_step = make_server_round()   # what training runs: screen, holder average, update

    def one_round(params, r, data):
        key = jax.random.PRNGKey(r)
        keys = jax.random.split(key, clients)
        res = run(params, specs_fn(prepare(params, r, key), levels, keys), data, keys)
        if streamed:
            return stream.finish(params, res[0], key, 0.0)
        return server_step(params, res.delta, res.mask, levels, key, 0.0)[0]

    return one_round


def measure_round(spec: dict) -> dict:
    """Time ``spec['rounds']`` FIARSE rounds of ``spec['strategy']`` after a warm-up one."""
    import functools

    import jax

    from fiarse_jax import engine

    clients, steps, strategy = spec["clients"], spec["steps"], spec["strategy"]
    params, policy, fns, data = _setup(spec, clients, steps)
    one_round = functools.partial(_round_fn(spec, policy, fns, clients), data=data)
    if strategy == "sharded":
        params = engine.replicate(params)

    t0 = time.perf_counter()
    params = jax.block_until_ready(one_round(params, 0))
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    for r in range(1, spec["rounds"] + 1):
        params = one_round(params, r)
    jax.block_until_ready(params)
    round_s = (time.perf_counter() - t0) / spec["rounds"]

    mem, mem_kind = _peak_memory_mb()
    return {"framework": "jax", "strategy": strategy, "chunk": spec.get("chunk", 0),
            "reduce": spec.get("reduce", "stream"),
            "devices": jax.device_count(), "device_kind": jax.devices()[0].device_kind,
            "num_params": int(sum(l.size for l in jax.tree_util.tree_leaves(params))),
            "first_round_s": first, "round_s": round_s,
            "client_steps_per_s": clients * steps / round_s,
            "peak_mem_mb": mem, "mem_kind": mem_kind}


def measure_compiled(spec: dict) -> dict:
    """XLA's buffer assignment for one whole ``vmap`` round (thresholds, clients, server
    step) compiled for this backend and never run: the peak bytes a round needs, however
    large the model, on a machine that could not run it in the time available."""
    import jax

    from fiarse_jax import engine

    clients = spec["clients"]
    params, policy, fns, data = _setup(spec, clients, spec["steps"])
    compiled = jax.jit(_round_fn(spec, policy, fns, clients), donate_argnums=0).lower(
        params, 0, data).compile()
    m = compiled.memory_analysis()
    mb = {k: getattr(m, f"{k}_size_in_bytes") / 2**20 for k in ("argument", "output", "temp",
                                                                  "alias")}
    leaves = jax.tree_util.tree_leaves
    return {"framework": "jax", "strategy": spec["strategy"], "chunk": spec.get("chunk", 0),
            "reduce": spec.get("reduce", "stream"), "device_kind": jax.devices()[0].device_kind,
            "num_params": int(sum(l.size for l in leaves(params))),
            "inputs_mb": sum(l.nbytes for l in leaves((params, data))) / 2**20,
            **{f"{k}_mb": v for k, v in mb.items()},
            "compiled_peak_mb": engine.peak_bytes(compiled) / 2**20}


def measure_step_flops(spec: dict) -> dict:
    """XLA's FLOP count of one client step (forward, backward, optimiser update) at ``spec``'s
    model and batch, compiled for the CPU (the parent runs this with JAX_PLATFORMS=cpu:
    XLA's GPU cost analysis leaves out cuDNN convolutions, so a GPU count is far too low)."""
    import jax
    import jax.numpy as jnp

    params, policy, fns, data = _setup(spec, 1, 1)
    data0 = jax.tree_util.tree_map(lambda a: a[0], data)
    key = jax.random.PRNGKey(0)
    spec0 = policy.client_spec(policy.prepare(params, 0, key), 0, key)
    state = jax.jit(fns.init)(params, spec0, data0, key)
    cost = jax.jit(fns.step).lower(state, spec0, data0, jnp.asarray(0)).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return {"step_gflops": float(cost.get("flops", float("nan"))) / 1e9}


def measure_prepare(spec: dict) -> dict:
    """Seconds for the thresholds of every level: ResNet-18 params or an N-param pytree."""
    import jax
    import jax.numpy as jnp

    from fiarse_jax import models, policies
    if spec["tree"] == "resnet18":
        params = models.build_model("resnet18", 10, {}).init(
            jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))["params"]
    else:   # N parameters as 4 dense kernels
        side = int(math.sqrt(spec["params"] / 4))
        keys = jax.random.split(jax.random.PRNGKey(0), 4)
        params = {f"Dense_{i}": {"kernel": jax.random.normal(k, (side, side))}
                  for i, k in enumerate(keys)}
    prepare = jax.jit(policies.build_policy("fiarse", CAPACITIES, {}).prepare)
    jax.block_until_ready(prepare(params, 0, jax.random.PRNGKey(0)))
    times = []
    for r in range(1, spec.get("repeats", 3) + 1):
        t0 = time.perf_counter()
        jax.block_until_ready(prepare(params, r, jax.random.PRNGKey(r)))
        times.append(time.perf_counter() - t0)
    return {"num_params": int(sum(l.size for l in jax.tree_util.tree_leaves(params))),
            "prepare_s": min(times)}


# ---------------------------------------------------------------- orchestration (parent)

def _child(spec: dict, cores: list[int]) -> dict:
    """Run one measurement in a fresh process (on this process's ``cores``); its JSON result."""
    env = dict(os.environ)
    if spec["kind"] == "flops":
        env["JAX_PLATFORMS"] = "cpu"
    if spec.get("strategy") == "sharded" and spec.get("host_devices"):
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                            f" --xla_force_host_platform_device_count={spec['host_devices']}")
    if spec["kind"] == "torch":
        cmd = [sys.executable, os.path.join(HERE, "torch_reference.py"), "--model", spec["model"],
               "--clients", str(spec["clients"]), "--steps", str(spec["steps"]),
               "--batch", str(spec["batch"]), "--rounds", str(spec["rounds"]),
               "--threads", str(len(cores)), "--device", spec.get("torch_device", "cpu"),
               # The authors'-style round compiles nothing: a warm-up round (CUDA/cuDNN
               # start-up on a GPU) only matters for short rounds. The tuned one runs at
               # least one whenever it compiles (torch_reference.run_reference).
               "--warmup", "1" if spec["clients"] * spec["steps"] <= 2000 else "0"]
        if spec.get("variant") == "tuned":
            cmd.append("--tuned")
        kw = spec.get("model_kwargs", {})
        for flag, key in (("--features", "features"), ("--hidden", "hidden_sizes"),
                          ("--widths", "widths")):
            if key in kw:
                cmd += [flag, ",".join(str(v) for v in kw[key])]
    else:
        cmd = [sys.executable, __file__, "--measure", json.dumps(spec)]
    t0 = time.time()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)   # inherits the cores
    if r.returncode != 0:
        return {"error": r.stderr.strip().splitlines()[-1] if r.stderr.strip() else "failed"}
    out = json.loads(r.stdout[r.stdout.index("{"):])
    if spec["kind"] == "torch":
        device_mb = out.get("peak_device_mb")
        out = {k: out.get(k) for k in ("framework", "num_params", "round_s", "client_steps_per_s",
                                       "peak_rss_mb", "threads", "device", "variant", "compiled",
                                       "compile_error", "compile_s", "bf16", "channels_last")}
        rss = out.pop("peak_rss_mb")
        out.update(strategy="torch", peak_mem_mb=device_mb if device_mb is not None else rss,
                   mem_kind="device" if device_mb is not None else "host RSS")
    out["process_s"] = time.time() - t0
    return out


def _torch_available() -> bool:
    sys.path.insert(0, HERE)
    from torch_reference import available
    return available()


def _table(title: str, rows: list[dict], cols: list[tuple[str, str, str]]) -> None:
    print(f"\n{title}")
    widths = [max(len(h), 9) for _, h, _ in cols]
    print("  ".join(f"{h:>{w}}" for (_, h, _), w in zip(cols, widths)))
    for r in rows:
        cells = []
        for (k, _, f), w in zip(cols, widths):
            v = r.get(k)
            cells.append(f"{'-' if v is None else format(v, f):>{w}}")
        print("  ".join(cells))


def with_flops(row: dict, step_gflops: float | None) -> None:
    """Add the step's FLOPs, the achieved FLOP/s and (for a known GPU) the MFU to a row."""
    if step_gflops is None or "round_s" not in row:
        return
    achieved = step_gflops * 1e9 * row["steps"] * row["clients"] / row["round_s"]
    kind = row.get("device_kind", "")
    peak = next((p[row.get("dtype", "float32")] for k, p in PEAK_FLOPS.items() if k in kind),
                None)
    row.update(step_gflops=step_gflops, achieved_tflops=achieved / 1e12,
               mfu=achieved / peak if peak else None)


def _with_flops(rows: list[dict], count: dict) -> None:
    for r in rows:
        if r.get("framework") == "jax":
            with_flops(r, count.get("step_gflops"))


def _with_per_client(rows: list[dict]) -> None:
    """``per_client_mb``: what one more client in a chunk adds to the compiled peak, from
    the smallest and largest chunk of the same model and server inputs."""
    for r in rows:
        same = sorted((o for o in rows if o["model"] == r["model"] and o["reduce"] ==
                       r["reduce"] and "compiled_peak_mb" in o), key=lambda o: o["chunk"])
        if len(same) > 1 and r is same[-1] and same[-1]["chunk"] > same[0]["chunk"]:
            r["per_client_mb"] = ((same[-1]["compiled_peak_mb"] - same[0]["compiled_peak_mb"])
                                  / (same[-1]["chunk"] - same[0]["chunk"]))


def _with_ratio(rows: list[dict]) -> None:
    """Each row's round time over the PyTorch references' in the same group: ``vs_torch``
    over the authors'-style round's (a torch row without a variant is that one),
    ``vs_torch_tuned`` over the tuned round's; None where that reference did not run."""
    for key, variant in (("vs_torch", "authors"), ("vs_torch_tuned", "tuned")):
        ref = next((r["round_s"] for r in rows if r.get("strategy") == "torch" and
                    r.get("variant", "authors") == variant and "round_s" in r), None)
        for r in rows:
            r[key] = r["round_s"] / ref if ref and "round_s" in r else None


def plot(result: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    timed = [r for sec in ("strategies", "resnet", "size") for r in result.get(sec, [])]
    several = len({r.get("reduce") for r in timed if r.get("framework") == "jax"}) > 1

    def label(r):
        return (r["strategy"] + (f" (chunk {r['chunk']})" if r.get("chunk") else "")
                + (f", {r['reduce']}" if several and r.get("reduce") else "")
                + (f" ({r['variant']})" if r.get("variant") else ""))

    if not timed and result.get("memory"):
        _plot_memory(result["memory"], axes)
    by = {}
    for r in result.get("strategies", []):
        if "round_s" in r:
            by.setdefault(label(r), []).append((r["clients"], r["round_s"]))
    for label, pts in sorted(by.items()):
        pts.sort()
        axes[0].plot(*zip(*pts), marker="o", label=label)
    if by:
        axes[0].set(xscale="log", yscale="log", xlabel="clients per round",
                    ylabel="s per round", title="CNN on digits-shaped data")
    by = {}
    for r in result.get("size", []):
        if "round_s" in r:
            by.setdefault(label(r), []).append((r["num_params"], r["round_s"]))
    for label, pts in sorted(by.items()):
        pts.sort()
        axes[1].plot(*zip(*pts), marker="o", label=label)
    resnet = [r for r in result.get("resnet", []) if "round_s" in r]
    if not by and resnet:   # no width section: the ResNet-18 round per strategy instead
        axes[1].bar([label(r) for r in resnet], [r["round_s"] for r in resnet])
        axes[1].tick_params(axis="x", labelsize=8, labelrotation=20)   # long variant labels
        axes[1].set(ylabel="s per round", title=f"ResNet-18, {resnet[0]['clients']} "
                    f"clients × K = {resnet[0]['steps']}")
    elif by:
        axes[1].set(xscale="log", yscale="log", xlabel="parameters", ylabel="s per round",
                    title="CNN width, 10 clients per round")
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    rows = timed + result.get("memory", [])
    device = next((r["device_kind"] for r in rows if r.get("device_kind")),
                  result["environment"]["devices"][0])
    fig.suptitle(f"{result['environment']['backend']}: {device}"
                 f" ({result['environment']['cpu_count']} CPUs)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_memory(rows: list[dict], axes) -> None:
    """The memory section: compiled peak per chunk size, stacked vs streamed, one panel per
    model."""
    import numpy as np
    for ax, model in zip(axes, ("roberta", "cnn")):
        mine = [r for r in rows if r["model"] == model and "compiled_peak_mb" in r]
        if not mine:
            ax.set_axis_off()
            continue
        chunks = sorted({r["chunk"] for r in mine})
        for j, reduce in enumerate(("stack", "stream")):
            peak = {r["chunk"]: r["compiled_peak_mb"] / 1024 for r in mine
                    if r["reduce"] == reduce}
            ax.bar(np.arange(len(chunks)) + 0.4 * j - 0.2, [peak.get(c, 0) for c in chunks],
                   width=0.4, label=f"server inputs {reduce}ed")
        ax.set_xticks(range(len(chunks)), [f"{c} at once" for c in chunks])
        ax.set(ylabel="GB (XLA's compiled peak)", title=f"{model}, {mine[0]['num_params']:,} "
               f"params, {mine[0]['clients']} clients per round")
        ax.legend(fontsize=8)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--measure", help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run in seconds")
    ap.add_argument("--sections", default="strategies,resnet,size,masks,text,memory")
    ap.add_argument("--cnn-clients", default="10,100,1000")
    ap.add_argument("--steps", type=int, default=20, help="local steps K for the CNN")
    ap.add_argument("--resnet-steps", type=int, default=100, help="local steps K for ResNet-18")
    ap.add_argument("--rounds", type=int, default=2, help="timed rounds after the warm-up")
    ap.add_argument("--text-size", default=None,
                    help="RoBERTa preset of the text section (default: small on CPU, "
                         "roberta_base on an accelerator)")
    ap.add_argument("--text-clients", type=int, default=20)
    ap.add_argument("--text-steps", type=int, default=5, help="local AdamW steps K (text)")
    ap.add_argument("--text-length", type=int, default=128, help="tokens per sequence")
    ap.add_argument("--text-strategies", default=None,
                    help="default: loop,vmap:1,vmap:5 on an accelerator, loop,vmap:5 on CPU")
    ap.add_argument("--strategies", default="loop,vmap,vmap:100,sharded",
                    help="CNN strategies; vmap:C = vmap in chunks of C clients")
    ap.add_argument("--cores", default=None,
                    help="CPU cores for every measurement, e.g. 0,1 (default: all)")
    ap.add_argument("--host-devices", type=int, default=8,
                    help="CPU only: devices forced for the sharded strategy")
    ap.add_argument("--reduce", default="stream",
                    help="server inputs of the timed rounds: stream, stack or stream,stack")
    ap.add_argument("--memory-chunks", default="1,5",
                    help="memory section: clients per chunk of the compiled vmap rounds")
    ap.add_argument("--memory-models", default="roberta,cnn",
                    help="memory section: roberta (roberta_base at --text-clients), "
                         "cnn (1,000 clients)")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--resnet-variants", default=None,
                    help="resnet section: rows beside loop/vmap, comma-separated from "
                         "defaults (loop on XLA's and JAX's own defaults), program (the "
                         "backend's strategy with the whole round one program, as training "
                         "runs it), patches (vmap with model.conv=patches), bf16 (vmap, bf16 "
                         "compute); '' for none (default: defaults,program on CPU, "
                         "program,patches,bf16 elsewhere)")
    ap.add_argument("--no-torch", action="store_true",
                    help="skip the PyTorch references (authors' and tuned)")
    ap.add_argument("--no-torch-tuned", action="store_true",
                    help="skip only the tuned PyTorch reference")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.measure:
        spec = json.loads(args.measure)
        measure = {"prepare": measure_prepare, "flops": measure_step_flops,
                   "compiled": measure_compiled}.get(
            spec["kind"], measure_round)
        print(json.dumps(measure(spec)))
        return {}

    if args.cores:   # before jax starts its threads; the children inherit the affinity
        os.sched_setaffinity(0, {int(c) for c in args.cores.split(",")})
    cores = sorted(os.sched_getaffinity(0))
    sys.path.insert(0, HERE)
    import jax
    from common import environment
    backend = jax.default_backend()
    sections = set(args.sections.split(","))
    torch_ok = not args.no_torch and _torch_available()
    torch_variants = ["authors"] + ([] if args.no_torch_tuned else ["tuned"])
    strategies = [(s.split(":")[0], int(s.split(":")[1]) if ":" in s else 0)
                  for s in args.strategies.split(",")]
    cnn_clients = [int(c) for c in args.cnn_clients.split(",")]
    steps, resnet_steps, rounds, samples = args.steps, args.resnet_steps, args.rounds, 100
    widths = [((8, 16), (32,)), ((16, 32), (64,)), ((32, 64), (128,)), ((64, 128), (256,))]
    resnet_kw: dict = {}
    if args.quick:
        cnn_clients, steps, resnet_steps, rounds, samples = [4], 2, 1, 1, 20
        strategies = [(s, c if c == 0 else 2) for s, c in strategies]
        widths = widths[:2]
        resnet_kw = {"widths": [4, 8, 8, 8]}
    reduces = args.reduce.split(",")
    if not set(reduces) <= {"stream", "stack"}:
        ap.error(f"--reduce {args.reduce!r}: expected stream, stack or both, comma-separated")
    host_devices = args.host_devices if backend == "cpu" else 0
    common = {"batch": 20, "rounds": rounds, "samples": samples, "dtype": args.dtype,
              "host_devices": host_devices,
              # The PyTorch reference runs on the same kind of device as JAX.
              "torch_device": "cuda" if backend == "gpu" else "cpu"}
    result: dict = {"environment": {**environment(), "cores": cores,
                                    "torch": torch_ok, "quick": args.quick,
                                    "torch_variants": torch_variants if torch_ok else []},
                    "settings": {"capacities": CAPACITIES, "cnn_steps": steps,
                                 "resnet_steps": resnet_steps, "batch": 20, "rounds": rounds,
                                 "samples_per_client": samples, "dtype": args.dtype,
                                 "gradient": "masked"}}
    cols = [("clients", "clients", "d"), ("strategy", "strategy", ""), ("variant", "variant", ""),
            ("chunk", "chunk", "d"),
            ("reduce", "server in", ""),
            ("round_s", "s/round", ".4f"), ("client_steps_per_s", "steps/s", ".1f"),
            ("vs_torch", "vs torch", ".3f"), ("vs_torch_tuned", "vs tuned", ".3f"),
            ("peak_mem_mb", "peak MB", ".0f"),
            ("achieved_tflops", "TFLOP/s", ".4f"), ("mfu", "MFU", ".3f")]

    out = args.out or os.path.join(HERE, "results", f"suite_{backend}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)

    def save():
        """Write the JSON and PNG so far (after every section: a cut-off run keeps its part)."""
        from fiarse_jax.metrics import write_atomic
        write_atomic(out, json.dumps(result, indent=2))
        plot(result, os.path.splitext(out)[0] + ".png")

    def group(model, clients, k, kw, strats, torch_too, xla="auto", dtype=None, program=False):
        rows = []
        for strategy, chunk in strats:
            if chunk and chunk >= clients:
                continue
            for reduce in reduces:
                spec = {"kind": "jax", "model": model, "clients": clients, "steps": k,
                        "model_kwargs": kw, "strategy": strategy, "chunk": chunk,
                        "reduce": reduce, "xla": xla, **common,
                        **({"dtype": dtype} if dtype else {}),
                        **({"program": True} if program else {})}
                rows.append({"clients": clients, "model_kwargs": kw, **spec,
                             **_child(spec, cores)})
        for variant in torch_variants if torch_too else []:
            spec = {"kind": "torch", "model": model, "clients": clients, "steps": k,
                    "model_kwargs": kw, "variant": variant, **common}
            rows.append({"clients": clients, **spec, **_child(spec, cores)})
            if rows[-1].get("compile_error"):   # still timed, eagerly: say so beside the table
                print(f"tuned PyTorch round ran eagerly: {rows[-1]['compile_error']}")
        _with_flops(rows, _child({"kind": "flops", "model": model, "steps": k,
                                  "model_kwargs": kw, **common}, cores))
        _with_ratio(rows)
        return rows

    if "strategies" in sections:
        result["strategies"] = [r for c in cnn_clients
                                for r in group("cnn", c, steps, {}, strategies, torch_ok)]
        _table(f"CNN (16,32 conv, 64 dense) on 8×8×1 data, K = {steps}, batch 20",
               result["strategies"], cols)
        save()
    if "resnet" in sections:
        strats = [("loop", 0), ("vmap", 0)] + (
            [("sharded", 0)] if backend != "cpu" and jax.device_count() > 1 else [])
        n_resnet = 2 if args.quick else 10
        result["resnet"] = group("resnet18", n_resnet, resnet_steps, resnet_kw, strats, torch_ok)
        # Beside it, the variants (--resnet-variants): on CPU (where the per-backend
        # choices differ from the defaults) the loop as it ran before them, XLA's default
        # options and JAX's own conv gradient; on an accelerator the candidates for vmap,
        # the patches convolution (batched matrix products) and bf16 compute.
        auto = "loop" if backend == "cpu" else "vmap"
        variants = {"defaults": ({"conv": "xla"}, "loop", "default", None),
                    "program": ({}, auto, "auto", None),
                    "patches": ({"conv": "patches"}, "vmap", "auto", None),
                    "bf16": ({}, "vmap", "auto", "bfloat16")}
        names = (args.resnet_variants if args.resnet_variants is not None else
                 "defaults,program" if backend == "cpu" else "program,patches,bf16")
        for name in filter(None, names.split(",")):
            if name not in variants:
                ap.error(f"--resnet-variants: unknown {name!r}; expected some of {sorted(variants)}")
            kw, strategy, xla, dtype = variants[name]
            result["resnet"] += [{**r, "variant": name} for r in group(
                "resnet18", n_resnet, resnet_steps, {**resnet_kw, **kw}, [(strategy, 0)],
                False, xla=xla, dtype=dtype, program=name == "program")]
        _with_ratio(result["resnet"])
        _table(f"ResNet-18 on 32×32×3 data, K = {resnet_steps}, batch 20", result["resnet"], cols)
        save()
    if "size" in sections:
        best = "loop" if backend == "cpu" else "vmap"
        result["size"] = [r for f, h in widths for r in group(
            "cnn", 10 if not args.quick else 4, steps, {"features": f, "hidden_sizes": h},
            [(best, 0)], torch_ok)]
        _table("CNN width at 10 clients per round", result["size"],
               [("num_params", "params", ",d")] + cols[1:])
        save()
    def text_kw(size):
        kw = {"size": "tiny" if args.quick else size, "max_length": 16 if args.quick else
              args.text_length}
        kw["vocab_size"] = 50265 if kw["size"] == "roberta_base" else 8000
        return kw

    if "text" in sections:
        kw = text_kw(args.text_size or ("small" if backend == "cpu" else "roberta_base"))
        strats = [(x.split(":")[0], int(x.split(":")[1]) if ":" in x else 0) for x in (
            args.text_strategies or ("loop,vmap:5" if backend == "cpu" else "loop,vmap:1,vmap:5")
        ).split(",")]
        if args.quick:
            strats = [(x, min(c, 1)) for x, c in strats]
        n_clients = 2 if args.quick else args.text_clients
        result["text"] = group("roberta", n_clients, 1 if args.quick else args.text_steps,
                               kw, strats, False)
        for r in result["text"]:
            if "round_s" in r:
                r["tokens_per_s"] = r["client_steps_per_s"] * r["batch"] * kw["max_length"]
        _table(f"RoBERTa {kw['size']} on {kw['max_length']}-token sequences, K = "
               f"{1 if args.quick else args.text_steps} AdamW steps, batch 20 (peak MB: the "
               "whole round; vmap:1 = one client at a time)", result["text"],
               cols[:5] + [("tokens_per_s", "tokens/s", ".0f")] + cols[6:])
        save()
    if "memory" in sections:
        # Compiled, never run: roberta_base even on a CPU that could not train it here.
        chunks = [int(c) for c in args.memory_chunks.split(",")]
        workloads = [w for w in [("roberta", text_kw(args.text_size or "roberta_base"),
                                  2 if args.quick else args.text_clients,
                                  1 if args.quick else args.text_steps),
                                 ("cnn", {}, 4 if args.quick else 1000, steps)]
                     if w[0] in args.memory_models.split(",")]
        result["memory"] = []
        for model, kw, clients, k in workloads:
            for chunk in chunks:
                for reduce in ("stack", "stream"):
                    spec = {"kind": "compiled", "model": model, "clients": clients,
                            "steps": k, "model_kwargs": kw, "strategy": "vmap",
                            "chunk": chunk, "reduce": reduce, **common}
                    result["memory"].append({"model": model, "clients": clients,
                                             "model_kwargs": kw, **spec,
                                             **_child(spec, cores)})
        _with_per_client(result["memory"])
        _table("XLA's compiled peak of one vmap round (buffer assignment, not run; "
               f"{backend}): per chunk of clients, server inputs stacked or streamed",
               result["memory"],
               [("model", "model", ""), ("num_params", "params", ",d"),
                ("clients", "clients", "d"), ("chunk", "chunk", "d"),
                ("reduce", "server in", ""), ("argument_mb", "args MB", ".0f"),
                ("temp_mb", "temp MB", ".0f"), ("compiled_peak_mb", "peak MB", ".0f"),
                ("per_client_mb", "MB per client in a chunk", ".0f")])
        save()
    if "masks" in sections:
        trees = ([{"tree": "synthetic", "params": 10**6}] if args.quick else
                 [{"tree": "resnet18"}, {"tree": "synthetic", "params": 10**8}])
        result["masks"] = [{**t, **_child({"kind": "prepare", **t}, cores)} for t in trees]
        resnet_round = min((r["round_s"] for r in result.get("resnet", [])
                            if r.get("framework") == "jax" and "round_s" in r), default=None)
        for r in result["masks"]:
            if resnet_round and "prepare_s" in r:
                r["share_of_resnet_round_pct"] = 100 * r["prepare_s"] / resnet_round
        _table("thresholds of all levels (policy.prepare)", result["masks"],
               [("num_params", "params", ",d"), ("prepare_s", "s", ".3f"),
                ("share_of_resnet_round_pct", "% of round", ".2f")])

    save()
    print(f"\nwrote {out} and {os.path.splitext(out)[0] + '.png'}")
    return result


if __name__ == "__main__":
    main()
