"""Command line (kept thin on purpose, as flax/examples: flags in, a library call, a table out).

  fiarse-jax --config configs/default.py --workdir runs/default
  fiarse-jax compare --config configs/default.py --methods fiarse,heterofl,fedrolex \
      --workdir runs/cmp

Any config field can be overridden, e.g.
``--config.num_rounds=3 --config.fiarse.gradient=masked``.
"""
from __future__ import annotations

import logging
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from fiarse_jax import compare, report, train
from fiarse_jax.config import ConfigError

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (a Python file with get_config()).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for metrics and the summary.")
_METHODS = flags.DEFINE_list("methods", None, "With `compare`: the methods to run, comma-separated.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
    # absl turns INFO on; JAX then logs every backend it probes (TPU, CUDA) as noise.
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
    absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax logs every save at INFO
    command = argv[1] if len(argv) > 1 else "train"
    if command not in ("train", "compare") or len(argv) > 2:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}; "
                             "the only sub-command is `compare`")
    if (command == "compare") != (_METHODS.value is not None):
        raise app.UsageError("--methods goes with (and only with) the `compare` sub-command")
    try:
        if command == "compare":
            result = compare.compare(_CONFIG.value, _METHODS.value, _WORKDIR.value)
            print(result["table"])
            print("wrote " + ", ".join(result["plots"]))
            return
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
