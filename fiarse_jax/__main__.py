"""``python -m fiarse_jax`` is the ``fiarse-jax`` command."""
from fiarse_jax.main import run

run()
