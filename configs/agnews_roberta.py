"""The paper's AG News experiment: FIARSE on a RoBERTa classifier, 200 clients.

Settings (FIARSE paper, Sec. 5, and the authors' text code): TFDS `ag_news_subset`
(120,000 train / 7,600 test, 4 classes), 200 clients with Dirichlet(α = 1.0) label skew
(unbalanced sizes), 20 clients per round, 300 rounds, clients in equal contiguous
capacity blocks, 2 local epochs of AdamW lr 1e-4, betas (0.9, 0.95), weight decay 0,
batch 20, a fresh optimiser every round; the model starts from pretrained `roberta-base`.
Thresholds are grouped as in the authors' text runs: word embeddings, position
embeddings and the whole encoder each get their own θ (token-type embeddings,
LayerNorms and the classification head are never masked).

The argument after the file name picks the capacity set, the θ grouping and the start:
  fiarse-jax --config configs/agnews_roberta.py --workdir runs/ag            # four,coarse,pretrained
  fiarse-jax --config configs/agnews_roberta.py:five,per_layer --workdir runs/ag5
  fiarse-jax --config configs/agnews_roberta.py:four,scratch --workdir runs/ag_scratch
four = {1, 1/4, 1/16, 1/64} (50 clients each); five = {1, .64, .36, .16, .04} (40 each);
coarse = three θ groups (word, position, encoder); per_layer = one θ per encoder layer;
pretrained = Hugging Face `roberta-base` weights and tokenizer (from the local hub cache,
downloaded when config.data.download is true and there is internet); scratch = random
init and a byte-level BPE tokenizer trained on the training split (offline).

Paper numbers to reproduce (local / global accuracy): FIARSE 90.03 / 89.61, HeteroFL
87.59 / 86.88, FedRolex 87.43 / 87.19, ScaleFL 88.02 / 87.66. The structured baselines run
on the same engine (heads and MLP units are the units):
  fiarse-jax compare --config configs/agnews_roberta.py --methods fiarse,heterofl,fedrolex \
      --workdir runs/ag_cmp

Differences from the paper, on purpose: no dropout in the model. Local epochs
(`client.local_epochs = 2`): each client takes ⌈2·n/20⌉ steps over its own n samples, and a
round runs as many iterations as its largest client needs (the others stop updating after
their own count), so vmapped rounds cost the largest client's time; set
`client.local_epochs = 0` and `client.local_steps = K` for a fixed K (K = 60 ≈ 2 epochs of
the mean client's ~600 samples). Clients' test splits are
carved from the pooled AG News data (`test_fraction` 0.06 ≈ the official test split's
share), so local and global accuracies use the same per-client convention as digits.
Data: `pip install -e ".[text]"`; configs/agnews_smoke.py runs this path on TFDS mock data.
"""
import os
import sys

import ml_collections

from fiarse_jax.experiment.config import parse_config_arg

sys.path.insert(0, os.path.dirname(__file__))
import default  # noqa: E402
from cifar10_resnet18 import CAPACITY_SETS  # noqa: E402


def parse(arg: str) -> tuple[tuple[float, ...], str, bool]:
    """'four,coarse,pretrained' → (capacities, θ grouping, pretrained); any part optional."""
    c = parse_config_arg(arg, sizes=("four", "five"), groups=("coarse", "per_layer"),
                         start=("pretrained", "scratch"))
    return CAPACITY_SETS[c["sizes"]], c["groups"], c["start"] == "pretrained"


def get_config(arg: str = "four,coarse,pretrained") -> ml_collections.ConfigDict:
    capacities, groups, pretrained = parse(arg)
    config = default.get_config()
    config.capacities = capacities
    # θ per group the model declares (model.threshold_groups), as the authors' text runs.
    config.fiarse.scope = "layer"
    config.fiarse_neuron.scope = "layer"

    config.data.name = "ag_news"
    # `fiarse-jax reproduce`: the paper's AG News local/global cells (four sizes)
    config.paper = "ag_news" if capacities == CAPACITY_SETS["four"] else ""
    config.data.partition = "dirichlet"
    config.data.num_clients = 200
    config.data.alpha = 1.0
    config.data.test_fraction = 0.06
    config.data.min_client_size = 4
    config.data.data_dir = "~/tensorflow_datasets"
    config.data.download = True
    config.data.mock_examples = 0          # > 0: TFDS mock data (smoke tests)
    config.data.tokenizer = "roberta-base" if pretrained else "bpe"
    config.data.vocab_size = 8000          # of the trained BPE (tokenizer = "bpe")
    config.data.max_length = 128

    config.model = ml_collections.ConfigDict({
        "name": "roberta",
        "size": "roberta_base",
        "threshold_groups": groups,        # coarse | per_layer
        "pretrained": "roberta-base" if pretrained else "",
        "vocab_size": 0,                   # 0: from the tokenizer
        "max_length": 0,                   # 0: from config.data.max_length
    })

    config.num_rounds = 300
    config.clients_per_round = 20
    config.client.optimizer = "adamw"
    config.client.learning_rate = 1e-4
    config.client.betas = (0.9, 0.95)
    config.client.weight_decay = 0.0
    config.client.local_epochs = 2.0       # ⌈2·n/batch⌉ steps per client (the paper's)
    config.client.local_steps = 60         # used only with local_epochs = 0
    config.client.batch_size = 20
    # Clients trained at once: as many as fit the accelerator, by XLA's compiled peak of a
    # round (decided before round 1; a fixed number also works). Compiled for the CPU, a
    # roberta-base round with streamed server inputs needs 6.9 GB at one client at a time
    # and ~5.3 GB more per client trained alongside
    # (benchmarks/results/suite_cpu_memory.json).
    config.engine.clients_per_chunk = "auto"
    config.eval_every = 20
    config.checkpoint_every = 20
    return config
