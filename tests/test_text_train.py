"""The AG News path end to end on TFDS mock data: one federated round under both engine
strategies, the model fields the tokenizer fixes, pretrained weights through the config."""
import os
import sys

import jax
import numpy as np
import pytest

pytest.importorskip("tokenizers", reason="the text path needs tokenizers (the 'text' extra)")

from helpers import override, record_builds  # noqa: E402

from fiarse_jax.experiment import build, train  # noqa: E402
from fiarse_jax.experiment.config import ConfigError  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "configs"))
import agnews_smoke  # noqa: E402


def smoke(tmp_path, **fields):
    c = agnews_smoke.get_config()
    c.data.data_dir = str(tmp_path / "data")      # the BPE cache goes here, not under ~
    c.num_rounds, c.checkpoint_every, c.tensorboard = 1, 0, False
    # Test sets scored one sample per batch: one batch length, so one compile of the scorer
    # per run instead of one per length (batches of 20 leave every client's remainder its
    # own length: 8 here). RoBERTa has no batch statistics, so the numbers are the same.
    c.eval.batch_size = 1
    return override(c, **fields)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    """The smoke config's run from scratch, built once for the tests that read its params."""
    return build.build_run(smoke(tmp_path_factory.mktemp("scratch")))


def test_one_round_agrees_across_strategies_and_keeps_the_grouped_budget(tmp_path, monkeypatch):
    builds = record_builds(monkeypatch)
    out = {s: train.train_and_evaluate(smoke(tmp_path, **{"engine.strategy": s,
                                                          "checkpoint_every": 1}),
                                       str(tmp_path / s), progress=False)
           for s in ("loop", "vmap")}
    loop, vmap = out["loop"], out["vmap"]
    # FIARSE's exported 1/4 sub-model (masked dense) with the data's vocabulary.
    assert_export_reproduces(tmp_path / "loop", loop, builds, dense=False)
    assert loop["num_classes"] == 4 and loop["config"]["model"]["name"] == "roberta"
    assert loop["final"]["train_loss"] == pytest.approx(vmap["final"]["train_loss"], rel=1e-4)
    assert loop["final"]["global_accuracy"] == pytest.approx(vmap["final"]["global_accuracy"],
                                                             abs=1e-9)
    # Layer scope over the model's three θ groups: each group keeps ⌈r·N_g⌉, so every level
    # keeps its share of the maskable parameters; the head and token-type embeddings are
    # not maskable, so no kept share is reported for the head.
    # Costs use the model's rule too: maskable = word/position embeddings + encoder dense
    # layers, counted here from the parameter names.
    params = builds[0].init_params    # the loop run's (train built it; no build again)
    by_path = {"/".join(str(getattr(k, "key", k)) for k in path): leaf.size for path, leaf in
               jax.tree_util.tree_flatten_with_path(params)[0]}
    maskable = sum(n for p, n in by_path.items()
                   if p.startswith(("embeddings/word/", "embeddings/position/"))
                   or (p.startswith("layer_") and p.split("/")[1] in ("attention", "mlp")))
    assert loop["costs"]["1"]["maskable_kept"] == maskable
    assert loop["costs"]["1"]["params_total"] == sum(by_path.values()) > maskable
    for label, r in (("1", 1), ("1/4", 1 / 4), ("1/16", 1 / 16), ("1/64", 1 / 64)):
        assert loop["kept_fraction"][label] == pytest.approx(r, rel=0.01)
        assert set(loop["kept_fraction_per_layer"][label]) == {"embeddings", "layer_0", "layer_1"}


def test_the_tokenizer_fixes_the_model_vocabulary(tmp_path, scratch):
    run = scratch
    vocab = run.model.dims().vocab_size
    assert run.init_params["embeddings"]["word"]["embedding"].shape[0] == vocab
    assert int(np.asarray(run.data.train.x).max()) < vocab
    assert run.model.max_length == 32
    with pytest.raises(ConfigError, match=r"config.model.vocab_size = 123 contradicts the data "
                                          rf"\(vocab_size = {vocab}"):
        build.build_run(smoke(tmp_path, **{"model.vocab_size": 123}))
    c = smoke(tmp_path)
    c.model = type(c.model)({"name": "mlp", "hidden_sizes": (8,)})
    with pytest.raises(ConfigError, match="dataset 'ag_news' gives token ids"):
        build.build_run(c)


