"""Running an experiment: the config (``config``, the one place a ``ConfigDict`` is
checked), building a run from it (``build``), the training loop (``train``), Orbax
checkpoints, metrics and summaries, and exporting sub-models.

Layer 5: imports the layers below it.
"""
