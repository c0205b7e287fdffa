"""Command line (kept thin on purpose, as flax/examples: flags in, a library call, a table out).

  fiarse-jax --config configs/default.py --workdir runs/default   # train (resumes if DIR has checkpoints)
  fiarse-jax compare --config configs/default.py --methods fiarse,heterofl,fedrolex \
      --workdir runs/cmp
  fiarse-jax robustness --config configs/default.py --workdir runs/robust  # attacks × rules, DP
  fiarse-jax reproduce --config configs/cifar10_cpu.py --config.data.data_dir=PATH \
      --workdir runs/repro --seeds 0,1,2   # the paper's table beside ours, mean ± std
  fiarse-jax plot --workdir runs/default [--out DIR --format pdf]   # figures, also mid-run
  fiarse-jax export --workdir runs/default --capacity 1/4 --out sub.npz
  fiarse-jax list                                                    # methods, models, data, ...
  fiarse-jax config --config configs/default.py --config.method=heterofl   # resolved, checked
  fiarse-jax --distributed --config ... --workdir gs://BUCKET/run  # every host of a TPU pod

Any config field can be overridden, e.g.
``--config.num_rounds=3 --config.fiarse.gradient=masked``.
"""
from __future__ import annotations

import ast
import logging
import os
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from fiarse_jax.cli import catalog, compare, plots, report, reproduce, robustness
from fiarse_jax.experiment import checkpoint, export, train
from fiarse_jax.experiment.config import ConfigError, validate_config

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (a Python file with get_config()).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for metrics and the summary.")
_METHODS = flags.DEFINE_list("methods", None, "With `compare`: the methods to run, comma-separated; "
                             "with `reproduce` (optional): the variants to run.")
_SEEDS = flags.DEFINE_string("seeds", None, "With `compare` and `reproduce`: run every method "
                             "once per seed, e.g. 0,1,2 (partition, initialisation and sampling "
                             "follow the seed); tables show mean ± std over seeds.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "With `train`, `compare` and `reproduce`: "
                               "start over, removing what an earlier run left in the workdir "
                               "(checkpoints, metrics, summary, plots) instead of resuming.")
_CAPACITY = flags.DEFINE_string("capacity", None, "With `export`: the capacity, e.g. 1/4 or 0.25.")
_OUT = flags.DEFINE_string("out", None, "With `export`: the .npz file to write; with `plot`: "
                           "the folder for the figures (default: the workdir).")
_FORMAT = flags.DEFINE_enum("format", None, ["png", "pdf", "svg"], "With `plot`: the figures' "
                            "format (png at 150 dpi, or vector pdf/svg; default png).")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Call jax.distributed.initialize() first: one process per host of a "
    "TPU pod or GPU cluster, all with the same command and a workdir every host sees (gs://). "
    "Cloud TPU finds its coordinator itself; elsewhere give --coordinator, --num_processes "
    "and --process_id.")
_COORDINATOR = flags.DEFINE_string("coordinator", None, "With --distributed: host:port of "
                                   "process 0 (default: detected, or JAX_COORDINATOR_ADDRESS).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "With --distributed: the processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "With --distributed: this process's index.")

#: command -> (what it does, an example); ``train`` is the default.
COMMAND_HELP = {
    "train": ("train one method and evaluate it (the default command; rerun to resume)",
              "fiarse-jax --config configs/default.py --workdir runs/default"),
    "compare": ("several methods on one seed, partition and schedule: a table and plots",
                "fiarse-jax compare --config configs/default.py --methods fiarse,heterofl "
                "--workdir runs/cmp --seeds 0,1,2"),
    "reproduce": ("the paper's comparison, every cell of the paper's table beside ours",
                  "fiarse-jax reproduce --config configs/cifar10_cpu.py "
                  "--config.data.data_dir=PATH --workdir runs/c10_cpu --seeds 0,1,2"),
    "robustness": ("attacks × aggregation rules and DP on one config: a table and a plot",
                   "fiarse-jax robustness --config configs/default.py --workdir runs/robust"),
    "plot": ("figures of a run, finished, running or stopped",
             "fiarse-jax plot --workdir runs/default --out figs --format pdf"),
    "export": ("one capacity's sub-model as an .npz file",
               "fiarse-jax export --workdir runs/default --capacity 1/4 --out sub.npz"),
    "list": ("the methods, models, datasets, aggregation rules and attacks, with options",
             "fiarse-jax list"),
    "config": ("print the resolved, validated config; runs nothing",
               "fiarse-jax config --config configs/default.py --config.method=heterofl"),
}
COMMANDS = tuple(COMMAND_HELP)
#: flags each sub-command needs (and only it, or a command of ``_MAY``, may get).
_NEEDS = {"train": {"config", "workdir"}, "compare": {"config", "methods", "workdir"},
          "reproduce": {"config", "workdir"}, "robustness": {"config", "workdir"},
          "plot": {"workdir"}, "export": {"capacity", "out", "workdir"}, "list": set(),
          "config": {"config"}}
