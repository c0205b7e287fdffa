"""The federated round: what rounds are built from (``run``: ``Run`` and its typed
``Options``), the pure client update (``client``), the strategies that run it over many
clients (``engine``, with ``xla`` options, ``devices`` and ``memory`` beside it), the
server step (``server_round``), the algorithm object that chains them (``algorithm``) and
the per-capacity evaluation (``evaluate``).

Layer 4: imports the layers below it.
"""
