"""Memory for people and for budgets: XLA's compiled peak of a program, the memory
still free on a device (the ``"auto"`` client chunk's budget), the chunk sizes
worth trying, and byte counts as text.
"""
from __future__ import annotations

import jax


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
