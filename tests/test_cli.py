"""The command line as a user runs it (a real subprocess)."""
import importlib.metadata
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "default.py")


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "fiarse_jax", "--config", CONFIG, *args],
                          capture_output=True, text=True, timeout=300, cwd=REPO)


def test_cli_runs_and_prints_table(tmp_path):
    r = run_cli("--workdir", str(tmp_path), "--config.num_rounds=2", "--config.eval_every=1")
    assert r.returncode == 0, r.stderr[-2000:]
    for text in ("capacity 1/16", "capacity 1/4", "full model", "local test"):
        assert text in r.stdout, r.stdout
    assert (tmp_path / "summary.json").exists() and (tmp_path / "metrics.jsonl").exists()


def test_cli_bad_value_is_one_line_and_writes_nothing(tmp_path):
    workdir = tmp_path / "run"
    r = run_cli("--workdir", str(workdir), "--config.data.alpha=-1")
    assert r.returncode == 2
    assert "config.data.alpha = -1.0: must be a finite number > 0" in r.stderr
    assert "Traceback" not in r.stderr
    assert not workdir.exists()


def test_console_script_is_declared():
    eps = importlib.metadata.entry_points(group="console_scripts")
    assert any(ep.name == "fiarse-jax" and ep.value == "fiarse_jax.cli.main:run" for ep in eps)


def test_cli_unknown_field_is_one_line(tmp_path):
    workdir = tmp_path / "run"
    r = run_cli("--workdir", str(workdir), "--config.client.learning_rat=3")
    assert r.returncode == 2
    assert "unknown config field in --config.client.learning_rat=3" in r.stderr
    assert 'Did you mean "learning_rate"' in r.stderr
    assert "Traceback" not in r.stderr and not workdir.exists()


def cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "fiarse_jax", *args], capture_output=True,
                          text=True, timeout=300, cwd=REPO, **kw)


@pytest.mark.parametrize("command", [None, "train", "compare", "reproduce", "robustness", "plot",
                                     "export", "list", "config"])
def test_help_for_the_command_and_every_subcommand_exits_0(command, capsys):
    from fiarse_jax.cli import main
    argv = ["fiarse-jax"] + ([command] if command else []) + ["-h" if command else "--help"]
    with pytest.raises(SystemExit) as done:
        main._parse_flags(argv)
    assert done.value.code == 0
    out = capsys.readouterr().out
    if command is None:
        assert all(f"  {c} " in out for c in main.COMMANDS) and "example: fiarse-jax" in out
    else:
        assert out.startswith(f"fiarse-jax {command}: ") and "\nexample: fiarse-jax" in out
        assert all(f"--{n} (required)" in out for n in main._NEEDS[command])


def test_help_list_and_config_from_the_shell(tmp_path):
    r = cli("--help")
    assert r.returncode == 0 and r.stdout.startswith("fiarse-jax: ") and not r.stderr.strip()
    r = cli("list")
    assert r.returncode == 0, r.stderr
    from fiarse_jax import models, policies
    from fiarse_jax.data.registry import DATASETS
    from fiarse_jax.robust import aggregators, attacks
    for name in [*policies.METHODS, *models.MODELS, *DATASETS, *aggregators.AGGREGATORS,
                 *attacks.KINDS]:
        assert f"\n  {name} " in r.stdout, name
    assert "options: scope='global', gradient='tcb'" in r.stdout   # fiarse's, with defaults
    r = cli("config", "--config", CONFIG, "--config.method=heterofl", "--config.num_rounds=7")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert "method = 'heterofl'" in lines and "num_rounds = 7" in lines
    assert "fiarse.gradient = 'tcb'" in lines and "capacities = (1.0, 0.25, 0.0625)" in lines
    # Another model family from the command line: its defaults, then the given fields.
    r = cli("config", "--config", CONFIG, "--config.model.name=cnn", "--config.model.features=(8,)")
    assert r.returncode == 0, r.stderr
    assert [l for l in r.stdout.splitlines() if l.startswith("model.")] == [
        "model.features = (8,)", "model.name = 'cnn'"]
    r = cli("config", "--config", CONFIG, "--config.model.name=cnn", "--config.model.hiddn=(8,)")
    assert r.returncode == 2 and "config.model.hiddn = (8,): is not a field of model 'cnn'" in r.stderr
    r = cli("config", "--config", CONFIG, "--config.client.batch_size=0")
    assert r.returncode == 2 and r.stderr.startswith("fiarse-jax: error: config.client.batch_size")
    assert len(r.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("text,arg,message", [
    (None, "", "no such file"),
    ("x = (\n", "", "cannot read it as Python at line 1"),
    ("x = 1\n", "", "defines no get_config()"),
    ("def get_config(arg):\n    raise ValueError(f'config argument {arg!r}: expected a|b')\n",
     ":c", "config argument 'c': expected a|b")])
def test_a_bad_config_file_is_one_line(tmp_path, capsys, text, arg, message):
    from fiarse_jax.cli import main
    path = tmp_path / "cfg.py"
    if text is not None:
        path.write_text(text)
    try:
        with pytest.raises(SystemExit) as done:
            main._parse_flags(["fiarse-jax", "--config", f"{path}{arg}", "--workdir",
                               str(tmp_path / "w")])
    finally:
        main.flags.FLAGS.unparse_flags()   # absl's flags are global: leave them unparsed
    assert done.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("fiarse-jax: error: ") and message in err, err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "w").exists()


