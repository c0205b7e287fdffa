"""Execution strategies: run one round's client updates, knowing nothing of the method.

* ``"vmap"``: the client axis vmapped, the K local steps in a ``fori_loop`` (a
  scan), all in one jit: the accelerator path. With ``clients_per_chunk = c`` the
  round's clients run in chunks of c (vmapped within a chunk, ``lax.scan`` across
  chunks), so per-client training memory (activations, gradients, optimiser
  state) is that of c clients however many there are.
* ``"sharded"``: the client axis split over every device (``jax.shard_map`` on a
  1-D ``clients`` mesh; chunked per device as above); the server's reduction over
  that axis then becomes a cross-device sum. With ``jax.distributed`` initialised
  the mesh spans every process's devices (the multi-host / TPU-pod path).
* ``"loop"``: a Python loop over clients and steps of jitted ``init``/``step``/
  ``final``: the fast path on CPU, where vmapped clients' convolutions become grouped
  convolutions that XLA:CPU runs slowly (``models.conv`` keeps the steps inside a
  ``fori_loop`` as fast as one at a time).
* ``"auto"``: ``vmap`` on GPU/TPU, ``loop`` on CPU.

``program_runner`` gives the ``loop`` (a ``lax.scan`` over clients) and ``vmap`` runners
as traceable functions, for a larger program: ``algorithm`` compiles several whole
rounds together with them.

Every program compiles with ``compiler_options(xla)`` (per-backend XLA options; on CPU
convolutions run on Eigen rather than YNNPACK).
All run the same ``ClientFns``, so with the same keys one round agrees up to
float rounding (tested). Over many rounds the tiny differences can flip a
threshold decision |w| ≥ θ, so long trajectories drift apart like any two
float orderings would; final accuracies agree to within noise, not bit for bit.
Inputs carry a leading client axis: ``specs`` (from the policy), ``data``
(``ClientData``) and ``keys``; the output is a ``ClientResult`` stacked on that
axis (in the sharded strategy, sharded along it). Chunking and sharding pad the
client axis by repeating the last client and drop the padding's results.
Stacked outputs hold one delta and mask per client: O(clients × params) (float deltas,
uint8 masks). With a ``reduce`` function (``make_round_runner(..., reduce=...)``) nothing
is stacked but small per-client values: each client's result is mapped to ``(sums,
stats)`` as soon as it exists, ``sums`` are added up over the round's clients (a scan
carry across chunks, a running total in the loop, a cross-device ``psum`` when
sharded) and ``stats`` are stacked, so the server's inputs take O(params) however many
clients a round has: what a server rule that sums over clients needs (the holder mean,
the norm-bounded mean, DP-FedAvg). (Training itself holds c clients at once: with
``clients_per_chunk = 0``, all of them.)
"""
from __future__ import annotations

import functools
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from fiarse_jax.data.types import ClientData
from fiarse_jax.federated.client import ClientFns, ClientResult, client_update

STRATEGIES = ("auto", "loop", "vmap", "sharded")
#: ``config.engine.xla``: "auto" compiles with ``compiler_options``' per-backend choices,
#: "default" with XLA's defaults.
XLA_SETTINGS = ("auto", "default")
#: XLA:CPU's default YNNPACK library fusions less convolutions (checked against the
#: default in the tests: if a jaxlib changes its default, they say so).
_CPU_YNN_NO_CONV = ",".join("LIBRARY_FUSION_TYPE_" + t for t in
                            ("DOT", "REDUCE", "INDIVIDUAL_DOT"))
CLIENT_AXIS = "clients"
RoundRunner = Callable[[Any, Any, ClientData, jax.Array], Any]
#: One client's ``ClientResult`` → ``(sums, stats)``: ``sums`` (a pytree) are added up
#: over the round's clients in their own dtype (so give them one that holds the total,
#: e.g. float32 counts, not uint8), ``stats`` (a pytree) are stacked on the client axis.
Reduce = Callable[[ClientResult], tuple[Any, Any]]


