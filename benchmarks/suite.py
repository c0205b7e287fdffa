"""The benchmark suite: round throughput and peak memory per execution strategy, the
PyTorch reference side by side, scaling curves, and the cost of mask extraction.

Usage:
  python benchmarks/suite.py [--quick] [--sections strategies,resnet,size,masks,text,memory]
      [--cnn-clients 10,100,1000] [--resnet-steps 100] [--resnet-clients 10] [--rounds 2]
      [--no-torch]
      [--no-torch-tuned] [--rounds-per-program 1]
      [--reduce stream|stack|stream,stack] [--memory-chunks 1,5]
      [--out benchmarks/results/suite_<backend>.json]

Every measurement runs in its own subprocess (so peak memory is its own, and the sharded
strategy can force host devices on CPU), all pinned to the same CPU cores; PyTorch gets
``torch.set_num_threads(len(cores))``. The round timed is the one training runs: each
workload is a training config (``round_config``: configs/default.py with FIARSE and the
masked gradient, as the authors' released runs, on random data of the workload's shape,
every client in every round), built by ``fiarse_jax.experiment.build.build_run`` and
``fiarse_jax.federated.algorithm.build_algorithm`` and run by ``Algorithm.apply_rounds``, as
``fiarse_jax.experiment.train`` runs it: thresholds of every level from |w|, the clients' K local
steps, and the holder-average step, its inputs summed while the clients train
(``--reduce stream``, what training does by default) or stacked first, one program per
round (``--rounds-per-program 1``, the default here) with the round's results on the
host. Times are per round after one warm-up (compile) round. Sections:

* ``strategies``: the CNN on digits-shaped data at each ``--cnn-clients`` count per round,
  for loop / vmap / vmap chunked / sharded, and the PyTorch reference (benchmarks/
  torch_reference.py, clients one after another, the mask recomputed in every forward)
  twice: as the authors' code runs it (``vs torch``) and tuned (one reused local model,
  ``torch.compile``, bf16 autocast, channels_last; ``vs tuned``, ``--no-torch-tuned`` skips it).
* ``resnet``: CIFAR ResNet-18 (11.2 M params) on CIFAR-shaped synthetic data, at each
  ``--resnet-clients`` count per round × each ``--resnet-steps`` K (both comma-separated).
* ``size``: time per round vs CNN width at 10 clients (best strategy and PyTorch).
* ``text``: the RoBERTa classifier (``small`` on CPU, ``roberta_base`` on an accelerator)
  on random token ids, AdamW clients, per strategy: client steps/s, tokens/s, peak memory
  with one client at a time (``vmap:1``) and with a chunk of clients.
* ``memory``: XLA's buffer assignment (``compiled.memory_analysis()``) of the program a
  ``vmap`` round runs in training, compiled for this backend but never run, for
  ``roberta_base`` at ``--text-clients`` and the CNN at 1,000 clients, per
  ``--memory-chunks`` chunk size and with the server's inputs streamed (the whole round
  as one program: thresholds, clients, server step) or stacked (the clients' program,
  which returns every client's delta and mask; the server step is a program of its own
  after it and is not counted): the per-round peak, and from two chunk sizes what each
  client in a chunk adds (per-client training memory).
* ``masks``: thresholds of all levels (``policy.prepare``: one k-th-largest pass) for ResNet-18
  and a 100 M-parameter synthetic pytree, beside the ResNet round.

Also: XLA's FLOP count of a client step (one client, K = 1, as training compiles the
clients' program; always compiled for the CPU: XLA's GPU cost analysis leaves cuDNN
convolutions out), the achieved FLOP/s and, on a GPU whose peak is known
(``PEAK_FLOPS``), the model FLOPs utilisation. Prints tables, writes JSON and a PNG of the
scaling curves beside it. ``--quick`` shrinks everything to seconds (the tests run it).
"""
from __future__ import annotations

import argparse
import contextlib
import functools
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
#: The benchmark's dataset (``config.data.name``): random rows of a workload's shape.
DATASET = "suite_random"


# ---------------------------------------------------------------- the workload as a config

