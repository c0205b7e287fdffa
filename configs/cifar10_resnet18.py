"""The paper's CIFAR-10 experiment: FIARSE on ResNet-18 (static BN), 100 clients.

Settings (FIARSE paper, Sec. 5, and the authors' code): 100 clients, balanced
Dirichlet(α = 0.3) — every client exactly 500 training and 100 test images with its own
label mix —, 10 clients per round, 800 rounds, local SGD lr 0.1 (no momentum), K = 100
steps at batch 20, server step 1.0, clients in equal contiguous capacity blocks,
augmentation random crop 32 (pad 4) + horizontal flip, the authors' CIFAR normalisation
(mean (0.4914, 0.4822, 0.4465), std (0.2023, 0.1994, 0.2010)).

The argument after the file name picks the capacity set and the threshold scope, and
`exits` adds early-exit heads to the ResNet (needed by `scalefl`):
  fiarse-jax --config configs/cifar10_resnet18.py --workdir runs/c10            # four,global
  fiarse-jax --config configs/cifar10_resnet18.py:five,layer --workdir runs/c10_5l
four = {1, 1/4, 1/16, 1/64} (25 clients each); five = {1, .64, .36, .16, .04} (20 each);
global = one θ per size; layer = one θ per block (stem, stage 1–4, head), as the authors'
CIFAR-100 runs; exits = config.model.early_exits = True (an exit head after stages 1–3).

Paper numbers to reproduce (four sizes, global scope; per-size local accuracy
1/64, 1/16, 1/4, 1, then global): FIARSE 73.12 / 77.20 / 77.24 / 82.04, global 73.75;
global for HeteroFL 66.05, FedRolex 65.98, ScaleFL 67.37 (every cell: fiarse_jax.cli.reproduce.
PAPER). The four methods from one command (`compare` and `reproduce` build the exit heads
only for scalefl, which trains them; the others get the same ResNet without heads, every
other parameter starting the same):
  fiarse-jax compare --config configs/cifar10_resnet18.py:four,global,exits \
      --methods fiarse,heterofl,fedrolex,scalefl --workdir runs/c10_cmp
(`--config.model.early_exits=True` does the same as `exits`.) `scalefl` alone:
  fiarse-jax --config configs/cifar10_resnet18.py:four,global,exits --config.method=scalefl \
      --workdir runs/c10_scalefl

Data: TFDS `cifar10` under config.data.data_dir (default ~/tensorflow_datasets), downloaded
on first use (needs internet; `pip install -e ".[tfds]"`). Offline it stops at once with a
message saying how to provide the data. configs/cifar_smoke.py runs this code path on
TFDS mock data. CIFAR-10 as image files instead (DIR/train/<class>/*.png, DIR/test/...):
  fiarse-jax --config configs/cifar10_resnet18.py --workdir runs/c10 \
      --config.data.name=image_folder --config.data.data_dir=DIR
"""
import os
import sys

import ml_collections

from fiarse_jax.experiment.config import parse_config_arg

sys.path.insert(0, os.path.dirname(__file__))
import default  # noqa: E402

CAPACITY_SETS = {"four": (1.0, 1 / 4, 1 / 16, 1 / 64), "five": (1.0, 0.64, 0.36, 0.16, 0.04)}


def parse(arg: str) -> tuple[tuple[float, ...], str, bool]:
    """'four,global[,exits]' → (capacities, scope, early exits); any part may be omitted."""
    c = parse_config_arg(arg, sizes=("four", "five"), scope=("global", "layer"),
                         exits=("", "exits"))
    return CAPACITY_SETS[c["sizes"]], c["scope"], bool(c["exits"])


def cifar_config(dataset: str, arg: str) -> ml_collections.ConfigDict:
    """The paper's CIFAR federation for ``dataset`` (shared by the CIFAR-10/100 configs)."""
    capacities, scope, exits = parse(arg)
    config = default.get_config()
    config.capacities = capacities
    config.fiarse.scope = scope
    # HeteroFL's 1/r scaler, as in HeteroFL; before a static BN it changes (almost) nothing.
    config.heterofl.scaler = True
    # scalefl's depth d_r = ⌈r^a·4⌉ stages. Stage 4 holds 75 % of ResNet-18's parameters, so
    # a = ½ (the MLP default) leaves the small levels depth-bound far under their r·N budget
    # (1/16 and 1/64 both get stage 1 at full width, 1.3 % of N). With a = ¼ every level
    # holds ≈ r·N (four sizes: depths 4/3/2/2 stages, 100/24.9/6.1/1.5 % of N; see
    # docs/scalefl.md).
    config.scalefl.depth_exponent = 0.25

    config.data.name = dataset
    # The paper's cells `fiarse-jax reproduce` puts beside ours (fiarse_jax.cli.reproduce.PAPER).
    config.paper = f"{dataset}_four" if capacities == CAPACITY_SETS["four"] else ""
    config.data.partition = "balanced_dirichlet"
    config.data.num_clients = 100
    config.data.alpha = 0.3
    config.data.n_train = 500
    config.data.n_test = 100
    config.data.classes_per_client = 2     # used by partition = "shards"
    config.data.data_dir = "~/tensorflow_datasets"
    config.data.download = True
    config.data.mock_examples = 0          # > 0: TFDS mock data (smoke tests)
    # The authors' normalisation, for CIFAR-10 and CIFAR-100 alike: CIFAR-10's mean and the
    # std of their (widely copied) torchvision recipe, (0.2023, 0.1994, 0.2010), with which
    # the paper's numbers were made; CIFAR-10's true pixel std is (0.2470, 0.2435, 0.2616)
    # (fiarse_jax.data.augment: CIFAR10_STD vs AUTHORS_CIFAR_STD).
    config.data.mean = (0.4914, 0.4822, 0.4465)
    config.data.std = (0.2023, 0.1994, 0.2010)
    config.data.augment = True             # random crop 32 (pad 4) + horizontal flip

    config.model = ml_collections.ConfigDict({"name": "resnet18"})
    # Exit heads after stages 1–3: scalefl needs them; other methods leave them untrained.
    config.model.early_exits = exits
    # How convolutions run: "auto" (CPU: backward convolutions in the forward layout;
    # elsewhere JAX's own gradient) | "xla" | "canonical" | "patches" (shifted views × kernel
    # matrix: batched matrix products under vmap) (fiarse_jax/models/conv.py).
    config.model.conv = "auto"

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