def resolve_strategy(strategy: str, *, backend: str | None = None,
                     local_devices: int | None = None, processes: int | None = None) -> str:
    """The concrete strategy of ``strategy``; ``auto`` follows the machine:

    ``sharded`` across processes (``jax.distributed``: only it runs there) and whenever an
    accelerator shows more than one local device (a Colab TPU's 8 cores, a multi-GPU box),
    ``vmap`` on one accelerator, ``loop`` on CPU (where one client at a time is fastest).

    Args:
      strategy: one of ``STRATEGIES``.
      backend, local_devices, processes: the machine (default: JAX's
        ``default_backend()``, ``local_device_count()``, ``process_count()``).

    Returns:
      The concrete strategy: ``"loop"``, ``"vmap"`` or ``"sharded"``.

    Raises:
      ValueError: an unknown strategy.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown engine strategy {strategy!r}; expected one of {STRATEGIES}")
    if strategy != "auto":
        return strategy
    backend = jax.default_backend() if backend is None else backend
    local_devices = jax.local_device_count() if local_devices is None else local_devices
    processes = jax.process_count() if processes is None else processes
    if processes > 1:
        return "sharded"
    if backend == "cpu":
        return "loop"
    return "sharded" if local_devices > 1 else "vmap"


def _ynn_probe(x, w, a, b):
    """A convolution, and a dense layer's step: what the YNNPACK option list must leave as
    XLA:CPU's default compiles it (``_cpu_choice_holds``)."""
    y = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    def loss(m):
        return jnp.sum(jnp.tanh(a @ m) ** 2)
    return y, b - 0.1 * jax.grad(loss)(b), jnp.exp(b).max(1)


@functools.cache
def _cpu_choice_holds() -> bool:
    """Whether this jaxlib knows the option and ``_CPU_YNN_NO_CONV`` plus convolutions is
    exactly its default (the probe compiles identically): only then does leaving
    convolutions out change nothing else. Another jaxlib: XLA's defaults."""
    args = [jnp.ones(s, jnp.float32) for s in ((2, 16, 16, 32), (3, 3, 32, 32), (20, 64),
                                               (64, 128))]

    def text(options):
        compiled = jax.jit(_ynn_probe, compiler_options=options).lower(*args).compile()
        return re.sub(r"metadata=\{.*?\}", "", compiled.as_text())

    key = "xla_cpu_experimental_ynn_fusion_type"
    try:
        return text(None) == text({key: _CPU_YNN_NO_CONV
                                   + ",LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION"})
    except Exception:   # noqa: BLE001 — an unknown option or value is an XLA runtime error
        return False


def compiler_options(setting: str = "auto", backend: str | None = None) -> dict[str, str]:
    """XLA options the engine's programs (and evaluation) compile with on ``backend``.

    ``"auto"`` on CPU: XLA's YNNPACK fusions stay as by default, but convolutions go to
    XLA's Eigen convolution instead of YNNPACK's (with ``models.conv``'s canonical backward
    convolutions a CIFAR ResNet-18 round took 31.8 s instead of 36.9 s on 2 cores in one
    run of ``benchmarks/suite.py --sections resnet``, 32.9 s instead of 33.2 s in another:
    the gain is within this machine's run-to-run spread; docs/profile.md shows the time
    leaving YNNPACK's convolutions). Only where this jaxlib's default is the
    one checked (``_cpu_choice_holds``); otherwise none. Other backends: none yet (XLA's
    defaults) — GPU choices wait for a measurement. ``"default"``: none anywhere.

    Args:
      setting: one of ``XLA_SETTINGS``.
      backend: default JAX's ``default_backend()``.

    Returns:
      ``{option: value}`` for ``jax.jit(..., compiler_options=...)`` (may be empty).
    """
    if setting not in XLA_SETTINGS:
        raise ValueError(f"engine.xla = {setting!r}: expected one of {XLA_SETTINGS}")
    backend = jax.default_backend() if backend is None else backend
    options = {}
    if setting == "auto" and backend == "cpu":
        options = {"xla_cpu_experimental_ynn_fusion_type": _CPU_YNN_NO_CONV}
    if not options or backend != jax.default_backend():
        return options
    return options if _cpu_choice_holds() else {}