def random_dataset(*, shape: str = "digits", rows: int = 100, vocab_size: int = 1000,
                   max_length: int = 128):
    """``rows`` random rows of digits (8×8×1 float), CIFAR (32×32×3 uint8, with CIFAR's
    crop/flip/normalise as training applies it) or token-id (``[max_length]`` int32, no
    padding: every token is real) shape, random labels of 10 classes."""
    import numpy as np

    from fiarse_jax.data import augment
    from fiarse_jax.data.types import Dataset
    rng = np.random.default_rng(0)
    extra: dict = {}
    if shape == "cifar":
        x = rng.integers(0, 256, (rows, 32, 32, 3), dtype=np.uint8)
        extra = {"train_transform": augment.cifar_train_transform(),
                 "eval_transform": augment.cifar_eval_transform()}
    elif shape == "tokens":
        x = rng.integers(5, vocab_size, (rows, max_length), dtype=np.int32)
        x[:, 0] = 0   # <s>
        extra = {"model_options": {"vocab_size": vocab_size, "pad_token_id": 1,
                                   "max_length": max_length}}
    else:
        x = rng.normal(size=(rows, 8, 8, 1)).astype(np.float32)
    return Dataset(x=x, y=rng.integers(0, 10, rows).astype(np.int32), num_classes=10, **extra)


def round_config(spec: dict):
    """The training config of one benchmark workload ``spec`` (model, model_kwargs,
    clients, steps, batch, samples per client, strategy, chunk, reduce, xla, dtype,
    rounds timed, program / rounds_per_program): configs/default.py with FIARSE at
    ``CAPACITIES`` and the masked gradient on random data (``random_dataset``), each of
    the ``clients`` clients holding ``samples`` training rows (and one test row), all of
    them in every round; SGD lr 0.1, or AdamW lr 1e-4 (β = 0.9, 0.95, no weight decay) for
    the text model (the paper's optimisers); a warm-up round and the timed rounds, one
    evaluation at the end, no checkpoints."""
    import ml_collections
    from common import load_config_file, set_fields

    from fiarse_jax.data import DatasetSpec, register_dataset

    register_dataset(DATASET, DatasetSpec(random_dataset, ("shape", "rows", "vocab_size",
                                                           "max_length")), replace=True)
    model, kw = spec["model"], dict(spec.get("model_kwargs") or {})
    text, clients, samples = model == "roberta", spec["clients"], spec.get("samples", 100)
    num_rounds = spec.get("rounds", 1) + 1
    config = load_config_file("default.py")
    config.model = ml_collections.ConfigDict({"name": model, **kw})
    set_fields(config, {
        "method": "fiarse", "capacities": CAPACITIES, "fiarse.gradient": "masked",
        "data.name": DATASET, "data.partition": "iid", "data.num_clients": clients,
        "data.shape": {"resnet18": "cifar", "roberta": "tokens"}.get(model, "digits"),
        "data.rows": clients * (samples + 1), "data.test_fraction": 1e-3,   # 1 test row each
        **({"data.vocab_size": kw["vocab_size"], "data.max_length": kw["max_length"],
            "client.optimizer": "adamw", "client.learning_rate": 1e-4,
            "client.betas": (0.9, 0.95), "client.weight_decay": 0.0} if text else
           {"client.optimizer": "sgd", "client.learning_rate": 0.1}),
        "client.local_steps": spec["steps"], "client.local_epochs": 0.0,
        "client.batch_size": spec["batch"],
        "clients_per_round": spec.get("clients_per_round", clients),
        "num_rounds": num_rounds, "eval_every": num_rounds, "checkpoint_every": 0,
        "tensorboard": False,
        "engine.strategy": spec["strategy"], "engine.clients_per_chunk": spec.get("chunk", 0),
        "engine.reduce": spec.get("reduce", "stream"), "engine.xla": spec.get("xla", "auto"),
        "engine.dtype": spec.get("dtype", "float32"),
        "engine.rounds_per_program": 0 if spec.get("program") else
        spec.get("rounds_per_program", 1)})
    return config


