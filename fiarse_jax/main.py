"""Command line (kept thin on purpose, as flax/examples: flags in, a library call, a table out).

  fiarse-jax --config configs/default.py --workdir runs/default   # train (resumes if DIR has checkpoints)
  fiarse-jax compare --config configs/default.py --methods fiarse,heterofl,fedrolex \
      --workdir runs/cmp
  fiarse-jax robustness --config configs/default.py --workdir runs/robust  # attacks × rules, DP
  fiarse-jax reproduce --config configs/cifar10_cpu.py --config.data.data_dir=PATH \
      --workdir runs/repro --seeds 0,1,2   # the paper's table beside ours, mean ± std
  fiarse-jax plot --workdir runs/default                            # PNGs of a finished run
  fiarse-jax export --workdir runs/default --capacity 1/4 --out sub.npz
  fiarse-jax --distributed --config ... --workdir gs://BUCKET/run  # every host of a TPU pod

Any config field can be overridden, e.g.
``--config.num_rounds=3 --config.fiarse.gradient=masked``.
"""
from __future__ import annotations

import logging
import os
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from fiarse_jax import compare, export, plots, report, reproduce, robustness, train
from fiarse_jax.config import ConfigError

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (a Python file with get_config()).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for metrics and the summary.")
_METHODS = flags.DEFINE_list("methods", None, "With `compare`: the methods to run, comma-separated; "
                             "with `reproduce` (optional): the variants to run.")
_SEEDS = flags.DEFINE_string("seeds", None, "With `compare` and `reproduce`: run every method "
                             "once per seed, e.g. 0,1,2 (partition, initialisation and sampling "
                             "follow the seed); tables show mean ± std over seeds.")
_CAPACITY = flags.DEFINE_string("capacity", None, "With `export`: the capacity, e.g. 1/4 or 0.25.")
_OUT = flags.DEFINE_string("out", None, "With `export`: the .npz file to write.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Call jax.distributed.initialize() first: one process per host of a "
    "TPU pod or GPU cluster, all with the same command and a workdir every host sees (gs://). "
    "Cloud TPU finds its coordinator itself; elsewhere give --coordinator, --num_processes "
    "and --process_id.")
_COORDINATOR = flags.DEFINE_string("coordinator", None, "With --distributed: host:port of "
                                   "process 0 (default: detected, or JAX_COORDINATOR_ADDRESS).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "With --distributed: the processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "With --distributed: this process's index.")
flags.mark_flags_as_required(["workdir"])

COMMANDS = ("train", "compare", "reproduce", "robustness", "plot", "export")
#: flags each sub-command needs (and only it, or a command of ``_MAY``, may get).
_NEEDS = {"train": {"config"}, "compare": {"config", "methods"}, "reproduce": {"config"},
          "robustness": {"config"}, "plot": set(), "export": {"capacity", "out"}}
#: flags a sub-command may get without needing them.
_MAY = {"reproduce": {"methods", "seeds"}, "compare": {"seeds"}}


def main(argv: list[str]) -> None:
    # absl turns INFO on; JAX then logs every backend it probes (TPU, CUDA) as noise.
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
    absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax logs every save at INFO
    command = argv[1] if len(argv) > 1 else "train"
    if command not in COMMANDS or len(argv) > 2:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}; "
                             f"sub-commands: {', '.join(COMMANDS)} (train is the default)")
    given = {n for n, f in (("config", _CONFIG), ("methods", _METHODS), ("capacity", _CAPACITY),
                            ("out", _OUT), ("seeds", _SEEDS)) if f.value is not None}
    for name in sorted(_NEEDS[command] - given):
        raise app.UsageError(f"`{command}` needs --{name}")
    for name in sorted(given - _NEEDS[command] - _MAY.get(command, set())):
        raise app.UsageError(f"--{name} does not go with `{command}`")
    cluster = {"coordinator": _COORDINATOR.value, "num_processes": _NUM_PROCESSES.value,
               "process_id": _PROCESS_ID.value}
    if _DISTRIBUTED.value:
        initialize_distributed(**cluster)
    elif any(v is not None for v in cluster.values()):
        raise app.UsageError("--coordinator, --num_processes and --process_id go with "
                             "--distributed")
    try:
        if command == "compare":
            result = compare.compare(_CONFIG.value, _METHODS.value, _WORKDIR.value,
                                     seeds=compare.parse_seeds(_SEEDS.value))
            print(result["table"])
            print("wrote " + ", ".join(result["plots"]))
            if result["failures"]:
                sys.exit(1)
        elif command == "reproduce":
            result = reproduce.reproduce(_CONFIG.value, _WORKDIR.value, _METHODS.value,
                                         seeds=compare.parse_seeds(_SEEDS.value))
            print(result["table"])
            print("wrote " + ", ".join(
                [os.path.join(_WORKDIR.value, "reproduction.md")] + result["plots"]))
            if result["failures"]:
                sys.exit(1)
        elif command == "robustness":
            result = robustness.robustness(_CONFIG.value, _WORKDIR.value)
            print(result["table"])
            print(f"wrote {result['plot']}")
        elif command == "plot":
            print("wrote " + ", ".join(plots.plot_run(_WORKDIR.value)))
        elif command == "export":
            info = export.export_submodel(_WORKDIR.value, _CAPACITY.value, _OUT.value)
            print(f"wrote {_OUT.value} ({info['file_bytes']:,} bytes) and its .json: "
                  f"{info['method']} capacity {info['label']} after round {info['round']}, "
                  f"{info['params_held']:,} of {info['params_total']:,} parameters held"
                  + (f", dense sub-model {info['dense_params']:,}" if "dense_params" in info else ""))
        else:
            report.print_summary(train.train_and_evaluate(_CONFIG.value, _WORKDIR.value))
    except (ConfigError, FileNotFoundError) as e:
        print(f"fiarse-jax: error: {e}", file=sys.stderr)
        sys.exit(2)
    except train.TrainingError as e:
        print(f"fiarse-jax: error: {e}", file=sys.stderr)
        sys.exit(1)


def initialize_distributed(coordinator: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> None:
    """``jax.distributed.initialize`` for a multi-host run (``--distributed``): the given
    values, or JAX's detection (Cloud TPU, SLURM, Open MPI) for the ones left None."""
    import jax
    jax.distributed.initialize(coordinator, num_processes=num_processes, process_id=process_id)


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
