"""Data: datasets by name, partitioners, partition summaries, and the per-client array layout."""
from fiarse_jax.data.federated import (
                                       DATASETS,
                                       ClientData,
                                       Dataset,
                                       FederatedData,
                                       federate,
                                       load_dataset,
                                       load_digits,
                                       stack_clients,
)
from fiarse_jax.data.partition import (
                                       balanced_dirichlet_partition,
                                       dirichlet_partition,
                                       iid_partition,
                                       shard_partition,
                                       train_test_split,
)
from fiarse_jax.data.summary import format_partition_summary, partition_summary, plot_partition

__all__ = ["ClientData", "DATASETS", "Dataset", "FederatedData", "balanced_dirichlet_partition",
           "dirichlet_partition", "federate", "format_partition_summary", "iid_partition",
           "load_dataset", "load_digits", "partition_summary", "plot_partition",
           "shard_partition", "stack_clients", "train_test_split"]
