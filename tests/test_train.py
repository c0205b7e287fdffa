"""train_and_evaluate end to end on the embedded digits data, and config validation."""
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "configs"))
import default as default_config  # noqa: E402
from helpers import override  # noqa: E402

from fiarse_jax.core import rng  # noqa: E402
from fiarse_jax.experiment import build, train
from fiarse_jax.experiment.config import ConfigError, validate_config  # noqa: E402
from fiarse_jax.federated import xla


def small_config(**overrides):
    config = default_config.get_config()
    config.num_rounds = 3
    config.eval_every = 1
    return override(config, **overrides)


def test_default_config_is_valid():
    validate_config(default_config.get_config())


def test_short_run_learns_and_writes_metrics(tmp_path, capsys):
    config = small_config(num_rounds=40, eval_every=20)
    summary = train.train_and_evaluate(config, str(tmp_path))
    # The default MLP's 1/16 level starts cut off at its output layer: said, and recorded.
    assert "1/16: Dense_1" in capsys.readouterr().err
    assert summary["disconnected_at_start"] == {"1/16": ["Dense_1"]}
    n_local = len(build.build_run(config).data.test_y)   # every client's test samples
    assert summary["global_test"] == {"order": "clients", "samples": n_local}
    final = summary["final"]
    assert final["global_accuracy"] > 0.85          # chance is 0.10
    for label in ("1", "1/4", "1/16"):
        assert final["local_accuracy"][label] > 0.7, (label, final)
        assert final["capacity_global_accuracy"][label] > 0.7, (label, final)
    lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in lines] == [20, 40]
    assert lines[-1] == final
    assert set(lines[0]) >= {"round", "global_accuracy", "local_accuracy", "global_loss",
                             "train_loss", "capacity_global_accuracy"}
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["final"] == final and on_disk["config"]["num_rounds"] == 40
    assert on_disk["xla_options"] == xla.compiler_options() and on_disk["conv"] is None  # mlp


def test_same_seed_same_results_and_other_seed_differs(tmp_path):
    a = train.train_and_evaluate(small_config(), str(tmp_path / "a"))
    b = train.train_and_evaluate(small_config(), str(tmp_path / "b"))
    c = train.train_and_evaluate(small_config(seed=1), str(tmp_path / "c"))
    strip = lambda s: {k: v for k, v in s["final"].items() if k != "elapsed_s"}  # noqa: E731
    assert strip(a) == strip(b)
    assert strip(a) != strip(c)


def test_vmap_and_loop_strategies_agree_end_to_end(tmp_path):
    a = train.train_and_evaluate(small_config(**{"engine.strategy": "loop"}), str(tmp_path / "l"))
    b = train.train_and_evaluate(small_config(**{"engine.strategy": "vmap"}), str(tmp_path / "v"))
    assert a["final"]["global_loss"] == pytest.approx(b["final"]["global_loss"], rel=1e-4)
    assert a["final"]["local_accuracy"] == pytest.approx(b["final"]["local_accuracy"], abs=0.01)


@pytest.mark.parametrize("scope,gradient", [("layer", "tcb"), ("layer", "masked"),
                                            ("global", "masked")])
def test_scopes_and_gradient_modes_run_and_keep_their_share(tmp_path, scope, gradient):
    s = train.train_and_evaluate(
        small_config(**{"fiarse.scope": scope, "fiarse.gradient": gradient}), str(tmp_path))
    for label, cap in s["capacities"].items():
        # ⌈r·N⌉ per group: at least r, and at most a few parameters more.
        assert cap <= s["kept_fraction"][label] <= cap + 0.01, (label, s["kept_fraction"])


