"""Orbax resumption: a killed run, restarted, equals the uninterrupted run bit for bit."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "configs"))
import default as default_config  # noqa: E402
from helpers import override, read_scalars  # noqa: E402

from fiarse_jax.experiment import checkpoint, train  # noqa: E402
from fiarse_jax.experiment.config import ConfigError  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROUNDS = 12


def tiny(**over):
    c = default_config.get_config()
    c.num_rounds, c.eval_every, c.checkpoint_every, c.keep_checkpoints = ROUNDS, 4, 1, 2
    c.client.local_steps = 5
    # Test sets scored one sample per batch: one compile of the scorer per run, not one per
    # remainder length (the MLP has no batch statistics: the same numbers).
    c.eval.batch_size = 1
    return override(c, **over)


def final_params(workdir):
    """The params of the run's last checkpoint, read with plain Orbax (no template)."""
    d = os.path.join(workdir, "checkpoints")
    step = max(int(s) for s in os.listdir(d) if s.isdigit())
    with ocp.CheckpointManager(d, item_names=("state", "meta")) as mngr:
        state = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    return step, {k: {n: np.asarray(a) for n, a in v.items()} for k, v in state["params"].items()}


def metrics(workdir, name="metrics.jsonl"):
    """A JSON-lines file's rows without wall-clock fields (timing is not a result)."""
    with open(os.path.join(workdir, name)) as f:
        rows = [json.loads(line) for line in f]
    for r in rows:
        r.pop("elapsed_s", None)
        r.pop("round_time_s", None)
    return rows