#: flags a sub-command may get without needing them.
_MAY = {"reproduce": {"methods", "seeds", "overwrite"}, "compare": {"seeds", "overwrite"},
        "train": {"overwrite"}, "plot": {"out", "format"}}
_FLAGS = {"config": _CONFIG, "workdir": _WORKDIR, "methods": _METHODS, "capacity": _CAPACITY,
          "out": _OUT, "seeds": _SEEDS, "overwrite": _OVERWRITE, "format": _FORMAT}


def help_text(command: str | None) -> str:
    """``--help``: the commands (``command`` None), or one command's flags and example."""
    if command is None:
        width = max(map(len, COMMANDS))
        return "\n".join(
            ["fiarse-jax: FIARSE and model-heterogeneous federated learning baselines in JAX.",
             "", "usage: fiarse-jax [COMMAND] [--config FILE[:ARG]] [--workdir DIR] "
             "[--config.FIELD=VALUE ...]", "", "commands:"]
            + [f"  {c:<{width}}  {what}" for c, (what, _) in COMMAND_HELP.items()]
            + ["", "`fiarse-jax COMMAND --help` shows a command's flags and an example;",
               "`fiarse-jax list` the methods, models and datasets; any config field can be",
               "overridden, e.g. --config.num_rounds=3 --config.method=heterofl.",
               "", "example: " + COMMAND_HELP["train"][1]]) + "\n"
    what, example = COMMAND_HELP[command]
    names = sorted(_NEEDS[command]) + sorted(_MAY.get(command, set()))
    lines = [f"fiarse-jax {command}: {what}", "", "flags:"]
    for n in names:
        need = "required" if n in _NEEDS[command] else "optional"
        lines.append(f"  --{n} ({need}): {' '.join(flags.FLAGS[_FLAGS[n].name].help.split())}")
    if "config" in _NEEDS[command]:
        lines.append("  --config.FIELD=VALUE: override one config field (any number of them)")
    if command == "train":
        lines.append("  --distributed [--coordinator H:P --num_processes N --process_id I]: "
                     "one process per host")
    return "\n".join(lines + ["", "example: " + example]) + "\n"


def main(argv: list[str]) -> None:
    # absl turns INFO on; JAX then logs every backend it probes (TPU, CUDA) as noise.
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
    absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax logs every save at INFO
    quiet_interrupts()
    command = argv[1] if len(argv) > 1 else "train"
    if command not in COMMANDS or len(argv) > 2:
        _fail(f"unexpected arguments: {' '.join(argv[1:])}; "
              f"sub-commands: {', '.join(COMMANDS)} (train is the default)")
    given = {n for n, f in _FLAGS.items() if f.value not in (None, False)}
    for name in sorted(_NEEDS[command] - given):
        _fail(f"`{command}` needs --{name}")
    for name in sorted(given - _NEEDS[command] - _MAY.get(command, set())):
        _fail(f"--{name} does not go with `{command}`")
    if _CONFIG.value is not None and _MODEL_SWITCH:
        switch_model_family(_CONFIG.value, _MODEL_SWITCH)
    cluster = {"coordinator": _COORDINATOR.value, "num_processes": _NUM_PROCESSES.value,
               "process_id": _PROCESS_ID.value}
    if _DISTRIBUTED.value:
        initialize_distributed(**cluster)
    elif any(v is not None for v in cluster.values()):
        raise app.UsageError("--coordinator, --num_processes and --process_id go with "
                             "--distributed")
    try:
        run_command(command)
    except (ConfigError, FileNotFoundError) as e:
        _fail(str(e))
    except PermissionError as e:   # a read-only --out or workdir
        _fail(f"cannot write {repr(e.filename) if e.filename else 'a file'} "
              f"({e.strerror or e})")
    except train.TrainingError as e:
        print(f"fiarse-jax: error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print(f"fiarse-jax: interrupted; {interrupted_note(command, _WORKDIR.value)}",
              file=sys.stderr, flush=True)
        sys.stdout.flush()
        # Now, without interpreter shutdown: a checkpoint save still in flight would print
        # its thread's error after this line (the step it writes is not a checkpoint yet).
        os._exit(130)


