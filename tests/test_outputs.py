"""What a run leaves behind: per-round metrics, TensorBoard events, plots, sub-model export."""
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "configs"))
import default as default_config  # noqa: E402
import digits_scalefl  # noqa: E402
from helpers import read_scalars, record_builds  # noqa: E402

from fiarse_jax.cli import plots  # noqa: E402
from fiarse_jax.experiment import export, train
from fiarse_jax.experiment.config import ConfigError  # noqa: E402
from fiarse_jax.experiment.metrics import read_jsonl  # noqa: E402
from fiarse_jax.federated import algorithm

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny(method="fiarse", rounds=6):
    c = (digits_scalefl if method == "scalefl" else default_config).get_config()
    c.method, c.num_rounds, c.eval_every, c.checkpoint_every = method, rounds, 3, 3
    c.client.local_steps = 5
    # Test sets scored one sample per batch: one compile of the scorer per run, not one per
    # remainder length (the MLP has no batch statistics: the same numbers).
    c.eval.batch_size = 1
    return c


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = {}
    for method in ("fiarse", "heterofl", "scalefl"):
        w = str(tmp_path_factory.mktemp(method))
        out[method] = (w, train.train_and_evaluate(tiny(method), w, progress=False))
    return out


def test_round_rows_and_tensorboard_events(runs):
    w, summary = runs["fiarse"]
    rows = read_jsonl(os.path.join(w, "rounds.jsonl"))
    assert [r["round"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert all(r["update_norm_max"] >= r["update_norm_mean"] > 0 for r in rows)
    # The eval rows' train loss is the round row's of the same round.
    evals = read_jsonl(os.path.join(w, "metrics.jsonl"))
    assert [e["train_loss"] for e in evals] == [rows[2]["train_loss"], rows[5]["train_loss"]]
    tb = read_scalars(os.path.join(w, "tensorboard"))
    assert {"train_loss", "global_accuracy", "local_accuracy/1/4", "update_norm_mean"} <= set(tb)
    assert [s for s, _ in tb["global_accuracy"]] == [3, 6]
    assert [v for _, v in tb["global_accuracy"]] == pytest.approx(  # stored as float32
        [e["global_accuracy"] for e in evals], rel=1e-6)
    assert [s for s, _ in tb["update_norm_mean"]] == [1, 2, 3, 4, 5, 6]


def test_update_norms_match_numpy():
    rng = np.random.default_rng(0)
    deltas = {"a": {"kernel": rng.normal(size=(3, 4, 5))}, "b": {"bias": rng.normal(size=(3, 2))}}
    want = np.sqrt((deltas["a"]["kernel"] ** 2).sum((1, 2)) + (deltas["b"]["bias"] ** 2).sum(1))
    np.testing.assert_allclose(algorithm.update_norms(jax.tree_util.tree_map(np.float32, deltas)),
                               want, rtol=1e-5)


def test_kept_fraction_per_layer_matches_mask_counts(runs):
    w, summary = runs["heterofl"]
    per_layer = summary["kept_fraction_per_layer"]
    # HeteroFL at 1/4 on MLP 64-128-10: Dense_0 keeps 32 of 128 units (kernel 64×32 + bias 32),
    # Dense_1 keeps 32 of 128 input rows of its 128×10 kernel and its whole bias.
    assert per_layer["1/4"]["Dense_0"] == pytest.approx((64 * 32 + 32) / (64 * 128 + 128))
    assert per_layer["1/4"]["Dense_1"] == pytest.approx((32 * 10 + 10) / (128 * 10 + 10))
    assert per_layer["1"] == {"Dense_0": 1.0, "Dense_1": 1.0}


def test_plot_command_writes_nonempty_pngs(runs):
    w, _ = runs["fiarse"]
    r = subprocess.run([sys.executable, "-m", "fiarse_jax", "plot", "--workdir", w],
                       capture_output=True, text=True, timeout=300, cwd=REPO)
    assert r.returncode == 0, r.stderr[-2000:]
    for name in ("accuracy_vs_round.png", "loss_vs_round.png", "kept_per_layer.png"):
        path = os.path.join(w, name)
        assert path in r.stdout and os.path.getsize(path) > 10_000
    with pytest.raises(FileNotFoundError, match="no summary.json"):
        plots.plot_run(os.path.join(w, "checkpoints"))


def test_plot_a_stopped_run_elsewhere_as_pdf_and_a_read_only_workdir_is_one_line(runs, tmp_path):
    import shutil
    w, _ = runs["fiarse"]
    stopped = tmp_path / "stopped"
    shutil.copytree(w, stopped, ignore=shutil.ignore_patterns("*.png", "checkpoints"))
    (stopped / "summary.json").unlink()          # a run still going (or killed): no summary
    written = plots.plot_run(str(stopped), str(tmp_path / "figs"), "pdf")
    assert [os.path.basename(p) for p in written] == ["accuracy_vs_round.pdf",
                                                      "loss_vs_round.pdf", "partition.pdf"]
    assert all(open(p, "rb").read(5) == b"%PDF-" for p in written)
    assert not list(stopped.glob("*.pdf"))
    with pytest.raises(ValueError, match="--format 'jpg': must be one of png, pdf, svg"):
        plots.plot_run(str(stopped), fmt="jpg")
    (stopped / "metrics.jsonl").write_text("")
    with pytest.raises(FileNotFoundError, match="has no evaluation yet"):
        plots.plot_run(str(stopped))



def test_plot_into_a_read_only_folder_is_one_line(runs, tmp_path, monkeypatch):
    from fiarse_jax.cli import main
    from fiarse_jax.experiment.config import ConfigError
    w, _ = runs["fiarse"]

    def denied(fig, path, **kw):   # as a read-only folder answers (root would write anyway)
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(plots.paths, "save_figure", denied)
    main.flags.FLAGS(["fiarse-jax", "--workdir", w])
    try:
        with pytest.raises(ConfigError, match=r"cannot write the figures to .* \(Permission "
                                              r"denied\): pass --out DIR"):
            main.run_command("plot")
    finally:
        main.flags.FLAGS.unparse_flags()


def _pooled_accuracy(sub, run):
    x, y = run.data.global_test()
    logits = sub.predict(x)
    return float(np.mean(np.argmax(np.asarray(logits), -1) == np.asarray(y)))


@pytest.mark.parametrize("method,capacity", [("fiarse", "1/4"), ("fiarse", "0.0625"),
                                             ("heterofl", "1/16"), ("heterofl", "1"),
                                             ("scalefl", "1/16"), ("scalefl", "1/4")])
def test_export_round_trip_reproduces_reported_accuracy(runs, tmp_path, monkeypatch, method,
                                                        capacity):
    w, summary = runs[method]
    out = str(tmp_path / "sub.npz")
    builds = record_builds(monkeypatch)
    info = export.export_submodel(w, capacity, out)
    (run,) = builds                   # the run export rebuilt from the checkpoint's config
    label = info["label"]
    assert info["reported"]["capacity_global_accuracy"] == \
        summary["final"]["capacity_global_accuracy"][label]
    sub = export.load_submodel(out)
    assert _pooled_accuracy(sub, run) == summary["final"]["capacity_global_accuracy"][label]
    with np.load(out) as z:
        names = set(z.files)
        kernel, mask = z["params/Dense_0/kernel"], z["mask/Dense_0/kernel"]
    np.testing.assert_array_equal(kernel[mask == 0], 0)  # dropped coordinates are zero
    if method == "heterofl":
        # the dense sub-model is physically smaller: ⌈r·128⌉ hidden units
        assert sub.params["Dense_0"]["kernel"].shape == (64, int(np.ceil(summary["capacities"][label] * 128)))
    if method in ("heterofl", "scalefl"):
        assert info["dense_params"] == summary["costs"][label]["params_held"]
        assert sum(v.size for v in jax.tree_util.tree_leaves(sub.params)) == info["dense_params"]
    else:
        assert not any(n.startswith("dense/") for n in names)
        assert info["params_held"] == summary["costs"][label]["params_held"]


def test_export_errors_name_the_bad_value(runs, tmp_path):
    w, _ = runs["fiarse"]
    with pytest.raises(ConfigError, match=r"--capacity '1/3': the run has capacities 1, 1/4, 1/16"):
        export.export_submodel(w, "1/3", str(tmp_path / "a.npz"))
    with pytest.raises(ConfigError, match="must end in .npz"):
        export.export_submodel(w, "1/4", str(tmp_path / "a.bin"))
    with pytest.raises(ConfigError, match=r"--capacity '1/0'"):
        export.export_submodel(w, "1/0", str(tmp_path / "a.npz"))
    with pytest.raises(ConfigError, match="holds no checkpoints"):
        export.export_submodel(str(tmp_path), "1/4", str(tmp_path / "a.npz"))
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_export_leaves_an_in_flight_save_alone(runs, tmp_path):
    w, _ = runs["fiarse"]
    tmp_save = os.path.join(w, "checkpoints", "99.orbax-checkpoint-tmp-1234567")
    os.makedirs(tmp_save)
    try:
        export.export_submodel(w, "1/4", str(tmp_path / "q.npz"))
        assert os.path.isdir(tmp_save)   # read-only: no cleanup of another process's save
    finally:
        os.rmdir(tmp_save)


def test_a_read_only_export_target_is_one_line(runs, monkeypatch, capsys):
    from fiarse_jax.cli import main
    from fiarse_jax.experiment import export
    w, _ = runs["fiarse"]

    def denied(*a, **kw):   # as a read-only folder answers (root would write anyway)
        raise PermissionError(13, "Permission denied", "/read-only/sub.npz")

    monkeypatch.setattr(export, "export_submodel", denied)
    main.flags.FLAGS(["fiarse-jax", "--workdir", w, "--capacity", "1/4", "--out",
                      "/read-only/sub.npz"])
    try:
        with pytest.raises(SystemExit) as done:
            main.main(["fiarse-jax", "export"])
    finally:
        main.flags.FLAGS.unparse_flags()
    assert done.value.code == 2
    assert capsys.readouterr().err == ("fiarse-jax: error: cannot write '/read-only/sub.npz' "
                                       "(Permission denied)\n")


def test_a_json_lines_file_caught_mid_write_reads_its_whole_rows(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"round": 1}\n{"round": 2}\n{"round": 3, "glob')   # a run mid-write
    assert read_jsonl(str(path)) == [{"round": 1}, {"round": 2}]
    path.write_text('{"round": 1}\n{"round": 2}\n')
    assert read_jsonl(str(path)) == [{"round": 1}, {"round": 2}]