def jit(fun, options: dict[str, str] | None = None, **kwargs):
    """``jax.jit(fun, **kwargs)`` compiled with ``options`` (``compiler_options()`` if None).

    Called inside another trace (an outer ``jit``, e.g. a whole round compiled at once)
    it is a plain nested ``jax.jit``: XLA options belong to the outermost program.
    """
    options = compiler_options() if options is None else options
    plain = jax.jit(fun, **kwargs)
    if not options:
        return plain
    tuned = jax.jit(fun, compiler_options=options, **kwargs)

    @functools.wraps(fun)
    def call(*args, **kw):
        try:
            return tuned(*args, **kw)
        except ValueError as e:   # inside another trace: jax refuses the options there
            if "compiler_options" not in str(e):
                raise
            return plain(*args, **kw)

    call.lower = tuned.lower
    return call


def _index(tree, i):
    return jax.tree_util.tree_map(lambda a: a[i], tree)


def _pad_clients(tree, multiple: int):
    """Pad the leading axis to a multiple of ``multiple`` by repeating the last row."""
    n = jax.tree_util.tree_leaves(tree)[0].shape[0]
    pad = -n % multiple
    if pad == 0:
        return tree
    return jax.tree_util.tree_map(
        lambda a: jnp.concatenate([a, jnp.repeat(a[-1:], pad, axis=0)]), tree)


def _stack(result: ClientResult):
    """The reduce of the stacking runners: nothing summed, the whole result kept."""
    return (), result


def _add(a, b):
    return jax.tree_util.tree_map(jnp.add, a, b)


def _sum_valid(tree, valid: jax.Array):
    """Sum over the leading (client) axis of the rows where ``valid``: padding adds nothing."""
    def total(a):
        keep = valid.reshape(valid.shape + (1,) * (a.ndim - 1))
        return jnp.where(keep, a, jnp.zeros_like(a)).sum(axis=0, dtype=a.dtype)
    return jax.tree_util.tree_map(total, tree)


def _zeros(tree_shape):
    return jax.tree_util.tree_map(lambda a: jnp.zeros(a.shape, a.dtype), tree_shape)


def _loop_runner(fns: ClientFns, reduce: Reduce, options: dict):
    init = jit(fns.init, options)
    step = jit(fns.step, options, donate_argnums=0)   # the state is replaced every step

    def fold_fn(total, params, state, spec):
        return _fold(total, reduce(fns.final(params, state, spec)))

    fold = jit(fold_fn, options, donate_argnums=0)   # a running total: one copy of the sums
    step_ids = [jnp.asarray(k, jnp.int32) for k in range(fns.num_steps)]

    def run(params, specs, data, keys):
        total, stats = None, []
        for i in range(keys.shape[0]):
            spec_i, data_i = _index(specs, i), _index(data, i)
            state = init(params, spec_i, data_i, keys[i])
            for k in step_ids:
                state = step(state, spec_i, data_i, k)
            if total is None:
                total = _zeros(jax.eval_shape(
                    lambda *a: reduce(fns.final(*a))[0], params, state, spec_i))
            total, st = fold(total, params, state, spec_i)
            stats.append(st)
        return total, jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *stats)

    return run


def _scanned(fns: ClientFns, reduce: Reduce):
    """Traceable ``(params, specs, data, keys) -> (sums, stats)``: one client after another
    in a ``lax.scan`` (the loop strategy inside one program; one client's training memory)."""
    def run(params, specs, data, keys):
        def one(spec, d, key):
            return reduce(client_update(fns, params, spec, d, key))

        zeros = _zeros(jax.eval_shape(lambda: one(*_index((specs, data, keys), 0))[0]))
        return jax.lax.scan(lambda total, x: _fold(total, one(*x)), zeros, (specs, data, keys))

    return run


def _fold(total, result):
    sums, stats = result
    return _add(total, sums), stats


def program_runner(fns: ClientFns, strategy: str = "auto", *, clients_per_chunk: int = 0,
                   reduce: Reduce) -> Callable:
    """The round's clients as a traceable ``(params, specs, data, keys) -> (sums, stats)``
    for a larger program (``algorithm``'s rounds compiled together): ``loop`` scans over
    the clients one at a time, ``vmap`` vmaps them (in chunks of ``clients_per_chunk``).
    ``sharded`` has no in-program form here (its runner places data itself)."""
    strategy = resolve_strategy(strategy)
    if strategy == "loop":
        return _scanned(fns, reduce)
    if strategy == "vmap":
        local = _chunked(fns, clients_per_chunk, reduce)
        return lambda params, specs, data, keys: local(params, specs, data, keys,
                                                       jnp.ones(keys.shape[0], bool))
    raise ValueError(f"program_runner: strategy {strategy!r} has no in-program form")