def build_rounds(spec: dict):
    """``(config, run, algorithm, state)`` of ``round_config(spec)``, built as training
    builds them."""
    from fiarse_jax.experiment import build
    from fiarse_jax.federated.algorithm import build_algorithm
    config = round_config(spec)
    run = build.build_run(config)
    alg = build_algorithm(run)
    return config, run, alg, alg.init(run.init_params)


def run_rounds(spec: dict):
    """A warm-up round, then ``spec['rounds']`` timed rounds, as training runs them
    (``Algorithm.apply_rounds``; results on the host, params ready): ``(state, algorithm,
    first round's seconds, seconds per timed round)``."""
    from common import timed_rounds

    from fiarse_jax.federated.algorithm import client_schedule
    _, run, alg, state = build_rounds(spec)
    schedule = run.options.schedule
    state, _, first_s = timed_rounds(alg, state, client_schedule(schedule, 0, 1))
    state, _, seconds = timed_rounds(alg, state, client_schedule(schedule, 1, 1 + spec["rounds"]))
    return state, alg, first_s, seconds / spec["rounds"]


# ---------------------------------------------------------------- one measurement (child)

def _peak_memory_mb() -> tuple[float, str]:
    import jax
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return stats["peak_bytes_in_use"] / 2**20, "device"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "host RSS"


def measure_round(spec: dict) -> dict:
    """Time ``spec['rounds']`` rounds of ``spec['strategy']`` after a warm-up one."""
    import jax
    state, alg, first, round_s = run_rounds(spec)
    clients, steps = spec["clients"], spec["steps"]
    mem, mem_kind = _peak_memory_mb()
    return {"framework": "jax", "strategy": alg.strategy, "chunk": spec.get("chunk", 0),
            "reduce": spec.get("reduce", "stream"), "rounds_per_program": alg.rounds_per_program,
            "devices": jax.device_count(), "device_kind": jax.devices()[0].device_kind,
            "num_params": int(sum(l.size for l in jax.tree_util.tree_leaves(state.params))),
            "first_round_s": first, "round_s": round_s,
            "client_steps_per_s": clients * steps / round_s,
            "peak_mem_mb": mem, "mem_kind": mem_kind}


class _Compiled(Exception):
    """Raised by ``_compile_only`` instead of running a program: ``compiled`` is it."""

    def __init__(self, compiled):
        super().__init__("compiled, not run")
        self.compiled = compiled


@contextlib.contextmanager
def _compile_only():
    """Inside: the first program ``jax.jit`` makes here that is called from the host
    (not inside another program's trace) is compiled and not run (``_Compiled``). The
    algorithm makes a round's programs on its first round, so the first one a round
    calls is the whole round (streamed server inputs, rounds compiled together) or its
    clients' program; what it made before (thresholds, specs, server step) still runs."""
    import jax
    real = jax.jit

    def jit(fun=None, *args, **kwargs):
        if fun is None:   # the decorator form, @jax.jit(...)
            return functools.partial(jit, *args, **kwargs)
        jitted = real(fun, *args, **kwargs)

        @functools.wraps(fun)
        def call(*a, **kw):
            if any(isinstance(x, jax.core.Tracer) for x in jax.tree_util.tree_leaves((a, kw))):
                return jitted(*a, **kw)   # part of the program being traced
            raise _Compiled(jitted.lower(*a, **kw).compile())

        call.lower = jitted.lower
        return call

    jax.jit = jit
    try:
        yield
    finally:
        jax.jit = real


def compile_round(spec: dict):
    """``(run, algorithm, compiled)``: the first program of ``round_config(spec)``'s
    first round as training runs it, compiled for this backend and never run."""
    import jax

    from fiarse_jax.federated.algorithm import client_schedule
    config, run, alg, state = build_rounds(spec)
    ids = client_schedule(run.options.schedule, 0, 1)
    try:
        with _compile_only():
            alg.apply_rounds(state, ids)
    except _Compiled as c:
        compiled = c.compiled
    else:
        raise RuntimeError("the round ran: its programs were made before it, so none was "
                           "compiled alone (see _compile_only)")
    data = sum(a[ids[0]].nbytes for a in jax.tree_util.tree_leaves(run.data.train))
    if compiled.memory_analysis().argument_size_in_bytes < data:   # not the clients' program
        raise RuntimeError("the program compiled first does not take the round's data")
    return run, alg, compiled


