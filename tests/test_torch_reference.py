"""The PyTorch reference rounds of the benchmarks (benchmarks/torch_reference.py): the tuned
round computes the authors'-style round, and the suite reports ours against both."""
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import suite
import torch_reference  # imports torch only when a round runs

#: A tiny CNN round: 3 clients (one per capacity level), 4 steps of batch 10.
TINY = dict(model="cnn", clients=3, steps=4, batch=10, warmup_rounds=0, threads=1,
            samples_per_client=30, return_state=True)


@pytest.fixture
def torch():
    """PyTorch, or the test is skipped (CI installs no torch; the dev venv has it)."""
    return pytest.importorskip("torch")


def test_tuned_round_computes_the_authors_round(torch):
    """Same seed, same initial weights, float32 both (compile and bf16 off; channels_last on):
    one reused local model + fused SGD + deltas against the global give the same global model
    as deepcopy + fresh SGD per client, and the round moved it."""
    init = torch_reference.run_reference(**TINY, rounds=0)["state"]
    authors = torch_reference.run_reference(**TINY, rounds=1)
    tuned = torch_reference.run_reference(**TINY, rounds=1, tuned=True, compile_model=False,
                                          bf16=False)
    assert (authors["variant"], tuned["variant"]) == ("authors", "tuned")
    assert tuned["channels_last"] and not tuned["bf16"] and not tuned["compiled"]
    assert tuned["last_loss"] == pytest.approx(authors["last_loss"], rel=1e-6)
    assert authors["state"].keys() == tuned["state"].keys() == init.keys()
    for k, w in authors["state"].items():
        torch.testing.assert_close(tuned["state"][k], w, rtol=1e-5, atol=1e-6)
        assert not torch.equal(w, init[k]), k


def test_tuned_round_falls_back_to_eager_when_compiling_fails(torch, monkeypatch):
    """A compiler that raises leaves an eager round with the error on one line; one that
    works forces a warm-up round (the compile is never timed)."""
    def broken(model, **kw):
        raise RuntimeError("no C++ compiler here\nsecond line")

    monkeypatch.setattr(torch, "compile", broken)
    r = torch_reference.run_reference(**TINY, rounds=1, tuned=True, bf16=False)
    assert not r["compiled"] and r["compile_error"] == "RuntimeError: no C++ compiler here"
    assert r["warmup_rounds"] == 0 and r["round_s"] > 0
    monkeypatch.setattr(torch, "compile", lambda model, **kw: model)   # "compiles" instantly
    r = torch_reference.run_reference(**TINY, rounds=1, tuned=True, bf16=False)
    assert r["compiled"] and r["compile_error"] is None and r["compile_s"] >= 0
    assert r["warmup_rounds"] == 1


def test_with_ratio_reports_ours_against_both_references():
    """``vs_torch`` against the authors'-style row, ``vs_torch_tuned`` against the tuned one
    (pure Python: runs without torch)."""
    rows = [{"strategy": "loop", "round_s": 2.0},
            {"strategy": "vmap", "error": "failed"},
            {"strategy": "torch", "variant": "authors", "round_s": 4.0},
            {"strategy": "torch", "variant": "tuned", "round_s": 1.0}]
    suite._with_ratio(rows)
    assert [(r["vs_torch"], r["vs_torch_tuned"]) for r in rows] == [
        (0.5, 2.0), (None, None), (1.0, 4.0), (0.25, 1.0)]
    # Without the tuned row (--no-torch-tuned, or it failed) only vs_torch; a torch row
    # without a variant (results written before the tuned one existed) is the authors' one.
    rows = [{"strategy": "loop", "round_s": 2.0}, {"strategy": "torch", "round_s": 4.0},
            {"strategy": "torch", "variant": "tuned", "error": "failed"}]
    suite._with_ratio(rows)
    assert [(r["vs_torch"], r["vs_torch_tuned"]) for r in rows] == [
        (0.5, None), (1.0, None), (None, None)]
