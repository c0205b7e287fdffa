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

Every program compiles with ``xla.compiler_options(xla)`` (per-backend XLA options; on CPU
convolutions run on Eigen rather than YNNPACK); the mesh and replication are
``devices``', the memory budget and compiled peaks ``memory``'s.
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

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from fiarse_jax.data.types import ClientData
from fiarse_jax.federated.client import ClientFns, ClientResult, client_update
from fiarse_jax.federated.devices import CLIENT_AXIS, client_mesh, put
from fiarse_jax.federated.memory import chunk_candidates, peak_bytes, size_text
from fiarse_jax.federated.xla import compiler_options, jit

STRATEGIES = ("auto", "loop", "vmap", "sharded")


@dataclasses.dataclass(frozen=True)
class EngineOptions:
    """How a round's clients run (``config.engine``; defaults: configs/default.py's).

    Attributes:
      strategy: ``loop``, ``vmap``, ``sharded`` or ``auto`` (``resolve_strategy``).
      clients_per_chunk: clients trained at once per device (0: all), or ``"auto"``: the
        most that fit ``memory_budget_gb`` (``fit_chunk``).
      memory_budget_gb: the budget of ``"auto"`` (0: 90 % of the free device memory).
      dtype: the clients' compute dtype (``client.COMPUTE_DTYPES``).
      xla: ``auto`` (``compiler_options``' per-backend choices) or ``default``.
      reduce: the server's inputs: ``stream`` (summed while clients train), ``stack``
        (every client's update first) or ``auto`` (stream where the server rule allows).
    """

    strategy: str = "auto"
    clients_per_chunk: int | str = 0
    memory_budget_gb: float = 0.0
    dtype: str = "float32"
    xla: str = "auto"
    reduce: str = "auto"
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
        inputs = put((*_pad_clients((specs, data, keys), mesh.size), valid), over_clients)
        sums, stats = mapped(put(params, replicated), inputs)
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
      xla: one of ``xla.XLA_SETTINGS``: the programs compile with ``compiler_options(xla)``.

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
