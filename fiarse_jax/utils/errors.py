"""The errors a run stops with in one line (``main`` prints them without a traceback)."""


class ConfigError(ValueError):
    """A config field (or a flag such as ``--workdir``) holds a value the run cannot use."""
