"""fiarse_jax: FIARSE (Wu et al., NeurIPS 2024) model-heterogeneous federated learning in JAX.

Public surface (see each module's docstring):
* ``masks``: importance thresholds and masks (one pass serves every capacity).
* ``fiarse``: the sub-model x ⊙ 1[|x| ≥ θ] with the paper's Eq. 3 or masked gradient.
* ``policies``: extraction methods behind one ``MaskPolicy`` interface.
* ``client`` / ``engine`` / ``server``: the pure client update, execution strategies
  (loop, vmap, chunked, sharded), holder-average aggregation.
* ``aggregators`` / ``validation`` / ``privacy`` / ``attacks`` / ``server_round``: mask-aware
  robust rules, update screening, DP-FedAvg with an accountant, attack simulation, and the
  server step that combines them.
* ``train.train_and_evaluate``: the experiment loop.
"""
from fiarse_jax.fiarse import submodel
from fiarse_jax.masks import default_maskable, importance_mask, importance_threshold, importance_thresholds
from fiarse_jax.policies import MaskPolicy, build_policy
from fiarse_jax.server import aggregate

__version__ = "0.1.0"

__all__ = ["MaskPolicy", "__version__", "aggregate", "build_policy", "default_maskable",
           "importance_mask", "importance_threshold", "importance_thresholds", "submodel"]