def measure_compiled(spec: dict) -> dict:
    """XLA's buffer assignment of the program a ``vmap`` round runs in training (see the
    module docstring; rounds compiled together, as training's default), compiled for this
    backend and never run: the peak bytes a round needs, however large the model, on a
    machine that could not run it in the time available."""
    import jax

    from fiarse_jax.federated import memory
    run, alg, compiled = compile_round({**spec, "program": True})
    m = compiled.memory_analysis()
    mb = {k: getattr(m, f"{k}_size_in_bytes") / 2**20 for k in ("argument", "output", "temp",
                                                                  "alias")}
    leaves = jax.tree_util.tree_leaves
    return {"framework": "jax", "strategy": spec["strategy"], "chunk": spec.get("chunk", 0),
            "reduce": spec.get("reduce", "stream"), "device_kind": jax.devices()[0].device_kind,
            "program": "round" if alg.rounds_per_program > 1 else "clients",
            "num_params": int(sum(l.size for l in leaves(run.init_params))),
            "inputs_mb": sum(l.nbytes for l in leaves((run.init_params, run.data.train)))
            / 2**20,
            **{f"{k}_mb": v for k, v in mb.items()},
            "compiled_peak_mb": memory.peak_bytes(compiled) / 2**20}


def measure_step_flops(spec: dict) -> dict:
    """XLA's FLOP count of one client step (forward, backward, optimiser update) at
    ``spec``'s model and batch: the clients' program of a round of one client (of one per
    capacity level) and K = 1 as training compiles it (``vmap``, stacked results: the
    step plus the delta and mask, O(params)). Compiled for the CPU (the parent runs this
    with JAX_PLATFORMS=cpu: XLA's GPU cost analysis leaves out cuDNN convolutions, so a
    GPU count is far too low)."""
    _, _, compiled = compile_round({
        **spec, "clients": len(CAPACITIES), "clients_per_round": 1, "steps": 1,
        "strategy": "vmap", "chunk": 0, "reduce": "stack", "program": False, "rounds": 1,
        "rounds_per_program": 1})
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return {"step_gflops": float(cost.get("flops", float("nan"))) / 1e9}


def measure_prepare(spec: dict) -> dict:
    """Seconds for the thresholds of every level (``policy.prepare``, jitted as
    ``build_run`` jits it): ResNet-18 params or an N-param pytree (no model of training's:
    the threshold pass alone, at a size no CPU round reaches)."""
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


#: ``spec['kind']`` -> its measurement (torch rows run benchmarks/torch_reference.py).
MEASURES = {"jax": measure_round, "compiled": measure_compiled, "flops": measure_step_flops,
            "prepare": measure_prepare}


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

    resnet = [r for r in result.get("resnet", []) if "round_s" in r]
    shapes = len({(r["clients"], r["steps"]) for r in resnet}) > 1

    def label(r):
        return ((f"{r['clients']}×K{r['steps']} " if shapes and r in resnet else "")
                + r["strategy"] + (f" (chunk {r['chunk']})" if r.get("chunk") else "")
                + (f", {r['reduce']}" if several and r.get("reduce") else "")
                + (f" ({r['variant']})" if r.get("variant") else ""))

    if not timed and result.get("memory"):
        _plot_memory(result["memory"], axes)
    by = {}
    for r in result.get("strategies", []):
        if "round_s" in r:
            by.setdefault(label(r), []).append((r["clients"], r["round_s"]))
    for name, pts in sorted(by.items()):
        pts.sort()
        axes[0].plot(*zip(*pts), marker="o", label=name)
    if by:
        axes[0].set(xscale="log", yscale="log", xlabel="clients per round",
                    ylabel="s per round", title="CNN on digits-shaped data")
    by = {}
    for r in result.get("size", []):
        if "round_s" in r:
            by.setdefault(label(r), []).append((r["num_params"], r["round_s"]))
    for name, pts in sorted(by.items()):
        pts.sort()
        axes[1].plot(*zip(*pts), marker="o", label=name)
    if not by and resnet:   # no width section: the ResNet-18 round per strategy instead
        axes[1].bar([label(r) for r in resnet], [r["round_s"] for r in resnet])
        axes[1].tick_params(axis="x", labelsize=8, labelrotation=20)   # long variant labels
        axes[1].set(ylabel="s per round", yscale="log" if shapes else "linear",
                    title="ResNet-18, clients × K" if shapes else
                    f"ResNet-18, {resnet[0]['clients']} clients × K = {resnet[0]['steps']}")
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


