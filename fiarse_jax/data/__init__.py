"""Data: datasets by name, partitioners, and the per-client array layout."""
from fiarse_jax.data.federated import (DATASETS, ClientData, Dataset, FederatedData, federate,
                                       load_dataset, load_digits, stack_clients)
from fiarse_jax.data.partition import dirichlet_partition, train_test_split

__all__ = ["ClientData", "DATASETS", "Dataset", "FederatedData", "dirichlet_partition", "federate",
           "load_dataset", "load_digits", "stack_clients", "train_test_split"]
