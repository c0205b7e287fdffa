"""The command line (``main``) and the experiment drivers and reports it runs: ``compare``,
``reproduce``, ``robustness``, ``plots``, ``report`` and ``catalog``.

Layer 6: the top; nothing in the package imports it.
"""
