"""The AG News code path end to end in well under a minute, on TFDS mock data (offline).

Same pipeline as configs/agnews_roberta.py — TFDS loader, byte-level BPE trained on the
training split, Dirichlet partition, RoBERTa classifier with grouped thresholds, AdamW
clients — but on random mock text, the `tiny` RoBERTa (2 layers × 64), 8 clients and 2
rounds:
  fiarse-jax --config configs/agnews_smoke.py --workdir runs/agnews_smoke
  fiarse-jax compare --config configs/agnews_smoke.py --methods fiarse,heterofl,fedrolex \
      --workdir runs/agnews_smoke_cmp
Accuracy is meaningless here (random labels); it proves the code path.
"""
import os
import sys

import ml_collections

sys.path.insert(0, os.path.dirname(__file__))
from agnews_roberta import get_config as paper_config  # noqa: E402


def get_config(arg: str = "four,coarse,scratch") -> ml_collections.ConfigDict:
    config = paper_config(arg)
    config.data.mock_examples = 200        # per split
    config.data.download = False
    config.data.num_clients = 8
    config.data.test_fraction = 0.2
    config.data.vocab_size = 400
    config.data.max_length = 32
    config.model.size = "tiny"
    config.model.pretrained = ""
    config.num_rounds = 2
    config.clients_per_round = 4
    config.client.learning_rate = 1e-3
    config.client.local_epochs = 0.0       # a fixed K = 2: seconds, not epochs
    config.client.local_steps = 2
    config.engine.clients_per_chunk = 0
    config.eval_every = 1
    config.checkpoint_every = 1
    return config