# ---------------------------------------------------------------- the sections (parent)

#: The timed sections' table columns.
COLS = [("clients", "clients", "d"), ("strategy", "strategy", ""), ("variant", "variant", ""),
        ("chunk", "chunk", "d"),
        ("reduce", "server in", ""),
        ("round_s", "s/round", ".4f"), ("client_steps_per_s", "steps/s", ".1f"),
        ("vs_torch", "vs torch", ".3f"), ("vs_torch_tuned", "vs tuned", ".3f"),
        ("peak_mem_mb", "peak MB", ".0f"),
        ("achieved_tflops", "TFLOP/s", ".4f"), ("mfu", "MFU", ".3f")]
#: ``--resnet-variants``: name -> (model fields, strategy ("auto": the backend's), xla,
#: dtype, whole rounds in one program).
RESNET_VARIANTS = {"defaults": ({"conv": "xla"}, "loop", "default", None, False),
                   "program": ({}, "auto", "auto", None, True),
                   "patches": ({"conv": "patches"}, "vmap", "auto", None, False),
                   "bf16": ({}, "auto", "auto", "bfloat16", False)}
CNN_WIDTHS = [((8, 16), (32,)), ((16, 32), (64,)), ((32, 64), (128,)), ((64, 128), (256,))]


def _counts(ap: argparse.ArgumentParser, flag: str, text: str) -> list[int]:
    """``"5,20,100"`` -> ``[5, 20, 100]``; anything but positive integers is a parser error."""
    try:
        out = [int(v) for v in text.split(",")]
    except ValueError:
        out = []
    if not out or min(out) < 1:
        ap.error(f"{flag} {text!r}: expected positive integers, comma-separated")
    return out


def _strategies(text: str) -> list[tuple[str, int]]:
    """``"loop,vmap:100"`` -> ``[("loop", 0), ("vmap", 100)]`` (strategy, clients per chunk)."""
    return [(s.split(":")[0], int(s.split(":")[1]) if ":" in s else 0) for s in text.split(",")]