def _hf_checkpoint(params, rng):
    """Random tensors under Hugging Face RoBERTa names, shaped for ``params`` (no head)."""
    emb = params["embeddings"]
    d = emb["word"]["embedding"].shape[1]
    t = {"roberta.embeddings.word_embeddings.weight": emb["word"]["embedding"].shape,
         "roberta.embeddings.position_embeddings.weight": emb["position"]["embedding"].shape,
         "roberta.embeddings.token_type_embeddings.weight": emb["token_type"]["embedding"].shape,
         "roberta.embeddings.LayerNorm.weight": (d,), "roberta.embeddings.LayerNorm.bias": (d,)}
    layers = sorted(k for k in params if k.startswith("layer_"))
    for i in range(len(layers)):
        ff = params[f"layer_{i}"]["mlp"]["intermediate"]["kernel"].shape[1]
        x = f"roberta.encoder.layer.{i}."
        for name, (o, n) in {"attention.self.query": (d, d), "attention.self.key": (d, d),
                             "attention.self.value": (d, d), "attention.output.dense": (d, d),
                             "intermediate.dense": (ff, d), "output.dense": (d, ff)}.items():
            t[x + name + ".weight"], t[x + name + ".bias"] = (o, n), (o,)
        for norm in ("attention.output.LayerNorm", "output.LayerNorm"):
            t[x + norm + ".weight"], t[x + norm + ".bias"] = (d,), (d,)
    return {k: rng.normal(size=s).astype(np.float32) for k, s in t.items()}


def test_pretrained_switch_starts_from_the_checkpoint(tmp_path, scratch):
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    t = _hf_checkpoint(scratch.init_params, np.random.default_rng(0))
    path = tmp_path / "model.safetensors"
    safetensors_numpy.save_file(t, str(path))
    run = build.build_run(smoke(tmp_path, **{"model.pretrained": str(path)}))
    p = run.init_params
    d = t["roberta.embeddings.LayerNorm.weight"].shape[0]
    q = np.asarray(p["layer_1"]["attention"]["query"]["kernel"]).reshape(d, d)
    np.testing.assert_array_equal(q, t["roberta.encoder.layer.1.attention.self.query.weight"].T)
    np.testing.assert_array_equal(np.asarray(p["embeddings"]["word"]["embedding"]),
                                  t["roberta.embeddings.word_embeddings.weight"])
    # No classifier in the checkpoint: the head is the scratch model's initialisation.
    np.testing.assert_array_equal(np.asarray(p["head"]["out_proj"]["kernel"]),
                                  np.asarray(scratch.init_params["head"]["out_proj"]["kernel"]))
    with pytest.raises(ConfigError, match="config.model.pretrained = 'nowhere/none'"):
        build.build_run(smoke(tmp_path, **{"model.pretrained": "nowhere/none"}))



@pytest.mark.parametrize("fields,message", [
    ({"data.tokenizer": "roberta base"}, "config.data: "),
    ({"data.name": "digits"}, "config.model.name = 'roberta' reads token ids"),
])
def test_text_config_mistakes_fail_fast_in_one_line(tmp_path, fields, message):
    with pytest.raises(ConfigError, match=message) as err:
        train.train_and_evaluate(smoke(tmp_path, **fields), str(tmp_path / "run"))
    assert "\n" not in str(err.value) and not (tmp_path / "run").exists()


def assert_export_reproduces(workdir, summary, builds, *, dense: bool):
    """The exported 1/4 sub-model, rebuilt with the data's vocabulary (not the preset's)
    and, for a structured method, the kept heads / units per layer, scores exactly the
    accuracy the run reported on all clients' test data. ``builds``: ``record_builds``'
    list; the run export rebuilt from the checkpoint is read from it."""
    from fiarse_jax.experiment import export
    before = len(builds)
    info = export.export_submodel(str(workdir), "1/4", str(workdir / "q.npz"))
    sub = export.load_submodel(str(workdir / "q.npz"))
    assert len(builds) == before + 1
    run = builds[-1]                  # export.load_run_state's: the checkpoint's config
    assert sub.model.dims().vocab_size == run.model.dims().vocab_size < 50265
    assert ("dense_model" in info) == dense
    x, y = (np.asarray(a) for a in run.data.global_test())
    acc = float(np.mean(np.argmax(np.asarray(sub.predict(x)), -1) == y))
    assert acc == pytest.approx(summary["final"]["capacity_global_accuracy"]["1/4"], abs=1e-9)


def test_pretrained_structured_run_exports_and_resumes_without_the_weights(
        tmp_path, scratch, monkeypatch):
    """HeteroFL from a (synthetic) pretrained checkpoint: once the run has checkpoints,
    neither export nor resume needs the weights it started from."""
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    path = tmp_path / "model.safetensors"
    safetensors_numpy.save_file(_hf_checkpoint(scratch.init_params, np.random.default_rng(1)),
                                str(path))
    c = smoke(tmp_path, method="heterofl", checkpoint_every=1,
              **{"model.pretrained": str(path)})
    s = train.train_and_evaluate(c, str(tmp_path / "run"), progress=False)
    path.unlink()
    assert_export_reproduces(tmp_path / "run", s, record_builds(monkeypatch), dense=True)
    c.num_rounds = 2
    assert train.train_and_evaluate(c, str(tmp_path / "run"), progress=False)["final"]["round"] == 2