def _chunked(fns: ClientFns, clients_per_chunk: int, reduce: Reduce):
    """Traceable ``(params, specs, data, keys, valid) -> (sums, stats)``: vmap, in chunks
    if asked; ``sums`` add up the rows where ``valid``, ``stats`` keep every row."""
    batched = jax.vmap(lambda p, s, d, k: reduce(client_update(fns, p, s, d, k)),
                       in_axes=(None, 0, 0, 0))

    def run(params, specs, data, keys, valid):
        n = keys.shape[0]
        c = clients_per_chunk
        if c <= 0 or c >= n:
            sums, stats = batched(params, specs, data, keys)
            return _sum_valid(sums, valid), stats
        inputs = _pad_clients((specs, data, keys), c)
        valid = jnp.concatenate([valid, jnp.zeros(-n % c, bool)])
        chunks = jax.tree_util.tree_map(lambda a: a.reshape(-1, c, *a.shape[1:]),
                                        (*inputs, valid))
        one = jax.eval_shape(lambda: reduce(client_update(fns, params, *_index(
            _index(chunks[:3], 0), 0)))[0])
        zeros = _zeros(one)

        def body(total, chunk):
            sums, stats = batched(params, *chunk[:3])
            return _add(total, _sum_valid(sums, chunk[3])), stats

        total, stats = jax.lax.scan(body, zeros, chunks)
        return total, jax.tree_util.tree_map(lambda a: a.reshape(-1, *a.shape[2:])[:n], stats)

    return run


def client_mesh(devices=None) -> Mesh:
    """A 1-D mesh named ``clients`` over ``devices``.

    Args:
      devices: the devices; default all of them, every process's.

    Returns:
      A ``Mesh`` with the one axis ``CLIENT_AXIS``.
    """
    devices = jax.devices() if devices is None else list(devices)
    return Mesh(np.asarray(devices), (CLIENT_AXIS,))


def _put(tree, sharding: NamedSharding):
    """Place ``tree`` with ``sharding``; across processes every process holds the
    same full value (same seed, same data), and contributes its addressable slices."""
    if jax.process_count() == 1:
        return jax.device_put(tree, sharding)

    def put(a):
        host = np.asarray(a)
        return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])

    return jax.tree_util.tree_map(put, tree)


def replicate(tree, mesh: Mesh | None = None):
    """``tree`` copied to every device of ``mesh`` (the global model for ``sharded``).

    Across processes every process must hold the same full value (same seed, same
    data); each contributes its addressable copies.

    Args:
      tree: a pytree of arrays.
      mesh: the mesh; default ``client_mesh()``.

    Returns:
      The pytree, replicated over ``mesh``.
    """
    return _put(tree, NamedSharding(mesh or client_mesh(), P()))


def local_view(tree):
    """This process's copy of a replicated ``tree`` (itself when there is one process).

    Args:
      tree: a pytree of replicated arrays.

    Returns:
      The pytree with each leaf this process's first addressable shard.
    """
    if jax.process_count() == 1:
        return tree
    return jax.tree_util.tree_map(lambda a: a.addressable_data(0), tree)