def assert_same_run(a, b):
    sa, pa = final_params(a)
    sb, pb = final_params(b)
    assert sa == sb == ROUNDS
    for layer in pa:
        for name in pa[layer]:
            np.testing.assert_array_equal(pa[layer][name], pb[layer][name])  # bit for bit
    assert metrics(a) == metrics(b)
    assert metrics(a, "rounds.jsonl") == metrics(b, "rounds.jsonl")
    assert [r["round"] for r in metrics(b, "rounds.jsonl")] == list(range(1, ROUNDS + 1))
    assert [m["round"] for m in metrics(b)] == list(range(4, ROUNDS + 1, 4))  # no duplicates


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run."""
    w = str(tmp_path_factory.mktemp("uninterrupted"))
    train.train_and_evaluate(tiny(), w, progress=False)
    return w


def test_sigkill_mid_run_then_resume_is_bit_identical(reference, tmp_path):
    w = str(tmp_path / "killed")
    cmd = [sys.executable, "-m", "fiarse_jax", "--config", os.path.join(REPO, "configs", "default.py"),
           "--workdir", w, f"--config.num_rounds={ROUNDS}", "--config.eval_every=4",
           "--config.checkpoint_every=1", "--config.keep_checkpoints=2",
           "--config.client.local_steps=5", "--config.eval.batch_size=1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=REPO)
    ckdir = os.path.join(w, "checkpoints")
    deadline = time.time() + 240
    # Kill right after the round-7 checkpoint is committed: with a save every round, the
    # next async save is typically in flight, so this is also a kill during a save (and
    # the evaluation of round 8 may be logged: it must not be doubled either).
    while not os.path.isdir(os.path.join(ckdir, "7")):
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.time() < deadline
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    steps = sorted(int(s) for s in os.listdir(ckdir) if s.isdigit())
    assert steps and max(steps) < ROUNDS, f"the run finished before the kill: {steps}"

    train.train_and_evaluate(tiny(), w, progress=False)
    assert_same_run(reference, w)
    # TensorBoard: what the killed run logged after its checkpoint is purged, not doubled.
    tb, ref = read_scalars(os.path.join(w, "tensorboard")), read_scalars(os.path.join(reference, "tensorboard"))
    assert [s for s, _ in tb["train_loss"]] == list(range(1, ROUNDS + 1))
    assert tb["global_accuracy"] == ref["global_accuracy"]


def test_partial_save_and_corrupt_latest_fall_back(reference, tmp_path, capsys):
    w = str(tmp_path / "corrupt")
    train.train_and_evaluate(tiny(num_rounds=6), w, progress=False)
    ckdir = os.path.join(w, "checkpoints")
    assert sorted(os.listdir(ckdir)) == ["5", "6"]
    # A save killed half-way leaves an uncommitted temporary directory ...
    shutil.copytree(os.path.join(ckdir, "6"), os.path.join(ckdir, "7.orbax-checkpoint-tmp-99"))
    # ... and the committed latest one gets damaged on disk.
    for root, _, files in os.walk(os.path.join(ckdir, "6", "state")):
        for f in files:
            with open(os.path.join(root, f), "wb") as fh:
                fh.write(b"garbage")
    summary = train.train_and_evaluate(tiny(), w, progress=False)
    err = capsys.readouterr().err
    assert "checkpoint at round 6 is unreadable" in err and "falling back" in err
    assert summary["resumed_from_round"] == 5
    assert not any("tmp" in s for s in os.listdir(ckdir))
    assert_same_run(reference, w)


def test_extending_num_rounds_continues_the_run(reference, tmp_path):
    w = str(tmp_path / "extended")
    train.train_and_evaluate(tiny(num_rounds=4), w, progress=False)
    summary = train.train_and_evaluate(tiny(), w, progress=False)
    assert summary["resumed_from_round"] == 4
    assert_same_run(reference, w)


def test_mismatched_config_is_refused_naming_fields(tmp_path):
    w = str(tmp_path / "run")
    train.train_and_evaluate(tiny(num_rounds=3), w, progress=False)
    before = sorted(os.listdir(os.path.join(w, "checkpoints")))
    with pytest.raises(ConfigError, match=r"client\.learning_rate: checkpoint 0.1, now 0.05; seed: checkpoint 0, now 5"):
        train.train_and_evaluate(tiny(num_rounds=3, seed=5, **{"client.learning_rate": 0.05}), w,
                                 progress=False)
    with pytest.raises(ConfigError, match=r"config.num_rounds = 2: .* already at round 3"):
        train.train_and_evaluate(tiny(num_rounds=2), w, progress=False)
    # A change of shapes is refused from the metadata, before any array is read, and
    # the checkpoints are kept (not mistaken for corrupt ones).
    with pytest.raises(ConfigError, match=r"model.hidden_sizes: checkpoint \[128\], now \[64\]"):
        train.train_and_evaluate(tiny(num_rounds=3, **{"model.hidden_sizes": (64,)}), w,
                                 progress=False)
    with pytest.raises(ConfigError, match="data.num_clients"):
        train.train_and_evaluate(tiny(num_rounds=3, **{"data.num_clients": 40}), w, progress=False)
    # Saving no checkpoints still resumes from the ones there.
    with pytest.raises(ConfigError, match="seed"):
        train.train_and_evaluate(tiny(num_rounds=3, seed=5, checkpoint_every=0), w, progress=False)
    assert sorted(os.listdir(os.path.join(w, "checkpoints"))) == before  # nothing written


def test_config_differences_ignores_safe_fields():
    a = tiny().to_dict()
    b = tiny(num_rounds=99, eval_every=7, checkpoint_every=3, **{"engine.strategy": "vmap"}).to_dict()
    assert checkpoint.config_differences(a, b) == []
    b = tiny(**{"model.hidden_sizes": (64,)}).to_dict()
    assert checkpoint.config_differences(a, b) == ["model.hidden_sizes: checkpoint [128], now [64]"]


def test_checkpoint_every_zero_writes_none(tmp_path):
    train.train_and_evaluate(tiny(num_rounds=2, checkpoint_every=0), str(tmp_path), progress=False)
    assert not (tmp_path / "checkpoints").exists()


def test_restart_from_round_zero_replaces_old_tensorboard_events(tmp_path):
    w = str(tmp_path / "run")
    train.train_and_evaluate(tiny(num_rounds=3), w, progress=False)
    shutil.rmtree(os.path.join(w, "checkpoints"))      # e.g. killed before its first save
    train.train_and_evaluate(tiny(num_rounds=5), w, progress=False)
    assert [s for s, _ in read_scalars(os.path.join(w, "tensorboard"))["train_loss"]] == [1, 2, 3, 4, 5]


def test_checkpoint_from_before_a_field_existed_resumes_only_with_its_old_behaviour():
    """A field added later (client.weight_decay) is absent from older checkpoints: they
    resume when the field holds what the code did without it (AdamW's 1e-4), not otherwise."""
    adamw = {"client.optimizer": "adamw"}
    old = tiny(**adamw).to_dict()
    del old["client"]["weight_decay"], old["client"]["betas"]
    assert checkpoint.config_differences(old, tiny(**adamw).to_dict()) == []
    now = tiny(**adamw, **{"client.weight_decay": 0.0}).to_dict()
    assert checkpoint.config_differences(old, now) == [
        "client.weight_decay: checkpoint '<absent>', now 0.0"]



def test_sections_the_run_does_not_read_may_differ_on_resume():
    """Other methods' options, other aggregators' options and AdamW's fields under SGD are
    never read, so a change there resumes; a change of the run's own sections does not."""
    a = tiny().to_dict()
    b = tiny(**{"scalefl.depth_exponent": 0.25, "heterofl.scaler": True,
                "server.trimmed_mean.beta": 0.1, "client.betas": (0.9, 0.95)}).to_dict()
    assert checkpoint.config_differences(a, b) == []
    b = tiny(**{"fiarse.gradient": "masked", "client.optimizer": "adamw"}).to_dict()
    assert checkpoint.config_differences(a, b) == [
        "client.optimizer: checkpoint 'sgd', now 'adamw'",
        "fiarse.gradient: checkpoint 'tcb', now 'masked'"]


def test_a_checkpoint_of_an_older_format_is_refused_in_one_line(tmp_path):
    """Checkpoints written before the named random streams (no ``format`` in their meta)
    cannot continue as they began: refused, naming the format, nothing overwritten."""
    w = str(tmp_path / "run")
    train.train_and_evaluate(tiny(num_rounds=2), w, progress=False)
    d = os.path.join(w, "checkpoints")
    for step in (s for s in os.listdir(d) if s.isdigit()):
        path = os.path.join(d, step, "meta", "metadata")
        meta = json.load(open(path))
        assert meta["format"] == checkpoint.FORMAT
        del meta["format"]
        json.dump(meta, open(path, "w"))
    before = sorted(os.listdir(d))
    with pytest.raises(ConfigError, match="checkpoint has format 1, this fiarse-jax writes 2"
                       ) as err:
        train.train_and_evaluate(tiny(num_rounds=3), w, progress=False)
    assert "\n" not in str(err.value) and sorted(os.listdir(d)) == before
