"""The paper's CIFAR-100 experiment: FIARSE on ResNet-18 (static BN), 100 clients.

Same federation and training as configs/cifar10_resnet18.py (see there), on TFDS
`cifar100`, with the same normalisation constants as the authors' code (CIFAR-10's mean
and std (0.2023, 0.1994, 0.2010), set in the shared `cifar_config`). The authors'
CIFAR-100 runs use layer-wise thresholds (one θ per block):
  fiarse-jax --config configs/cifar100_resnet18.py:four,layer --workdir runs/c100

Paper numbers to reproduce (four sizes; per-size local accuracy 1/64, 1/16, 1/4, 1, then
global): FIARSE 39.12 / 43.24 / 43.72 / 40.96, global 38.63; global for HeteroFL 30.67,
FedRolex 29.89, ScaleFL 37.56.
The four methods from one command (`exits` adds the early-exit heads `scalefl` needs):
  fiarse-jax compare --config configs/cifar100_resnet18.py:four,layer,exits \
      --methods fiarse,heterofl,fedrolex,scalefl --workdir runs/c100_cmp
"""
import os
import sys

import ml_collections

sys.path.insert(0, os.path.dirname(__file__))
from cifar10_resnet18 import cifar_config  # noqa: E402


def get_config(arg: str = "four,layer") -> ml_collections.ConfigDict:
    return cifar_config("cifar100", arg)
