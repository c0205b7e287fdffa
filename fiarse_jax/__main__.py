"""``python -m fiarse_jax`` is the ``fiarse-jax`` command."""
from fiarse_jax.cli.main import run

run()
