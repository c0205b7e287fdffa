"""engine at scale: chunked == unchunked, sharded == single device (8 forced CPU devices),
training across two jax.distributed processes on localhost == one process, bf16 compute."""
import json
import os
import socket
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fiarse_jax.federated import engine, memory

sys.path.insert(0, os.path.dirname(__file__))
from _engine_worker import problem  # noqa: E402

WORKER = os.path.join(os.path.dirname(__file__), "_engine_worker.py")


def _env(devices: int) -> dict:
    return {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
            "JAX_PLATFORMS": "cpu"}


def test_chunked_vmap_equals_unchunked_for_any_chunk_size():
    fns, params, specs, data, keys = problem(7)
    ref = engine.make_round_runner(fns, "vmap")(params, specs, data, keys)
    for chunk in (3, 7):   # 3 does not divide 7: the last chunk is padded
        out = engine.make_round_runner(fns, "vmap", clients_per_chunk=chunk)(
            params, specs, data, keys)
        assert out.loss.shape == (7,)
        chex.assert_trees_all_close(out, ref, rtol=1e-5, atol=1e-6)
    assert float(jnp.abs(ref.delta["Dense_0"]["kernel"]).max()) > 0


@pytest.mark.parametrize("bad", [-1, 1.5, True])
def test_bad_chunk_size_is_named(bad):
    fns = problem(2)[0]
    with pytest.raises(ValueError, match=f"clients_per_chunk = {bad!r}"):
        engine.make_round_runner(fns, "vmap", clients_per_chunk=bad)


def test_sharded_over_eight_devices_equals_one_device(tmp_path):
    out = tmp_path / "sharded.json"
    subprocess.run([sys.executable, WORKER, "sharded", str(out)], env=_env(8), check=True,
                   timeout=600)
    runs = json.loads(out.read_text())
    assert runs["devices"] == 8
    for name in ("8_clients_chunk_0", "11_clients_chunk_2"):  # 11: padded to 16, in chunks
        r = runs[name]
        assert r["shape"] == [int(name.split("_")[0])]
        assert r["result"] < 1e-5 and r["params"] < 1e-6 and r["replicated"], (name, r)
        # streamed (summed per device, then across devices): same model, padding not counted
        assert r["streamed_params"] < 1e-6 and r["streamed_counts"] == 0, (name, r)
        assert r["streamed_loss"] < 1e-5, (name, r)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _two_processes(workdir: str, rounds: int, store: str) -> list[str]:
    """train_and_evaluate in 2 processes × 2 devices joined by jax.distributed (the CLI's
    --distributed path), the workdir a gs:// path of one mocked bucket both processes share."""
    port = str(_free_port())
    procs = [subprocess.Popen([sys.executable, WORKER, "train", workdir, port, str(i), "2",
                               str(rounds), store], env=_env(2),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for i in range(2)]
    logs = [p.communicate(timeout=600)[0].decode()[-3000:] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs
    return logs


def test_two_processes_on_a_gs_workdir_stop_resume_and_equal_one(tmp_path):
    """A pod's run in miniature: 2 processes, sharded, workdir gs://bucket/multi (mocked, one
    bucket for both), stopped after round 2 and resumed to 3. Process 0 alone writes the
    outputs; they match an uninterrupted single-process run in a local workdir; plot and
    export read the bucket."""
    from helpers import mock_gcs

    from fiarse_jax.cli import plots
    from fiarse_jax.experiment import export
    from fiarse_jax.experiment.metrics import read_jsonl
    store, run = str(tmp_path / "store"), "gs://bucket/multi"
    logs = _two_processes(run, 2, store)
    assert logs[1].count("round 2/2") == 0 and logs[0].count("round 2/2") == 1
    logs = _two_processes(run, 3, store)
    assert logs[1].count("round 3/3") == 0 and logs[0].count("round 3/3") == 1
    subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]);"
                    "from _engine_worker import short_config; from fiarse_jax.experiment import train;"
                    "train.train_and_evaluate(short_config(), sys.argv[2], progress=False)",
                    os.path.dirname(WORKER), str(tmp_path / "single")], env=_env(4), check=True,
                   timeout=600, capture_output=True)
    on_store = tmp_path / "store" / "bucket" / "multi"
    multi, single = (json.loads((d / "summary.json").read_text())
                     for d in (on_store, tmp_path / "single"))
    assert (multi["processes"], multi["devices"], multi["resumed_from_round"]) == (2, 4, 2)
    assert (single["processes"], single["devices"]) == (1, 4)
    assert sorted(os.listdir(on_store / "checkpoints")) == ["2", "3"]   # keep_checkpoints = 2
    for name in ("rounds.jsonl", "metrics.jsonl"):   # written once, by process 0
        got, want = (read_jsonl(str(d / name)) for d in (on_store, tmp_path / "single"))
        if name == "metrics.jsonl":   # the stopped run also evaluated its last round, 2
            assert [r["round"] for r in got] == [2, 3]
            got = got[1:]
        assert [r["round"] for r in got] == [r["round"] for r in want], name
        for g, w in zip(got, want):
            for key, value in w.items():
                if isinstance(value, float) and key not in ("elapsed_s", "round_time_s"):
                    assert g[key] == pytest.approx(value, abs=1e-3), (name, key)
    with mock_gcs(store):
        assert plots.plot_run(run)
        info = export.export_submodel(run, "1/4", "gs://bucket/sub.npz")
        assert info["round"] == 3 and export.load_submodel("gs://bucket/sub.npz").info == info