def test_a_second_run_into_a_busy_workdir_and_ctrl_c_are_one_line_each(tmp_path):
    import signal
    import time
    work = tmp_path / "run"
    # SIGINT back to its default in the child: a test run started in the background (nohup,
    # `&`) ignores it, and a Python started with it ignored never raises KeyboardInterrupt.
    p = subprocess.Popen([sys.executable, "-m", "fiarse_jax", "--config", CONFIG, "--workdir",
                          str(work), "--config.num_rounds=100000", "--config.eval_every=2",
                          "--config.checkpoint_every=2", "--config.tensorboard=False"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    def saved():   # any finished checkpoint (only the last two are kept: 2 may be gone)
        d = work / "checkpoints"
        return d.is_dir() and any(n.isdigit() for n in os.listdir(d))

    deadline = time.time() + 240
    while time.time() < deadline and not saved():
        time.sleep(0.2)
    assert saved(), "the run saved no checkpoint in 240 s"
    # A second run into the same workdir: refused, naming the holder, touching nothing.
    before = {f.name: f.stat().st_mtime_ns for f in work.iterdir() if f.is_file()}
    r = cli("--config", CONFIG, "--workdir", str(work), "--config.num_rounds=100000",
            "--config.seed=1")
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip().splitlines() == [r.stderr.strip()]
    assert f"is in use by process {p.pid} on " in r.stderr and "--workdir" in r.stderr
    assert json.loads((work / "config.json").read_text())["seed"] == 0
    assert not any(f.stat().st_mtime_ns != before[f.name] for f in work.iterdir()
                   if f.name in before and f.name not in ("metrics.jsonl", "rounds.jsonl"))
    p.send_signal(signal.SIGINT)
    try:
        _, err = p.communicate(timeout=120)
    finally:
        p.kill()
    assert p.returncode == 130, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("fiarse-jax: interrupted; the last checkpoint is round ")
    assert last.endswith(": rerun the same command to resume from it") and "Traceback" not in err
    saved = max(int(n) for n in os.listdir(work / "checkpoints") if n.isdigit())
    assert f"round {saved}:" in last


def test_an_interrupt_logged_with_its_traceback_is_dropped_other_errors_kept():
    """Ctrl-C during Orbax's wait for a save: Orbax logs the KeyboardInterrupt with its
    traceback (seen in CI); that record is dropped, any other error still shows."""
    import logging

    from absl import logging as absl_logging

    from fiarse_jax.cli.main import quiet_interrupts

    seen = []
    handler = logging.Handler()
    handler.emit = seen.append
    logger = absl_logging.get_absl_logger()
    logger.addHandler(handler)
    try:
        quiet_interrupts()
        quiet_interrupts()   # once only
        for exc in (KeyboardInterrupt(), RuntimeError("disk full")):
            try:
                raise exc
            except BaseException:
                absl_logging.exception("Save Finalize thread failed.")
    finally:
        logger.removeHandler(handler)
    assert [r.exc_info[1].args for r in seen] == [("disk full",)]
    assert sum(type(f).__name__ == "_DropInterrupts" for f in logger.filters) == 1


def test_benchmark_suite_quick_runs_and_writes_json_and_png(tmp_path):
    """The benchmark suite stays runnable (timings are not asserted): the sharded strategy
    in a child process with forced host devices, XLA's FLOP count, the threshold timing,
    the compiled memory of a round."""
    out = tmp_path / "suite.json"
    r = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "suite.py"), "--quick",
                        "--sections", "strategies,masks,memory", "--strategies", "sharded",
                        "--no-torch", "--host-devices", "2", "--memory-models", "cnn",
                        "--memory-chunks", "1", "--out", str(out)],
                       capture_output=True, text=True, timeout=600, cwd=REPO)
    assert r.returncode == 0, r.stderr[-2000:]
    import json
    result = json.loads(out.read_text())
    (row,) = result["strategies"]
    assert "error" not in row, row
    assert row["strategy"] == "sharded" and row["devices"] == 2 and row["round_s"] > 0
    assert row["step_gflops"] > 0 and row["num_params"] == 38282
    assert result["masks"][0]["num_params"] == 10**6 and result["masks"][0]["prepare_s"] > 0
    assert [(x["chunk"], x["reduce"]) for x in result["memory"]] == [(1, "stack"), (1, "stream")]
    assert all(x["compiled_peak_mb"] > 0 for x in result["memory"])
    assert (tmp_path / "suite.png").stat().st_size > 0