BAD = [
    ("capacities", (1.0, 1.5), "config.capacities = (1.0, 1.5): every ratio must be in (0, 1]"),
    ("capacities", (), "config.capacities = ()"),
    ("capacities", (0.5, 0.5), "ratios must be distinct"),
    ("data.alpha", 0.0, "config.data.alpha = 0.0: must be a finite number > 0"),
    ("capacities", (0.25, 0.2500000001), "ratios must have distinct labels, got ['1/4', '1/4']"),
    ("data.name", "mnist", "config.data.name = 'mnist': must be one of ['ag_news', 'arrays', 'cifar10', 'cifar100', 'digits', 'image_folder']"),
    ("data.test_fraction", 1.0, "config.data.test_fraction = 1.0: must be in (0, 1)"),
    ("clients_per_round", 51, "config.clients_per_round = 51: must be an integer in [1, 50]"),
    ("client.local_epochs", -1.0, "config.client.local_epochs = -1.0: must be a finite number in [0.0, 1000000.0]"),
    ("model.name", "resnet", "config.model.name = 'resnet': must be one of ['cnn', 'mlp', 'resnet18', 'roberta']"),
    ("method", "fedprox", "config.method = 'fedprox': must be one of ['fed_dropout', 'fedavg_full', "),
    ("fiarse_neuron.scope", "unit", "config.fiarse_neuron.scope = 'unit'"),
    ("fiarse.scope", "neuron", "config.fiarse.scope = 'neuron'"),
    ("fiarse.gradient", "ste", "config.fiarse.gradient = 'ste'"),
    ("engine.strategy", "pmap", "config.engine.strategy = 'pmap'"),
    ("engine.clients_per_chunk", -2, "config.engine.clients_per_chunk = -2: must be an integer ≥ 0"),
    ("engine.clients_per_chunk", "max", "config.engine.clients_per_chunk = 'max': must be an integer ≥ 0 or 'auto'"),
    ("engine.memory_budget_gb", -1.0, "config.engine.memory_budget_gb = -1.0: must be a finite number in [0.0, inf)"),
    ("engine.reduce", "sum", "config.engine.reduce = 'sum': must be one of ['auto', 'stack', 'stream']"),
    ("engine.dtype", "float16", "config.engine.dtype = 'float16': must be one of ['bfloat16', 'float32']"),
    ("client.learning_rate", -0.1, "config.client.learning_rate = -0.1: must be a finite number > 0"),
    ("client.learning_rate", float("inf"), "config.client.learning_rate = inf"),
    ("model.hidden_sizes", (0,), "config.model.hidden_sizes = (0,): every size must be an integer ≥ 1"),
    ("model.depth", 3, "config.model.depth = 3: is not a field of model 'mlp'; fields: ['early_exits', 'hidden_sizes']"),
    ("client.local_steps", 0, "config.client.local_steps = 0: must be an integer in [1, 1000000]"),
    ("client.local_steps", 10**10, "config.client.local_steps = 10000000000: must be an integer in [1, "),
    ("client.optimizer", "lbfgs", "config.client.optimizer = 'lbfgs'"),
    ("server.learning_rate", 0.0, "config.server.learning_rate = 0.0"),
    ("num_rounds", 0, "config.num_rounds = 0"),
    ("eval_every", 0, "config.eval_every = 0"),
    ("server.aggregator", "krum", "config.server.aggregator = 'krum': must be one of"),
    ("server.trimmed_mean.beta", 0.5, "config.server.trimmed_mean.beta = 0.5: must be a finite number in [0.0, 0.5)"),
    ("server.norm_bounded.max_norm", float("nan"), "config.server.norm_bounded.max_norm = nan"),
    ("server.multi_krum.num_byzantine", -1, "config.server.multi_krum.num_byzantine = -1"),
    ("server.z_threshold", 0.0, "config.server.z_threshold = 0.0: must be a finite number > 0"),
    ("server.cosine_threshold", 1.5, "config.server.cosine_threshold = 1.5"),
    ("attack.kind", "backdoor", "config.attack.kind = 'backdoor': must be one of"),
    ("attack.fraction", 1.0, "config.attack.fraction = 1.0: must be a finite number in [0.0, 1.0)"),
    ("attack.fraction", -0.1, "config.attack.fraction = -0.1"),
    ("attack.scale", float("inf"), "config.attack.scale = inf"),
    ("attack.noise_std", -1.0, "config.attack.noise_std = -1.0"),
    ("attack.levels", (3,), "config.attack.levels = (3,): must be level indices in [0, 2]"),
    ("dp.noise_multiplier", -0.5, "config.dp.noise_multiplier = -0.5"),
    ("dp.target_epsilon", float("nan"), "config.dp.target_epsilon = nan"),
    ("dp.clip_norm", 0.0, "config.dp.clip_norm = 0.0: must be a finite number > 0"),
    ("dp.delta", 1.0, "config.dp.delta = 1.0: must be a finite number in (0.0, 1.0)"),
    ("dp.accountant", "moments", "config.dp.accountant = 'moments'"),
]