def test_bf16_compute_keeps_float32_state_and_tracks_float32():
    fns32, params, specs, data, keys = problem(3)
    fns16 = problem(3, compute_dtype=jnp.bfloat16)[0]
    run32 = engine.make_round_runner(fns32, "vmap")(params, specs, data, keys)
    run16 = engine.make_round_runner(fns16, "vmap")(params, specs, data, keys)
    assert all(l.dtype == jnp.float32 for l in jax.tree_util.tree_leaves(run16.delta))
    d16, d32 = (np.concatenate([np.ravel(l) for l in jax.tree_util.tree_leaves(r.delta)])
                for r in (run16, run32))
    assert not np.array_equal(d16, d32)                              # it really ran in bf16
    assert np.linalg.norm(d16 - d32) < 0.05 * np.linalg.norm(d32)   # ... and stayed close


def test_fit_chunk_takes_the_largest_chunk_whose_compiled_round_fits(monkeypatch):
    """Against every candidate chunk size's own compiled peak, at budgets on and between
    the peaks: the largest candidate that fits, in a logarithmic number of compiles."""
    from fiarse_jax.federated.server_round import make_streaming_round
    n = 7
    assert memory.chunk_candidates(n) == [1, 2, 3, 4, 7]   # 5 and 6 run 2 chunks, as 4
    fns, params, specs, data, keys = problem(n, hidden=(256, 256))
    reduce = make_streaming_round().contribution
    peaks = {c: engine.compiled_peak_bytes(fns, params, specs, data, keys, reduce=reduce,
                                           clients_per_chunk=0 if c == n else c)
             for c in memory.chunk_candidates(n)}
    assert peaks[1] < peaks[2] < peaks[3] < peaks[4]   # each client in a chunk adds memory

    def fit(budget):
        return engine.fit_chunk(fns, params, specs, data, keys, budget_bytes=budget,
                                reduce=reduce)

    # Compiling for real (the probes 1 and all: fit passes our arguments and both chunk
    # forms through, as the peaks above were measured); the binary search between them is
    # checked against those peaks below (budget `between` among them), without compiling
    # each probe a second time.
    assert fit(peaks[n]) == (0, peaks[n])
    between = (peaks[3] + peaks[4]) // 2
    probes = []                                          # from here on, the peaks above
    monkeypatch.setattr(engine, "compiled_peak_bytes", lambda *a, clients_per_chunk, **k: (
        probes.append(clients_per_chunk) or peaks[clients_per_chunk or n]))
    for budget in sorted({*peaks.values(), *(p + 1 for p in peaks.values()), between}):
        probes.clear()
        if budget < peaks[1]:
            with pytest.raises(MemoryError, match="one client at a time needs"):
                fit(budget)
            continue
        want = max(c for c in peaks if peaks[c] <= budget)
        assert fit(budget) == (0 if want == n else want, peaks[want]), budget
        assert len(probes) <= 4, probes                  # 1, all, then a binary search


def test_auto_chunk_in_a_run_is_decided_before_anything_is_written(tmp_path, capsys):
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "configs"))
    import default
    from helpers import override

    from fiarse_jax.experiment import train
    from fiarse_jax.experiment.config import ConfigError

    def cfg(budget_gb):
        return override(default.get_config(), **{
            "num_rounds": 1, "eval_every": 1, "checkpoint_every": 0, "tensorboard": False,
            "engine.strategy": "vmap", "engine.clients_per_chunk": "auto",
            "engine.memory_budget_gb": budget_gb,
            "eval.batch_size": 1})   # one batch length: one compile of the scorer

    with pytest.raises(ConfigError, match="clients_per_chunk = 'auto': one client at a time"):
        train.train_and_evaluate(cfg(1e-5), str(tmp_path / "small"), progress=False)
    assert not (tmp_path / "small").exists()
    summary = train.train_and_evaluate(cfg(0.0008), str(tmp_path / "fits"), progress=False)
    assert 1 <= summary["clients_per_chunk"] < 10     # 10 clients per round do not fit
    assert "clients_per_chunk = auto → " in capsys.readouterr().out


def test_memory_budget_on_cpu_is_a_share_of_the_hosts_ram(monkeypatch):
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert 0 < memory.memory_budget() <= 0.9 * total
    assert memory.memory_budget(0.5) < memory.memory_budget(0.9)

    class Gpu:   # a device reporting its allocator's limit and use
        platform, device_kind = "gpu", "fake"

        def memory_stats(self):
            return {"bytes_limit": 1000, "bytes_in_use": 200}

    class Silent(Gpu):
        def memory_stats(self):
            return None

    monkeypatch.setattr(jax, "local_devices", lambda: [Gpu()])
    assert memory.memory_budget(0.5) == 400
    monkeypatch.setattr(jax, "local_devices", lambda: [Silent()])
    with pytest.raises(RuntimeError, match="memory_budget_gb"):
        memory.memory_budget()