class Suite:
    """One run of the suite: its settings (the arguments, shrunk by ``--quick``), the
    result so far and where it goes."""

    def __init__(self, args, ap: argparse.ArgumentParser):
        import jax
        from common import environment
        self.args, self.backend = args, jax.default_backend()
        self.cores = sorted(os.sched_getaffinity(0))
        self.sections = set(args.sections.split(","))
        self.multi_device = jax.device_count() > 1
        self.torch_ok = not args.no_torch and _torch_available()
        self.torch_variants = ["authors"] + ([] if args.no_torch_tuned else ["tuned"])
        self.strategies = _strategies(args.strategies)
        self.cnn_clients = [int(c) for c in args.cnn_clients.split(",")]
        self.steps, self.rounds, self.samples = args.steps, args.rounds, 100
        self.resnet_steps = _counts(ap, "--resnet-steps", args.resnet_steps)
        self.resnet_clients = _counts(ap, "--resnet-clients", args.resnet_clients)
        self.widths, self.resnet_kw = CNN_WIDTHS, {}
        if args.quick:   # every round holds ≥ 1 client per capacity level (3)
            self.cnn_clients, self.steps, self.resnet_steps, self.rounds, self.samples = (
                [4], 2, [1], 1, 20)
            self.resnet_clients = [3]
            self.strategies = [(s, c if c == 0 else 2) for s, c in self.strategies]
            self.widths, self.resnet_kw = CNN_WIDTHS[:2], {"widths": [4, 8, 8, 8]}
        self.reduces = args.reduce.split(",")
        if not set(self.reduces) <= {"stream", "stack"}:
            ap.error(f"--reduce {args.reduce!r}: expected stream, stack or both, comma-separated")
        names = (args.resnet_variants if args.resnet_variants is not None else
                 "defaults,program" if self.backend == "cpu" else "program,patches,bf16")
        self.resnet_variants = list(filter(None, names.split(",")))
        bad = [n for n in self.resnet_variants if n not in RESNET_VARIANTS]
        if bad:
            ap.error(f"--resnet-variants: unknown {bad[0]!r}; expected some of "
                     f"{sorted(RESNET_VARIANTS)}")
        self.common = {"batch": 20, "rounds": self.rounds, "samples": self.samples,
                       "dtype": args.dtype, "rounds_per_program": args.rounds_per_program,
                       "host_devices": args.host_devices if self.backend == "cpu" else 0,
                       # The PyTorch reference runs on the same kind of device as JAX.
                       "torch_device": "cuda" if self.backend == "gpu" else "cpu"}
        self.result: dict = {
            "environment": {**environment(), "cores": self.cores, "torch": self.torch_ok,
                            "quick": args.quick,
                            "torch_variants": self.torch_variants if self.torch_ok else []},
            "settings": {"capacities": CAPACITIES, "cnn_steps": self.steps,
                         "resnet_steps": self.resnet_steps, "batch": 20, "rounds": self.rounds,
                         "samples_per_client": self.samples, "dtype": args.dtype,
                         "gradient": "masked", "rounds_per_program": args.rounds_per_program}}
        self.out = args.out or os.path.join(HERE, "results", f"suite_{self.backend}.json")
        os.makedirs(os.path.dirname(os.path.abspath(self.out)), exist_ok=True)

    def save(self) -> None:
        """Write the JSON and PNG so far (after every section: a cut-off run keeps its part)."""
        from fiarse_jax.experiment.metrics import write_atomic
        write_atomic(self.out, json.dumps(self.result, indent=2))
        plot(self.result, os.path.splitext(self.out)[0] + ".png")

    def group(self, model: str, clients: int, k: int, kw: dict, strats, torch_too: bool,
              xla: str = "auto", dtype: str | None = None, program: bool = False) -> list[dict]:
        """One row per JAX strategy × server-input mode (and per PyTorch reference), each
        with the FLOP count of the client step."""
        rows = []
        for strategy, chunk in strats:
            if chunk and chunk >= clients:
                continue
            for reduce in self.reduces:
                spec = {"kind": "jax", "model": model, "clients": clients, "steps": k,
                        "model_kwargs": kw, "strategy": strategy, "chunk": chunk,
                        "reduce": reduce, "xla": xla, **self.common,
                        **({"dtype": dtype} if dtype else {}),
                        **({"program": True} if program else {})}
                rows.append({"clients": clients, "model_kwargs": kw, **spec,
                             **_child(spec, self.cores)})
        for variant in self.torch_variants if torch_too else []:
            spec = {"kind": "torch", "model": model, "clients": clients, "steps": k,
                    "model_kwargs": kw, "variant": variant, **self.common}
            rows.append({"clients": clients, **spec, **_child(spec, self.cores)})
            if rows[-1].get("compile_error"):   # still timed, eagerly: say so beside the table
                print(f"tuned PyTorch round ran eagerly: {rows[-1]['compile_error']}")
        _with_flops(rows, _child({"kind": "flops", "model": model, "steps": k,
                                  "model_kwargs": kw, **self.common}, self.cores))
        _with_ratio(rows)
        return rows

    def text_kw(self, size: str) -> dict:
        """The RoBERTa model's fields (and the random tokens' vocabulary and length)."""
        quick = self.args.quick
        kw = {"size": "tiny" if quick else size,
              "max_length": 16 if quick else self.args.text_length}
        kw["vocab_size"] = 50265 if kw["size"] == "roberta_base" else 8000
        return kw


def section_strategies(s: Suite) -> list[dict]:
    rows = [r for c in s.cnn_clients
            for r in s.group("cnn", c, s.steps, {}, s.strategies, s.torch_ok)]
    _table(f"CNN (16,32 conv, 64 dense) on 8×8×1 data, K = {s.steps}, batch 20", rows, COLS)
    return rows


