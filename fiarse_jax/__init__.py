"""fiarse_jax: FIARSE (Wu et al., NeurIPS 2024) model-heterogeneous federated learning in JAX.

Packages by layer; each imports only the layers above it in this list (checked by
``tests/test_imports.py``):
* ``utils``: one-line errors, local or ``gs://`` paths, downloads, the options checker.
* ``core``: the paper's maths: importance thresholds and masks, the sub-model
  x ⊙ 1[|x| ≥ θ] with Eq. 3 or the masked gradient, the holder average, capacity levels,
  named random streams.
* ``data`` / ``models`` / ``policies``: registries of datasets, models and extraction
  methods (every method a ``MaskPolicy``).
* ``robust``: mask-aware robust aggregators, update screening, reputation, attacks, DP.
* ``federated``: the client update, the strategies running it over clients (loop, vmap,
  chunked, sharded), the server step, the algorithm object, evaluation per capacity.
* ``experiment``: config, building a run, the training loop, checkpoints, metrics, export.
* ``cli``: the ``fiarse-jax`` command and the experiment drivers.
"""
from fiarse_jax.core.fiarse import submodel
from fiarse_jax.core.masks import (
           default_maskable,
           importance_mask,
           importance_threshold,
           importance_thresholds,
)
from fiarse_jax.core.server import aggregate
from fiarse_jax.policies import MaskPolicy, build_policy

__version__ = "0.1.0"

__all__ = ["MaskPolicy", "__version__", "aggregate", "build_policy", "default_maskable",
           "importance_mask", "importance_threshold", "importance_thresholds", "submodel"]
