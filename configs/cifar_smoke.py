"""The CIFAR code path end to end in well under a minute, on TFDS mock data (offline).

Same pipeline as configs/cifar10_resnet18.py — TFDS loader, balanced Dirichlet
partition, on-device crop/flip/normalise, ResNet-18 with static BN, FIARSE — but on
random mock images, a narrow ResNet-18 (widths 8-16-32-64), 8 clients and 2 rounds:
  fiarse-jax --config configs/cifar_smoke.py --workdir runs/cifar_smoke
The paper comparison's code path, with the early-exit heads `scalefl` needs:
  fiarse-jax compare --config configs/cifar_smoke.py:four,global,exits \
      --methods fiarse,heterofl,fedrolex,scalefl --workdir runs/cifar_smoke_cmp
Accuracy is meaningless here (random labels); it proves the code path.
"""
import os
import sys

import ml_collections

sys.path.insert(0, os.path.dirname(__file__))
from cifar10_resnet18 import cifar_config  # noqa: E402


def get_config(arg: str = "four,global") -> ml_collections.ConfigDict:
    config = cifar_config("cifar10", arg)
    config.data.mock_examples = 400        # per split
    config.data.download = False
    config.data.num_clients = 8
    config.data.n_train = 40
    config.data.n_test = 10
    config.model.widths = (8, 16, 32, 64)
    config.num_rounds = 2
    config.clients_per_round = 4
    config.client.local_steps = 2
    config.eval_every = 1
    config.checkpoint_every = 1
    return config
