"""Plumbing every layer may use: one-line errors, local or ``gs://`` paths, Hugging Face
downloads, and the options checker that reads a builder's signature.

Layer 0: imports nothing else of ``fiarse_jax``.
"""
