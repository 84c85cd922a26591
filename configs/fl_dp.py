"""DP-FedAvg (user-level DP, McMahan et al. 2018) on the synthetic NLU corpus split by device:
Poisson client sampling, per-client update clipping, Gaussian noise at the server with a fixed
denominator, accounted with dp_accounting; with a fixed clip and with adaptive clipping
(Andrew et al. 2021), against non-private FedAvg.

  python scripts/federated.py --config configs/fl_dp.py
  python scripts/federated.py --config configs/fl_dp.py:runlocal
"""

from trustjax.federated.experiments import default_config


def get_config(arg: str = ""):
  c = default_config()
  c.data.name = "synthetic_nlu"
  c.data.partition = "natural"
  c.data.tokenizer = "hash"  # data-independent vocabulary: nothing unaccounted is released
  c.data.num_examples = 40000
  c.data.num_devices = 2000
  c.model.name = "bag_of_embeddings"
  c.fl.rounds = 100
  c.fl.clients_per_round = 100  # expected cohort: sampling rate 100 / 2000
  c.fl.client_lr = 0.3
  c.fl.batch_size = 16
  c.fl.server_optimizer = "momentum"
  c.fl.server_lr = 1.0
  c.fl.eval_every = 10
  c.fl.dp.noise_multiplier = 1.0
  c.fl.dp.l2_clip = 0.3
  c.fl.dp.delta = 1e-4
  c.strategies = {
      "fedavg_nondp": {"algorithm": "fedavg", "server_lr": 1.0},
      "dp_fedavg": {"dp": {"enabled": True}},
      "dp_fedavg_adaptive": {"dp": {"enabled": True, "adaptive": True}},
  }
  c.run_name = "fl_dp_nlu"
  if arg == "runlocal":
    c.data.num_examples = 2000
    c.data.num_devices = 100
    c.fl.rounds = 3
    c.fl.clients_per_round = 10
    c.fl.eval_every = 3
    c.run_name += "_runlocal"
  c.lock()
  return c
