"""``--workdir gs://bucket/run``: every file of a run goes through ``etils.epath``.

No network: ``helpers.mock_gcs`` maps ``gs://X`` to ``STORE/X`` (a local directory) for
epath and for Orbax, which then takes its Cloud Storage code path, as on a real bucket.
"""
import importlib.util
import json
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "configs"))
import default as default_config  # noqa: E402
from helpers import mock_gcs, override, read_scalars  # noqa: E402

from fiarse_jax.cli import plots  # noqa: E402
from fiarse_jax.experiment import build, checkpoint, export, train
from fiarse_jax.experiment.config import ConfigError  # noqa: E402
from fiarse_jax.experiment.metrics import read_jsonl  # noqa: E402
from fiarse_jax.utils import paths

RUN = "gs://bucket/run"
TIMING = ("elapsed_s", "round_time_s")


def tiny(num_rounds=4, **over):
    c = default_config.get_config()
    c.num_rounds, c.eval_every, c.checkpoint_every, c.keep_checkpoints = num_rounds, 2, 2, 2
    c.client.local_steps = 3
    return override(c, **over)


def rows(workdir, name="metrics.jsonl"):
    out = read_jsonl(os.path.join(workdir, name))
    for r in out:
        for k in TIMING:
            r.pop(k, None)
    return out


def test_gs_workdir_run_resume_plots_export(tmp_path):
    """One run in a local workdir; the same run in gs://bucket/run stopped after round 2 and
    resumed to round 4: same rows, same TensorBoard scalars; plot and export read it."""
    store, local = str(tmp_path / "store"), str(tmp_path / "local")
    train.train_and_evaluate(tiny(), local, progress=False)
    with mock_gcs(store):
        train.train_and_evaluate(tiny(num_rounds=2), RUN, progress=False)
        first = rows(RUN), rows(RUN, "rounds.jsonl")
        summary = train.train_and_evaluate(tiny(), RUN, progress=False)
        resumed = rows(RUN), rows(RUN, "rounds.jsonl")
        assert summary["resumed_from_round"] == 2

        # Same rows as the local run: before the stop (a prefix) and after the resume (all).
        want = rows(local), rows(local, "rounds.jsonl")
        assert [m["round"] for m in want[0]] == [2, 4] and [r["round"] for r in want[1]] == [1, 2, 3, 4]
        assert first == (want[0][:1], want[1][:2])
        assert resumed == want
        on_store = os.path.join(store, "bucket", "run")
        for name in ("partition.json", "summary.json", "metrics.jsonl", "rounds.jsonl"):
            assert os.path.isfile(os.path.join(on_store, name)), name
        assert not [n for n in os.listdir(on_store) if n.startswith(".fiarse_probe")]
        assert json.loads(paths.read_text(f"{RUN}/partition.json")) == json.load(
            open(os.path.join(local, "partition.json")))
        assert checkpoint.has_checkpoints(RUN)
        assert sorted(os.listdir(os.path.join(on_store, "checkpoints"))) == ["2", "4"]

        # TensorBoard: events written locally, uploaded to workdir/tensorboard/; the resumed
        # run's purge supersedes the first run's events exactly as in a local workdir.
        got = read_scalars(os.path.join(on_store, "tensorboard"))
        ref = read_scalars(os.path.join(local, "tensorboard"))
        assert sorted(got) == sorted(ref) and "global_accuracy" in got
        for tag in ref:
            assert [s for s, _ in got[tag]] == [s for s, _ in ref[tag]], tag
            if tag not in TIMING:
                assert got[tag] == ref[tag], tag

        # plot reads it and writes PNGs into the bucket.
        pngs = plots.plot_run(RUN)
        assert pngs and all(p.startswith(RUN + "/") for p in pngs)
        for p in pngs:
            assert paths.read_bytes(p)[:8] == b"\x89PNG\r\n\x1a\n", p

        # export reads the checkpoint from the bucket and writes there; load reads it back.
        out = "gs://bucket/exports/sub.npz"
        info = export.export_submodel(RUN, "1/4", out)
        assert info["round"] == 4 and os.path.getsize(os.path.join(store, "bucket/exports/sub.npz")) \
            == info["file_bytes"]
        sub = export.load_submodel(out)
        assert sub.info == info
        x = np.zeros((2, *info["input_shape"]), np.float32)
        assert sub.predict(x).shape == (2, info["num_classes"])

    # The local export of the local run holds the same arrays.
    info_local = export.export_submodel(local, "1/4", str(tmp_path / "sub.npz"))
    with np.load(tmp_path / "sub.npz") as a, np.load(os.path.join(store, "bucket/exports/sub.npz")) as b:
        assert sorted(a.files) == sorted(b.files)
        for k in a.files:
            np.testing.assert_array_equal(a[k], b[k])
    assert info_local["params_held"] == info["params_held"]


