"""The paper's CIFAR-10 experiment: FIARSE on ResNet-18 (static BN), 100 clients.

Settings (FIARSE paper, Sec. 5, and the authors' code): 100 clients, balanced
Dirichlet(α = 0.3) — every client exactly 500 training and 100 test images with its own
label mix —, 10 clients per round, 800 rounds, local SGD lr 0.1 (no momentum), K = 100
steps at batch 20, server step 1.0, clients in equal contiguous capacity blocks,
augmentation random crop 32 (pad 4) + horizontal flip, CIFAR normalisation.

The argument after the file name picks the capacity set and the threshold scope:
  fiarse-jax --config configs/cifar10_resnet18.py --workdir runs/c10            # four,global
  fiarse-jax --config configs/cifar10_resnet18.py:five,layer --workdir runs/c10_5l
four = {1, 1/4, 1/16, 1/64} (25 clients each); five = {1, .64, .36, .16, .04} (20 each);
global = one θ per size; layer = one θ per block (stem, stage 1–4, head), as the authors'
CIFAR-100 runs.

Paper numbers to reproduce (four sizes, global scope; per-size local accuracy
1/64, 1/16, 1/4, 1, then global): FIARSE 73.12 / 77.20 / 77.24 / 82.04, global 73.75;
global for HeteroFL 66.05, FedRolex 65.98, ScaleFL 67.37 (our `scalefl` needs an
early-exit MLP today; it does not run on ResNet-18 yet).

Data: TFDS `cifar10` under config.data.data_dir (default ~/tensorflow_datasets), downloaded
on first use (needs internet; `pip install -e ".[tfds]"`). Offline it stops at once with a
message saying how to provide the data. configs/cifar_smoke.py runs this code path on
TFDS mock data.
"""
import ml_collections

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import default  # noqa: E402

CAPACITY_SETS = {"four": (1.0, 1 / 4, 1 / 16, 1 / 64), "five": (1.0, 0.64, 0.36, 0.16, 0.04)}


def parse(arg: str) -> tuple[tuple[float, ...], str]:
    """'four,global' → (capacities, scope); either part may be omitted."""
    sizes, scope = "four", "global"
    for part in filter(None, (p.strip() for p in (arg or "").split(","))):
        if part in CAPACITY_SETS:
            sizes = part
        elif part in ("global", "layer"):
            scope = part
        else:
            raise ValueError(f"config argument {part!r}: expected four|five and/or global|layer")
    return CAPACITY_SETS[sizes], scope


def cifar_config(dataset: str, arg: str) -> ml_collections.ConfigDict:
    """The paper's CIFAR federation for ``dataset`` (shared by the CIFAR-10/100 configs)."""
    capacities, scope = parse(arg)
    config = default.get_config()
    config.capacities = capacities
    config.fiarse.scope = scope
    # HeteroFL's 1/r scaler, as in HeteroFL; before a static BN it changes (almost) nothing.
    config.heterofl.scaler = True

    config.data.name = dataset
    config.data.partition = "balanced_dirichlet"
    config.data.num_clients = 100
    config.data.alpha = 0.3
    config.data.n_train = 500
    config.data.n_test = 100
    config.data.classes_per_client = 2     # used by partition = "shards"
    config.data.data_dir = "~/tensorflow_datasets"
    config.data.download = True
    config.data.mock_examples = 0          # > 0: TFDS mock data (smoke tests)

    config.model = ml_collections.ConfigDict({"name": "resnet18"})

    config.num_rounds = 800
    config.clients_per_round = 10
    config.client.optimizer = "sgd"
    config.client.learning_rate = 0.1
    config.client.local_steps = 100
    config.client.batch_size = 20
    config.server.learning_rate = 1.0
    config.eval_every = 20
    config.checkpoint_every = 20
    config.keep_checkpoints = 2
    return config


def get_config(arg: str = "four,global") -> ml_collections.ConfigDict:
    return cifar_config("cifar10", arg)