def section_resnet(s: Suite) -> list[dict]:
    strats = [("loop", 0), ("vmap", 0)] + (
        [("sharded", 0)] if s.backend != "cpu" and s.multi_device else [])
    rows = s.result["resnet"] = []
    for n in s.resnet_clients:
        for k in s.resnet_steps:
            rows += _resnet_rows(s, n, k, strats)
            s.save()   # a long sweep cut off keeps the groups it finished
    return rows


def _resnet_rows(s: Suite, n: int, k: int, strats) -> list[dict]:
    """ResNet-18 at ``n`` clients × K = ``k``: each strategy, the references and the variants."""
    rows = s.group("resnet18", n, k, s.resnet_kw, strats, s.torch_ok)
    # Beside it, the variants (--resnet-variants): on CPU (where the per-backend choices
    # differ from the defaults) the loop as it ran before them, XLA's default options and
    # JAX's own conv gradient; on an accelerator the candidates for vmap, the patches
    # convolution (batched matrix products) and bf16 compute; and everywhere the
    # backend's strategy with whole rounds in one program (training's default).
    auto = "loop" if s.backend == "cpu" else "vmap"
    for name in s.resnet_variants:
        kw, strategy, xla, dtype, program = RESNET_VARIANTS[name]
        rows += [{**r, "variant": name} for r in s.group(
            "resnet18", n, k, {**s.resnet_kw, **kw},
            [(auto if strategy == "auto" else strategy, 0)], False, xla=xla, dtype=dtype,
            program=program)]
    _with_ratio(rows)
    _table(f"ResNet-18 on 32×32×3 data, {n} clients, K = {k}, batch 20", rows, COLS)
    return rows


def section_size(s: Suite) -> list[dict]:
    best = "loop" if s.backend == "cpu" else "vmap"
    rows = [r for f, h in s.widths for r in s.group(
        "cnn", 4 if s.args.quick else 10, s.steps, {"features": f, "hidden_sizes": h},
        [(best, 0)], s.torch_ok)]
    _table("CNN width at 10 clients per round", rows, [("num_params", "params", ",d")] + COLS[1:])
    return rows


def section_text(s: Suite) -> list[dict]:
    args = s.args
    kw = s.text_kw(args.text_size or ("small" if s.backend == "cpu" else "roberta_base"))
    strats = _strategies(args.text_strategies or (
        "loop,vmap:5" if s.backend == "cpu" else "loop,vmap:1,vmap:5"))
    if args.quick:
        strats = [(x, min(c, 1)) for x, c in strats]
    k = 1 if args.quick else args.text_steps
    rows = s.group("roberta", 3 if args.quick else args.text_clients, k, kw, strats, False)
    for r in rows:
        if "round_s" in r:
            r["tokens_per_s"] = r["client_steps_per_s"] * r["batch"] * kw["max_length"]
    _table(f"RoBERTa {kw['size']} on {kw['max_length']}-token sequences, K = {k} AdamW "
           "steps, batch 20 (peak MB: the whole round; vmap:1 = one client at a time)", rows,
           COLS[:5] + [("tokens_per_s", "tokens/s", ".0f")] + COLS[6:])
    return rows


def section_memory(s: Suite) -> list[dict]:
    # Compiled, never run: roberta_base even on a CPU that could not train it here.
    args, quick = s.args, s.args.quick
    workloads = [w for w in [("roberta", s.text_kw(args.text_size or "roberta_base"),
                              3 if quick else args.text_clients, 1 if quick else args.text_steps),
                             ("cnn", {}, 4 if quick else 1000, s.steps)]
                 if w[0] in args.memory_models.split(",")]
    rows = []
    for model, kw, clients, k in workloads:
        for chunk in (int(c) for c in args.memory_chunks.split(",")):
            for reduce in ("stack", "stream"):
                spec = {"kind": "compiled", "model": model, "clients": clients, "steps": k,
                        "model_kwargs": kw, "strategy": "vmap", "chunk": chunk,
                        "reduce": reduce, **s.common}
                rows.append({"model": model, "clients": clients, "model_kwargs": kw, **spec,
                             **_child(spec, s.cores)})
    _with_per_client(rows)
    _table("XLA's compiled peak of a vmap round as training compiles it (buffer assignment, "
           f"not run; {s.backend}): per chunk of clients, server inputs stacked (the clients' "
           "program) or streamed (the whole round)", rows,
           [("model", "model", ""), ("num_params", "params", ",d"),
            ("clients", "clients", "d"), ("chunk", "chunk", "d"),
            ("reduce", "server in", ""), ("argument_mb", "args MB", ".0f"),
            ("temp_mb", "temp MB", ".0f"), ("compiled_peak_mb", "peak MB", ".0f"),
            ("per_client_mb", "MB per client in a chunk", ".0f")])
    return rows


