"""The paper's maths: importance thresholds and masks (``masks``), the sub-model
x ⊙ 1[|x| ≥ θ] and its gradients (``fiarse``), structural units, the holder average
(``server``), the capacity levels, and the named random streams.

Layer 1: imports only ``utils``.
"""