#: Bad combinations: each field set together, the message names the one at fault.
BAD_COMBINATIONS = [
    ({"server.aggregator": "multi_krum", "server.multi_krum.num_byzantine": 4},
     "config.server.multi_krum.num_byzantine = 4: multi-Krum needs clients_per_round (10) > 2·4 + 2"),
    ({"attack.kind": "sign_flip", "attack.fraction": 0.001},
     "config.attack.fraction = 0.001: gives no attacker among 50 clients"),
    ({"dp.noise_multiplier": 1.0, "server.aggregator": "median"},
     "config.server.aggregator = 'median': differential privacy is DP-FedAvg"),
    ({"dp.noise_multiplier": 1.0, "dp.target_epsilon": 8.0},
     "config.dp.target_epsilon = 8.0: give dp.noise_multiplier or dp.target_epsilon, not both"),
    ({"dp.noise_multiplier": 1.0, "method": "fed_dropout"},
     "config.method = 'fed_dropout': differential privacy needs per-level masks"),
]


@pytest.mark.parametrize("fields,message", BAD_COMBINATIONS, ids=[m.split(":")[0] for _, m in BAD_COMBINATIONS])
def test_bad_combination_fails_fast_naming_the_field(tmp_path, fields, message):
    config = override(default_config.get_config(), **fields)
    with pytest.raises(ConfigError) as err:
        train.train_and_evaluate(config, str(tmp_path / "run"))
    assert message in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("field,value,message", BAD, ids=[b[0] for b in BAD])
def test_bad_config_fails_fast_with_one_clear_line(tmp_path, field, value, message):
    config = default_config.get_config()
    with config.unlocked():  # lets a test add an unknown field (model.depth)
        node = config
        *parents, leaf = field.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    workdir = tmp_path / "run"
    with pytest.raises(ConfigError) as err:
        train.train_and_evaluate(config, str(workdir))
    assert message in str(err.value) and "\n" not in str(err.value)
    assert not workdir.exists()  # nothing half-written


@pytest.mark.parametrize("method", ["heterofl", "fedrolex", "fed_dropout", "fiarse_neuron",
                                    "fedavg_full", "fedavg_smallest"])
def test_every_method_runs_on_the_same_engine(tmp_path, method):
    s = train.train_and_evaluate(small_config(method=method, num_rounds=2), str(tmp_path))
    assert 0.0 <= s["final"]["global_accuracy"] <= 1.0 and s["final"]["round"] == 2


