"""The federated round: the pure client update (``client``), the strategies that run it
over many clients (``engine``), the server step (``server_round``), the algorithm object
that chains them (``algorithm``) and the per-capacity evaluation (``evaluate``).

Layer 4: imports the layers below it.
"""
