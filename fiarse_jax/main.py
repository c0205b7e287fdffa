"""Command line: ``fiarse-jax --config configs/default.py --workdir runs/default``.

Kept thin on purpose (as flax/examples): flags in, ``train_and_evaluate`` does
the work, a table out. Any config field can be overridden, e.g.
``--config.num_rounds=3 --config.fiarse.gradient=masked``.
"""
from __future__ import annotations

import logging
import sys

from absl import app, flags
from ml_collections import config_flags

from fiarse_jax import report, train
from fiarse_jax.config import ConfigError

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (a Python file with get_config()).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for metrics and the summary.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
    # absl turns INFO on; JAX then logs every backend it probes (TPU, CUDA) as noise.
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    try:
        summary = train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    except ConfigError as e:
        print(f"fiarse-jax: error: {e}", file=sys.stderr)
        sys.exit(2)
    except train.TrainingError as e:
        print(f"fiarse-jax: error: {e}", file=sys.stderr)
        sys.exit(1)
    report.print_summary(summary)


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's parser, but an unknown ``--config.FIELD`` is one line, not a traceback."""
    try:
        return app.parse_flags_with_usage(argv)
    except (KeyError, AttributeError) as e:
        overrides = " ".join(a for a in argv[1:] if a.startswith("--config."))
        while e.args and isinstance(e.args[0], BaseException):  # AttributeError(KeyError)
            e = e.args[0]
        reason = " ".join(str(e.args[0] if e.args else e).split())
        print(f"fiarse-jax: error: unknown config field in {overrides}: {reason}",
              file=sys.stderr)
        sys.exit(2)


def run() -> None:
    """Console-script entry point."""
    app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
    run()