def test_bad_method_option_is_a_config_error(tmp_path):
    config = small_config(method="heterofl")
    with config.unlocked():
        config.heterofl.scale = 2
    with pytest.raises(ConfigError, match=r"config.heterofl.scale = 2: is not an option of heterofl"):
        train.train_and_evaluate(config, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_divergence_stops_with_a_clear_error(tmp_path):
    config = small_config(**{"client.learning_rate": 1e30})
    with pytest.raises(train.TrainingError, match="training diverged in round 1"):
        train.train_and_evaluate(config, str(tmp_path))
    assert not (tmp_path / "summary.json").exists()


def test_impossible_partition_is_a_config_error(tmp_path):
    config = small_config(**{"data.num_clients": 1000, "clients_per_round": 10})
    with pytest.raises(ConfigError, match="config.data: 1000 clients"):
        train.train_and_evaluate(config, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_sampling_is_a_pure_function_of_seed_and_round():
    a = rng.sample_clients(0, 5, 50, 10)
    assert list(a) == list(rng.sample_clients(0, 5, 50, 10))
    assert len(set(a)) == 10 and list(a) != list(rng.sample_clients(0, 6, 50, 10))
    assert list(build.assign_capacities(7, 3)) == [0, 0, 0, 1, 1, 2, 2]


def test_config_file_arguments_pick_one_option_per_group():
    from fiarse_jax.experiment.config import parse_config_arg
    groups = {"sizes": ("four", "five"), "scope": ("global", "layer"), "exits": ("", "exits")}
    assert parse_config_arg(None, **groups) == {"sizes": "four", "scope": "global", "exits": ""}
    assert parse_config_arg(" layer,exits ,five", **groups) == {
        "sizes": "five", "scope": "layer", "exits": "exits"}
    with pytest.raises(ValueError, match="config argument 'six': expected four|five, "
                                         "global|layer, exits"):
        parse_config_arg("six", **groups)


def test_a_stale_lock_is_taken_over_and_overwrite_starts_over(tmp_path):
    from fiarse_jax.experiment import workdir_lock
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / workdir_lock.LOCK_NAME).write_text('{"pid": 1, "host": "gone"}')   # a killed run's
    config = small_config(num_rounds=2, eval_every=2, checkpoint_every=2)
    train.train_and_evaluate(config, str(tmp_path))
    assert json.loads((tmp_path / workdir_lock.LOCK_NAME).read_text())["pid"] == os.getpid()
    assert json.loads((tmp_path / "config.json").read_text()) == json.loads(
        json.dumps(config.to_dict(), default=list))
    fewer = small_config(num_rounds=1, eval_every=1, checkpoint_every=1)
    with pytest.raises(ConfigError, match="already at round 2"):
        train.train_and_evaluate(fewer, str(tmp_path))
    # A refused resume leaves the run's config.json as it was.
    assert json.loads((tmp_path / "config.json").read_text())["num_rounds"] == 2
    summary = train.train_and_evaluate(fewer, str(tmp_path), overwrite=True)
    assert summary["resumed_from_round"] is None and summary["final"]["round"] == 1
    rows = [json.loads(l) for l in (tmp_path / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["1"]


def test_divergence_covers_absurd_losses_and_all_non_finite_updates():
    import numpy as np

    from fiarse_jax.federated.algorithm import divergence
    from fiarse_jax.robust.validation import REASONS
    ok, nf = REASONS.index("ok"), REASONS.index("non_finite")
    honest = np.zeros(3, bool)
    assert divergence(2.3, np.array([ok, ok, ok]), honest, 10) is None
    assert divergence(float("nan"), np.array([ok] * 3), honest, 10) == "mean client loss nan"
    assert divergence(2302.0, np.array([ok] * 3), honest, 10) is None       # 1000 × ln 10 = 2302.6
    assert "over 1000× chance's ln 10 = 2.30" in divergence(8.1e4, np.array([ok] * 3), honest, 10)
    assert divergence(2.0, np.array([nf] * 3), honest, 10) == "every client's update was non-finite"
    # Non-finite updates from the round's attackers only: the defence at work, not divergence.
    attackers = np.array([True, True, False])
    assert divergence(2.0, np.array([nf, nf, ok]), attackers, 10) is None
    assert divergence(2.0, np.array([nf, nf, nf]), attackers, 10) is not None


def test_an_absurd_learning_rate_stops_with_the_divergence_line(tmp_path):
    with pytest.raises(train.TrainingError, match="training diverged in round 1 .*lower "
                                                  "config.client.learning_rate"):
        train.train_and_evaluate(small_config(**{"client.learning_rate": 1e6}), str(tmp_path))


def test_a_long_run_says_its_estimated_time_up_front(capsys):
    train._estimate(30.0, 2, 100)          # 15 s a round, 100 left: 25 min
    assert capsys.readouterr().err.strip() == (
        "fiarse-jax: note: the first 2 round(s) took 30.0 s (compilation included); the "
        "remaining 100 will take about 0.4 h at this pace")
    train._estimate(3.0, 2, 100)           # 2.5 min: nothing to say
    assert capsys.readouterr().err == ""
