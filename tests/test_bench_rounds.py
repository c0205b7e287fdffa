"""benchmarks/rounds.py and benchmarks/profile_rounds.py stay runnable (timings not asserted),
and the profile summary adds up what the trace says."""
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.join(os.path.dirname(__file__), "..")
sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import profile_rounds  # noqa: E402


def test_rounds_benchmark_times_both_settings_and_writes_json(tmp_path):
    out = tmp_path / "rounds.json"
    r = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "rounds.py"),
                        "--workloads", "digits_mlp", "--blocks", "1", "--block", "2",
                        "--eval-levels", "vmap,map", "--out", str(out)],
                       capture_output=True, text=True, timeout=600, cwd=REPO)
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.loads(out.read_text())
    assert not result["errors"]
    one, fused = result["rows"]
    assert (one["rounds_per_program"], fused["rounds_per_program"]) == (1, 2)
    assert one["speedup"] == 1.0 and fused["speedup"] == one["round_s"] / fused["round_s"]
    assert one["timed_rounds"] == fused["timed_rounds"] == 2
    # the same rounds either way: the same model after them, to float rounding
    assert fused["last_train_loss"] == pytest.approx(one["last_train_loss"], rel=1e-5)
    assert fused["run_s_extrapolated"] > 200 * fused["round_s"]
    # both evaluation modes timed, the first one counted, the same metrics
    assert one["eval_s"] == one["eval_s_vmap"] and one["eval_s_map"] > 0
    assert one["eval_levels_max_diff"] < 1e-5   # accuracies equal, losses to rounding


def test_rounds_benchmark_names_a_bad_eval_mode():
    r = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "rounds.py"),
                        "--eval-levels", "map,pmap"], capture_output=True, text=True,
                       timeout=600, cwd=REPO)
    assert r.returncode == 2 and "eval.levels = 'pmap'" in r.stderr.strip().splitlines()[-1]


def test_profile_summary_groups_device_operations_and_leaves_out_containers():
    meta = [{"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/host:CPU"}},
            {"ph": "M", "name": "thread_name", "pid": 1, "tid": 7, "args": {"name": "python"}},
            {"ph": "M", "name": "thread_name", "pid": 1, "tid": 8,
             "args": {"name": "tf_XLAEigen/123"}}]
    ops = [("conv_general_dilated.4", 8, 3000), ("conv_general_dilated.5", 8, 1000),
           ("dot.2", 8, 1000), ("while.9", 8, 9000), ("ThunkExecutor::Execute", 8, 9000),
           ("conv_general_dilated.4", 7, 5000)]   # on the python thread: not device time
    trace = {"traceEvents": meta + [{"ph": "X", "name": n, "pid": 1, "tid": t, "dur": d}
                                    for n, t, d in ops]}
    s = profile_rounds.summarize(trace, top=5)
    assert s["source"] == "XLA CPU threads" and s["device_ms"] == pytest.approx(5.0)
    assert [(r["name"], r["ms"], r["calls"]) for r in s["by_kind"]] == [
        ("conv_general_dilated", 4.0, 2), ("dot", 1.0, 1)]
    assert s["by_kind"][0]["share"] == pytest.approx(0.8)
    # a GPU trace: the kernels on the device's streams only
    gpu = {"traceEvents": [
        {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/device:GPU:0"}},
        {"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/host:CPU"}},
        {"ph": "X", "name": "cutlass_gemm_1", "pid": 2, "tid": 1, "dur": 2000},
        {"ph": "X", "name": "fusion_3", "pid": 2, "tid": 1, "dur": 500},
        {"ph": "X", "name": "fusion_3", "pid": 1, "tid": 1, "dur": 700}]}
    g = profile_rounds.summarize(gpu, top=5)
    assert g["source"] == "device streams" and g["device_ms"] == pytest.approx(2.5)
    assert [r["name"] for r in g["by_name"]] == ["cutlass_gemm_1", "fusion_3"]


def test_profile_tool_traces_rounds_and_writes_json(tmp_path):
    out = tmp_path / "p.json"
    r = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "profile_rounds.py"),
                        "--workload", "digits_mlp", "--rounds", "1", "--set",
                        "client.local_steps=2", "--set", "engine.rounds_per_program=1",
                        "--label", "t", "--out", str(out)],
                       capture_output=True, text=True, timeout=600, cwd=REPO)
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["overrides"] == {"client.local_steps": 2, "engine.rounds_per_program": 1}
    assert result["rounds_per_program"] == 1 and result["label"] == "t"   # the override won
    assert result["device_ms"] > 0 and result["by_kind"] and result["wall_s"] > 0
    assert sum(x["share"] for x in result["by_kind"]) <= 1.0 + 1e-9