def section_masks(s: Suite) -> list[dict]:
    trees = ([{"tree": "synthetic", "params": 10**6}] if s.args.quick else
             [{"tree": "resnet18"}, {"tree": "synthetic", "params": 10**8}])
    rows = [{**t, **_child({"kind": "prepare", **t}, s.cores)} for t in trees]
    resnet_round = min((r["round_s"] for r in s.result.get("resnet", [])
                        if r.get("framework") == "jax" and "round_s" in r), default=None)
    for r in rows:
        if resnet_round and "prepare_s" in r:
            r["share_of_resnet_round_pct"] = 100 * r["prepare_s"] / resnet_round
    _table("thresholds of all levels (policy.prepare)", rows,
           [("num_params", "params", ",d"), ("prepare_s", "s", ".3f"),
            ("share_of_resnet_round_pct", "% of round", ".2f")])
    return rows


#: ``--sections`` -> its function, run in this order (``masks`` reads the ResNet round).
SECTIONS = {"strategies": section_strategies, "resnet": section_resnet, "size": section_size,
            "text": section_text, "memory": section_memory, "masks": section_masks}


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--measure", help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run in seconds")
    ap.add_argument("--sections", default=",".join(SECTIONS))
    ap.add_argument("--cnn-clients", default="10,100,1000")
    ap.add_argument("--steps", type=int, default=20, help="local steps K for the CNN")
    ap.add_argument("--resnet-steps", default="100",
                    help="local steps K for ResNet-18 (comma-separated: one row group each)")
    ap.add_argument("--resnet-clients", default="10",
                    help="ResNet-18 clients per round (comma-separated, × each K)")
    ap.add_argument("--rounds", type=int, default=2, help="timed rounds after the warm-up")
    ap.add_argument("--rounds-per-program", type=int, default=1,
                    help="engine.rounds_per_program of the timed rounds (1: a program per "
                         "round; 0: every timed round in one, where the round allows it)")
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
                         "backend's strategy with whole rounds one program, training's "
                         "default), patches (vmap with model.conv=patches), bf16 (the "
                         "backend's strategy, bf16 compute); '' for none (default: defaults,program on CPU, "
                         "program,patches,bf16 elsewhere)")
    ap.add_argument("--no-torch", action="store_true",
                    help="skip the PyTorch references (authors' and tuned)")
    ap.add_argument("--no-torch-tuned", action="store_true",
                    help="skip only the tuned PyTorch reference")
    ap.add_argument("--out", default=None)
    return ap


def main(argv=None) -> dict:
    ap = parser()
    args = ap.parse_args(argv)
    if args.measure:
        spec = json.loads(args.measure)
        print(json.dumps(MEASURES[spec["kind"]](spec)))
        return {}
    bad = [n for n in args.sections.split(",") if n not in SECTIONS]
    if bad:
        ap.error(f"--sections: unknown {bad[0]!r}; expected some of {list(SECTIONS)}")
    if args.cores:   # before jax starts its threads; the children inherit the affinity
        os.sched_setaffinity(0, {int(c) for c in args.cores.split(",")})
    sys.path.insert(0, HERE)
    suite = Suite(args, ap)
    for name, section in SECTIONS.items():
        if name in suite.sections:
            suite.result[name] = section(suite)
            suite.save()
    suite.save()
    print(f"\nwrote {suite.out} and {os.path.splitext(suite.out)[0] + '.png'}")
    return suite.result


if __name__ == "__main__":
    main()
