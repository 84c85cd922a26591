"""Federated learning simulation: client data, partitioners, selection, algorithms, rounds."""

from trustjax.federated import algorithms, partition, selection, simulate
from trustjax.federated.algorithms import (Byzantine, Cohort, FederatedAlgorithm, ServerState,
                                           dp_fedavg, dp_ftrl_fedavg, dp_mf_fedavg,
                                           fedavg, fedopt, fedprox,
                                           local_train,
                                           make_byzantine, qfedavg, robust_aggregate, scaffold)
from trustjax.federated.client_data import ClientData, ClientStore, bucket_capacities
from trustjax.federated.selection import Selection
from trustjax.federated.simulate import (Faults, client_mesh, continual_parts, federated_evaluate,
                                         make_cohort, pad_cohort, run_round)
