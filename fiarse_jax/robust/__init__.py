"""Robustness and privacy around the server step: mask-aware robust aggregators, update
screening, client reputation, simulated attacks, and DP-FedAvg with its accountant.

Layer 3: imports ``utils``, ``core``, ``data``, ``models`` and ``policies``.
"""