class _DropInterrupts(logging.Filter):
    """Drops a log record carrying a ``KeyboardInterrupt`` (Orbax logs one with its
    traceback when Ctrl-C lands while it waits for a save); ``main`` says it in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], KeyboardInterrupt))


def quiet_interrupts() -> None:
    """Installs ``_DropInterrupts`` on absl's logger (the one Orbax logs to), once."""
    logger = absl_logging.get_absl_logger()
    if not any(isinstance(f, _DropInterrupts) for f in logger.filters):
        logger.addFilter(_DropInterrupts())


def interrupted_note(command: str, workdir: str | None) -> str:
    """What a Ctrl-C left, and how to go on (one line)."""
    if command not in ("train", "compare", "reproduce", "robustness") or not workdir:
        return "nothing to resume"
    if command != "train":
        return ("rerun the same command to go on: every run resumes from its last checkpoint "
                "(compare and reproduce read finished runs back)")
    try:
        saved = checkpoint.saved_rounds(workdir)
    except OSError:
        saved = []
    if not saved:
        return "no checkpoint was saved yet: rerun the same command to start again"
    return f"the last checkpoint is round {max(saved)}: rerun the same command to resume from it"


#: ``--config.model.name=X`` and the other ``--config.model.FIELD=V`` of the command line,
#: taken out of absl's hands (``_parse_flags``): the config file's model section may not
#: have X's fields, so they are applied after the switch (``switch_model_family``).
_MODEL_SWITCH: dict[str, str] = {}


def take_model_switch(argv: list[str]) -> list[str]:
    """``argv`` without its ``--config.model.*`` overrides when one sets ``model.name``
    and a ``--config`` is given (kept in ``_MODEL_SWITCH``); unchanged otherwise. Both
    ``--config.model.F=V`` and ``--config.model.F V`` count; ``--noconfig.model.F`` is
    refused there (one line: say ``=false``)."""
    _MODEL_SWITCH.clear()
    joined, i = [], 0
    while i < len(argv):   # "--config.model.F V" -> "--config.model.F=V"
        a = argv[i]
        if (a.startswith("--config.model.") and "=" not in a and i + 1 < len(argv)
                and not argv[i + 1].startswith("-")):
            joined.append(f"{a}={argv[i + 1]}")
            i += 2
            continue
        joined.append(a)
        i += 1
    given = {a[len("--config.model."):].split("=", 1)[0]: a.split("=", 1)[1]
             for a in joined if a.startswith("--config.model.") and "=" in a}
    if "name" not in given or _config_arg(argv) is None:
        return argv
    negated = [a for a in joined if a.startswith("--noconfig.model.")]
    if negated:
        _fail(f"{negated[0]}: with --config.model.name give "
              f"--config.model.{negated[0][len('--noconfig.model.'):]}=false")
    _MODEL_SWITCH.update(given)
    return [a for a in joined if not (a.startswith("--config.model.") and "=" in a)]


def _model_value(name: str, field: str, text: str):
    """``text`` as model ``name``'s field: a bool field takes true/false/1/0 (any case), a
    tuple field a literal tuple or one number; else a Python literal, or the text."""
    import dataclasses

    from fiarse_jax import models
    cls = models.MODELS.get(name)
    default = next((f.default for f in dataclasses.fields(cls) if f.name == field), None) \
        if cls is not None else None
    if isinstance(default, bool):
        low = text.strip().lower()
        if low in ("true", "1", "yes", "false", "0", "no"):
            return low in ("true", "1", "yes")
        _fail(f"--config.model.{field}={text}: expected true or false")
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text
    if isinstance(default, tuple):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return (value,)
        if isinstance(value, list):
            return tuple(value)
    return value


def switch_model_family(config, given: dict[str, str]) -> None:
    """``--config.model.name=X``: the model section becomes X's defaults (every field the
    config file set is dropped), then the command line's ``--config.model.*`` apply, read
    as X's field types (``_model_value``)."""
    name = given["name"]
    with config.unlocked():
        for k in list(config.model.keys()):
            del config.model[k]
        for k, text in given.items():
            config.model[k] = text if k == "name" else _model_value(name, k, text)


def flat_fields(d: dict, prefix: str = "") -> list[tuple[str, object]]:
    """``(dotted.field, value)`` of a config dict, in order: the names ``--config.`` takes."""
    out = []
    for k, v in d.items():
        if isinstance(v, dict):
            out += flat_fields(v, f"{prefix}{k}.")
        else:
            out.append((f"{prefix}{k}", v))
    return out