def to_host(x) -> np.ndarray:
    """``x`` as a NumPy array on every process (an all-gather when it spans processes).

    Args:
      x: an array, possibly sharded across processes.

    Returns:
      The full value as a NumPy array.
    """
    if jax.process_count() == 1 or getattr(x, "is_fully_addressable", True):
        return np.asarray(x)
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _sharded_runner(fns: ClientFns, clients_per_chunk: int, mesh: Mesh, reduce: Reduce,
                    options: dict):
    local = _chunked(fns, clients_per_chunk, reduce)

    def per_device(params, inputs):
        sums, stats = local(params, *inputs)
        return jax.lax.psum(sums, CLIENT_AXIS), stats

    # The one collective is the psum of the sums; clients are independent, so the
    # varying-axis type check, which would make every carry and custom VJP spell out
    # its axis, is off.
    mapped = jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(CLIENT_AXIS)),
                               out_specs=(P(), P(CLIENT_AXIS)), check_vma=False), options)
    over_clients, replicated = NamedSharding(mesh, P(CLIENT_AXIS)), NamedSharding(mesh, P())
    # Dropping the padding gathers the results (an uneven split is not a sharding):
    # a client count that is a multiple of the device count keeps them sharded.
    slice_to = jax.jit(lambda tree, n: jax.tree_util.tree_map(lambda a: a[:n], tree),
                       static_argnums=1)

    def run(params, specs, data, keys):
        n = keys.shape[0]
        valid = jnp.arange(n + (-n % mesh.size)) < n
        inputs = _put((*_pad_clients((specs, data, keys), mesh.size), valid), over_clients)
        sums, stats = mapped(_put(params, replicated), inputs)
        return sums, (stats if valid.shape[0] == n else slice_to(stats, n))

    return run


def compiled_peak_bytes(fns: ClientFns, params, specs, data: ClientData, keys: jax.Array, *,
                        clients_per_chunk: int, reduce: Reduce | None = None,
                        xla: str = "auto") -> int:
    """XLA's peak bytes for one ``vmap`` round of these clients: compiled for this backend, never run.

    Inputs, outputs (less what reuses an input) and the temporaries' arena
    (``peak_bytes``).

    Args:
      fns: the client update (``client.make_client_fns``).
      params: the global parameter pytree.
      specs: the clients' specs, leading client axis.
      data: the clients' ``ClientData``, leading client axis.
      keys: PRNG keys, one per client.
      clients_per_chunk: clients trained at once (0 = all).
      reduce, xla: as in ``make_round_runner``.

    Returns:
      The peak in bytes.
    """
    local = _chunked(fns, clients_per_chunk, reduce or _stack)
    run = jit(lambda p, s, d, k: local(p, s, d, k, jnp.ones(k.shape[0], bool)),
              compiler_options(xla))
    return peak_bytes(run.lower(params, specs, data, keys).compile())


def peak_bytes(compiled) -> int:
    """Everything a compiled program holds at once, by XLA's buffer assignment.

    Inputs, outputs less what reuses a (donated) input, and the temporaries' arena.

    Args:
      compiled: a compiled program (``jax.jit(f).lower(...).compile()``).

    Returns:
      The peak in bytes.
    """
    m = compiled.memory_analysis()
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
               - m.alias_size_in_bytes)


def size_text(nbytes: float) -> str:
    """Bytes for people: GiB from 1 GiB up, else MiB.

    Args:
      nbytes: a byte count.

    Returns:
      e.g. ``"1.50 GiB"`` or ``"12.0 MiB"``.
    """
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"