def test_unwritable_bucket_is_one_line_before_any_work(tmp_path, monkeypatch):
    def no_build(*a, **k):
        raise AssertionError("the run started before the workdir was checked")

    monkeypatch.setattr(build, "build_run", no_build)
    with mock_gcs(str(tmp_path / "store"), deny="gs://forbidden"), pytest.raises(ConfigError) as err:
        train.train_and_evaluate(tiny(), "gs://forbidden/run", progress=False)
    msg = str(err.value)
    assert "\n" not in msg and "'gs://forbidden/run'" in msg and "PermissionError" in msg


def test_local_workdir_probe_leaves_nothing(tmp_path):
    """The probe creates missing local directories and removes them again."""
    paths.check_workdir(str(tmp_path / "a" / "b"))
    assert os.listdir(tmp_path) == []
    os.chmod(tmp_path, 0o500)
    try:
        if os.access(tmp_path, os.W_OK):
            pytest.skip("running as a user that ignores permissions (root)")
        with pytest.raises(ConfigError, match="is not writable"):
            paths.check_workdir(str(tmp_path / "run"))
    finally:
        os.chmod(tmp_path, 0o700)


@pytest.mark.skipif(any(importlib.util.find_spec(m) for m in ("gcsfs", "tensorflow")),
                    reason="a gs:// backend is installed (the check would reach the network)")
def test_no_gs_backend_is_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)   # nothing may land in the working directory either
    with pytest.raises(ConfigError) as err:
        train.train_and_evaluate(tiny(), "gs://no-such-bucket/run", progress=False)
    assert "\n" not in str(err.value) and "'gs://no-such-bucket/run'" in str(err.value)
    assert "gcsfs" in str(err.value)
    assert os.listdir(tmp_path) == []


@pytest.mark.skipif(importlib.util.find_spec("google.cloud.storage") is not None,
                    reason="google-cloud-storage is installed (the check would reach the network)")
def test_orbax_without_storage_client_is_one_line(tmp_path):
    """Orbax lists a gs:// checkpoint directory with the google-cloud-storage client."""
    with mock_gcs(str(tmp_path / "store"), bucket_check=True), pytest.raises(ConfigError) as err:
        checkpoint.RunCheckpoints(RUN)
    assert "\n" not in str(err.value) and "google-cloud-storage" in str(err.value)


def test_local_dir_for_uploads_and_cleans_up(tmp_path):
    """The profiler's route to a gs:// directory: a local directory, uploaded on exit."""
    store = str(tmp_path / "store")
    with mock_gcs(store), paths.local_dir_for("gs://bucket/run/profile") as d:
        os.makedirs(os.path.join(d, "plugins", "profile"))
        with open(os.path.join(d, "plugins", "profile", "t.xplane.pb"), "wb") as f:
            f.write(b"trace")
    with open(os.path.join(store, "bucket/run/profile/plugins/profile/t.xplane.pb"), "rb") as f:
        assert f.read() == b"trace"
    assert not os.path.exists(d)
