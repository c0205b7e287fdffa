"""Capacity levels: their labels and which clients hold which (a leaf module: NumPy only).

A capacity r is the fraction of the maskable parameters a level's sub-model keeps;
``capacity_label(r)`` names it as the paper does ('1', '1/4', '1/64', or '0.64'),
``label_value`` reads a label back, ``by_size`` orders labels smallest first (the paper's
tables), and ``assign_capacities`` gives clients their levels in equal contiguous blocks
fixed for the run (the authors': clients 1–25 → 1, 26–50 → 1/4, ...).
"""
from __future__ import annotations

from collections.abc import Iterable

import numpy as np


def capacity_label(r: float) -> str:
    """'1', '1/4', '1/16' when 1/r is an integer (to 1e-9), else the decimal ('0.64')."""
    inv = 1.0 / r
    if abs(inv - round(inv)) < 1e-9 * inv:
        return "1" if round(inv) == 1 else f"1/{round(inv)}"
    return f"{r:.6g}"


def label_value(label: str) -> float:
    """A label's capacity: '1/4' -> 0.25, '0.64' -> 0.64 (``capacity_label``'s inverse)."""
    if "/" in label:
        a, b = label.split("/")
        return float(a) / float(b)
    return float(label)


def by_size(labels: Iterable[str]) -> list[str]:
    """Capacity labels, smallest first (as the paper's tables)."""
    return sorted(labels, key=label_value)


def assign_capacities(num_clients: int, num_levels: int) -> np.ndarray:
    """Level index per client in equal contiguous blocks (clients 0..N/L−1 → level 0, …)."""
    return (np.arange(num_clients) * num_levels) // num_clients