def _host_available_bytes() -> int:
    """The kernel's estimate of RAM available without swapping (Linux ``MemAvailable``)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    raise RuntimeError("cannot tell how much host memory is available; set "
                       "config.engine.memory_budget_gb")


def memory_budget(fraction: float = 0.9) -> int:
    """``fraction`` of the memory still free on the first local device.

    That is its allocator's limit less what is in use (on a GPU, JAX's pool: 75 % of
    the card by default), or on a CPU the host's available RAM (shared by forced
    host devices).

    Args:
      fraction: the share of the free memory to budget.

    Returns:
      The budget in bytes.

    Raises:
      RuntimeError: the device reports neither (no allocator limit, or a CPU host
        whose available RAM cannot be read), asking for an explicit budget
        (``config.engine.memory_budget_gb``).
    """
    device = jax.local_devices()[0]
    stats = device.memory_stats() or {}
    if "bytes_limit" in stats:
        free = stats["bytes_limit"] - stats.get("bytes_in_use", 0)
    elif device.platform == "cpu":
        free = _host_available_bytes() // max(1, jax.local_device_count())
    else:
        raise RuntimeError(f"{device.device_kind} reports no memory limit; set "
                           "config.engine.memory_budget_gb")
    return int(fraction * free)


def chunk_candidates(n: int) -> list[int]:
    """Chunk sizes worth trying for n clients.

    For each number of chunks k, the smallest chunk that needs only k (⌈n/k⌉). A
    size between two of these runs as many chunks as the larger-count one, so it
    costs memory without saving a step.

    Args:
      n: the number of clients.

    Returns:
      The sizes, ascending.
    """
    return sorted({-(-n // k) for k in range(1, n + 1)})


def fit_chunk(fns: ClientFns, params, specs, data: ClientData, keys: jax.Array, *,
              budget_bytes: int, reduce: Reduce | None = None,
              xla: str = "auto") -> tuple[int, int]:
    """The most clients trained at once whose ``vmap`` round fits ``budget_bytes``.

    Tries only ``chunk_candidates(n)``. All at once is taken when it fits; otherwise a
    binary search over the candidates, one compile per probe (about log₂ of their number:
    XLA's peak grows with the chunk, as each client in it holds its own parameters,
    optimiser state, gradients and activations). Compiling costs time, not memory: a model
    far too big to run still gets its answer.

    Args:
      fns, params, specs, data, keys, reduce, xla: as in ``compiled_peak_bytes``.
      budget_bytes: the memory budget, e.g. ``memory_budget()``.

    Returns:
      ``(clients_per_chunk, its compiled peak bytes)``; 0 = all of them at once.

    Raises:
      MemoryError: one client at a time does not fit.
    """
    n = keys.shape[0]
    seen: dict[int, int] = {}

    def peak(c):
        if c not in seen:
            seen[c] = compiled_peak_bytes(fns, params, specs, data, keys, reduce=reduce,
                                          clients_per_chunk=0 if c == n else c, xla=xla)
        return seen[c]

    if peak(1) > budget_bytes:
        raise MemoryError(f"one client at a time needs {size_text(peak(1))} by XLA's "
                          f"compiled peak; the budget is {size_text(budget_bytes)}")
    if peak(n) <= budget_bytes:
        return 0, peak(n)
    sizes = chunk_candidates(n)
    lo, hi = 0, len(sizes) - 1          # sizes[lo] fits, sizes[hi] does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if peak(sizes[mid]) <= budget_bytes else (lo, mid)
    return sizes[lo], peak(sizes[lo])


def make_round_runner(fns: ClientFns, strategy: str = "auto", *, clients_per_chunk: int = 0,
                      mesh: Mesh | None = None, reduce: Reduce | None = None,
                      xla: str = "auto") -> RoundRunner:
    """A function ``(params, specs, data, keys) -> ClientResult`` (stacked per client).

    Args:
      fns: the client update (``client.make_client_fns``).
      strategy: one of ``STRATEGIES`` (see the module docstring).
      clients_per_chunk: (vmap, sharded; 0 = all at once) bounds how many clients
        train at once per device.
      mesh: (sharded) defaults to ``client_mesh()``.
      reduce: one client's ``ClientResult`` → ``(sums, stats)``, jit-able: the runner
        returns ``(Σ over clients of sums, stats stacked per client)`` instead, and
        never holds more than a chunk of client results.
      xla: one of ``XLA_SETTINGS``: the programs compile with ``compiler_options(xla)``.

    Returns:
      The runner. Its inputs carry a leading client axis (``specs``, ``data``,
      ``keys``); ``params`` has none. Without ``reduce`` it returns a
      ``ClientResult`` stacked on that axis.

    Raises:
      ValueError: an unknown strategy or a ``clients_per_chunk`` that is not an int ≥ 0.
    """
    strategy = resolve_strategy(strategy)
    if isinstance(clients_per_chunk, bool) or not isinstance(clients_per_chunk, int) \
            or clients_per_chunk < 0:
        raise ValueError(f"clients_per_chunk = {clients_per_chunk!r} must be an integer ≥ 0")
    options = compiler_options(xla)
    stacking = reduce is None
    reduce = _stack if stacking else reduce
    if strategy == "loop":
        run = _loop_runner(fns, reduce, options)
    elif strategy == "sharded":
        run = _sharded_runner(fns, clients_per_chunk, mesh or client_mesh(), reduce, options)
    else:
        run = jit(program_runner(fns, strategy, clients_per_chunk=clients_per_chunk,
                                 reduce=reduce), options)
    if not stacking:
        return run
    return lambda params, specs, data, keys: run(params, specs, data, keys)[1]