def run_command(command: str) -> None:
    """Run one sub-command on the parsed flags."""
    if command == "list":
        print(catalog.text(), end="")
    elif command == "config":
        validate_config(_CONFIG.value)
        print("\n".join(f"{k} = {v!r}" for k, v in flat_fields(_CONFIG.value.to_dict())))
    elif command == "compare":
        result = compare.compare(_CONFIG.value, _METHODS.value, _WORKDIR.value,
                                 seeds=compare.parse_seeds(_SEEDS.value),
                                 overwrite=_OVERWRITE.value)
        print(result["table"])
        print("wrote " + ", ".join(result["plots"]))
        if result["failures"]:
            sys.exit(1)
    elif command == "reproduce":
        result = reproduce.reproduce(_CONFIG.value, _WORKDIR.value, _METHODS.value,
                                     seeds=compare.parse_seeds(_SEEDS.value),
                                     overwrite=_OVERWRITE.value)
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
        out = _OUT.value or _WORKDIR.value
        try:
            written = plots.plot_run(_WORKDIR.value, _OUT.value, _FORMAT.value or "png")
        except PermissionError as e:
            raise ConfigError(f"cannot write the figures to {out!r} ({e.strerror}): pass "
                              "--out DIR to write them elsewhere") from None
        print("wrote " + ", ".join(written))
    elif command == "export":
        info = export.export_submodel(_WORKDIR.value, _CAPACITY.value, _OUT.value)
        print(f"wrote {_OUT.value} ({info['file_bytes']:,} bytes) and its .json: "
              f"{info['method']} capacity {info['label']} after round {info['round']}, "
              f"{info['params_held']:,} of {info['params_total']:,} parameters held"
              + (f", dense sub-model {info['dense_params']:,}" if "dense_params" in info else ""))
    else:
        report.print_summary(train.train_and_evaluate(_CONFIG.value, _WORKDIR.value,
                                                      overwrite=_OVERWRITE.value))


def initialize_distributed(coordinator: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> None:
    """``jax.distributed.initialize`` for a multi-host run (``--distributed``): the given
    values, or JAX's detection (Cloud TPU, SLURM, Open MPI) for the ones left None."""
    import jax
    jax.distributed.initialize(coordinator, num_processes=num_processes, process_id=process_id)


def _fail(message: str) -> None:
    print(f"fiarse-jax: error: {message}", file=sys.stderr)
    sys.exit(2)


def _config_arg(argv: list[str]) -> str | None:
    """The value of ``--config`` in ``argv`` (either form), or None."""
    for i, a in enumerate(argv):
        if a.startswith("--config="):
            return a.split("=", 1)[1]
        if a == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def check_config_file(value: str) -> None:
    """A missing config file, one with a syntax error or one without ``get_config``: one
    line (exit 2) before absl loads it."""
    path = value.split(":", 1)[0]
    if not os.path.isfile(path):
        _fail(f"--config {value}: no such file {path!r}")
    try:
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
    except (SyntaxError, UnicodeDecodeError, OSError) as e:
        where = f" at line {e.lineno}" if getattr(e, "lineno", None) else ""
        _fail(f"--config {value}: cannot read it as Python{where}: "
              f"{getattr(e, 'msg', None) or e}")
    if not any(isinstance(n, ast.FunctionDef) and n.name == "get_config" for n in tree.body):
        _fail(f"--config {value}: {path!r} defines no get_config() (a config file is a Python "
              "file whose get_config() returns an ml_collections.ConfigDict)")


def _root_cause(e: BaseException) -> BaseException:
    seen = set()
    while (e.__cause__ or e.__context__) is not None and id(e) not in seen:
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return e


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's parser, but ``-h``/``--help`` print our help (exit 0), and a bad config file,
    a config argument it refuses or an unknown ``--config.FIELD`` is one line (exit 2)."""
    if "-h" in argv[1:] or "--help" in argv[1:]:
        command = next((a for a in argv[1:] if a in COMMANDS), None)
        print(help_text(command), end="")
        sys.exit(0)
    value = _config_arg(argv)
    if value is not None:
        check_config_file(value)
    switched = take_model_switch(argv)
    if switched is not argv and argv is sys.argv:   # config_flags reads sys.argv's overrides
        sys.argv[:] = switched
    argv = switched
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:   # absl wraps what get_config raised (a bad config argument)
        cause = _root_cause(e)
        _fail(" ".join(str(cause if cause is not e else e).split()))
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
