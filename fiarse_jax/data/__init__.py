"""Data: datasets by name (a registry), partitioners, partition summaries, and the
per-client array layout.

Modules: ``types`` (ClientData, Dataset, FederatedData), ``registry`` (DATASETS, loading
and checking config.data), ``federation`` (federate, stack_clients, PARTITIONS),
``partition``, ``summary``, ``augment``; the datasets: ``digits``, ``cifar`` (via the TFDS
source, ``tfds``), ``text`` (AG News), ``files`` (image_folder, arrays).
"""
from fiarse_jax.data.digits import load_digits
from fiarse_jax.data.federation import PARTITIONS, federate, stack_clients
from fiarse_jax.data.partition import (
                                       balanced_dirichlet_partition,
                                       dirichlet_partition,
                                       iid_partition,
                                       shard_partition,
                                       train_test_split,
)
from fiarse_jax.data.registry import (
                                       DATASETS,
                                       DatasetSpec,
                                       check_data_config,
                                       load_dataset,
                                       load_from_config,
                                       register_dataset,
)
from fiarse_jax.data.summary import (
                                       federated_summary,
                                       format_partition_summary,
                                       partition_summary,
                                       plot_partition,
)
from fiarse_jax.data.types import ClientData, Dataset, FederatedData

__all__ = ["ClientData", "DATASETS", "Dataset", "DatasetSpec", "FederatedData", "PARTITIONS",
           "balanced_dirichlet_partition", "check_data_config", "dirichlet_partition", "federate",
           "federated_summary", "format_partition_summary", "iid_partition", "load_dataset",
           "load_digits", "load_from_config", "partition_summary", "plot_partition",
           "register_dataset", "shard_partition", "stack_clients", "train_test_split"]