def test_benchmark_memory_measure_sees_the_round_inputs_and_streaming_save_memory():
    """The memory section's measurement compiles (never runs) the program a vmap round
    runs in training (streamed: the whole round; stacked: the clients' program): XLA saw
    the round's inputs (plus the clients' keys and specs, a few bytes), and streaming the
    server's inputs needs no more than stacking them (in-process; the CLI path runs in the
    quick suite test above)."""
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    import suite
    rows = [{"model": "mlp", "clients": 4, **suite.measure_compiled(
        {"kind": "compiled", "model": "mlp", "clients": 4, "steps": 2, "samples": 20,
         "batch": 20, "strategy": "vmap", "chunk": chunk, "reduce": reduce})}
        for chunk in (1, 2) for reduce in ("stack", "stream")]
    assert [x["program"] for x in rows] == ["clients", "round"] * 2
    for x in rows:
        # the arguments are the params and the clients' data (plus round numbers, ids, keys)
        assert x["argument_mb"] == pytest.approx(x["inputs_mb"], abs=1e-3)
        assert x["compiled_peak_mb"] > x["argument_mb"]
    for chunk in (1, 2):
        stack, stream = (x for x in rows if x["chunk"] == chunk)
        assert stream["compiled_peak_mb"] <= stack["compiled_peak_mb"]
    suite._with_per_client(rows)
    assert [("per_client_mb" in x) for x in rows] == [False, False, True, True]


def test_the_model_switch_reads_values_as_the_new_models_field_types(capsys):
    from fiarse_jax.cli import main
    argv = ["fiarse-jax", "--config", CONFIG, "--config.model.name", "mlp",
            "--config.model.early_exits=FALSE", "--config.model.hidden_sizes=64", "--workdir", "w"]
    assert main.take_model_switch(argv) == ["fiarse-jax", "--config", CONFIG, "--workdir", "w"]
    assert main._MODEL_SWITCH == {"name": "mlp", "early_exits": "FALSE", "hidden_sizes": "64"}
    assert main._model_value("mlp", "early_exits", "FALSE") is False
    assert main._model_value("mlp", "hidden_sizes", "64") == (64,)
    assert main._model_value("cnn", "features", "[8, 16]") == (8, 16)
    assert main._model_value("resnet18", "conv", "patches") == "patches"
    # No model.name, or no --config: nothing is taken, and a stale switch is cleared.
    plain = ["fiarse-jax", "--config", CONFIG, "--config.model.hidden_sizes=(8,)"]
    assert main.take_model_switch(plain) is plain and main._MODEL_SWITCH == {}
    bare = ["fiarse-jax", "--config.model.name=cnn"]
    assert main.take_model_switch(bare) is bare
    with pytest.raises(SystemExit) as done:
        main._model_value("mlp", "early_exits", "maybe")
    assert done.value.code == 2
    assert "--config.model.early_exits=maybe: expected true or false" in capsys.readouterr().err
