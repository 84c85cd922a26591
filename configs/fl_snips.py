"""FedAvg vs FedProx vs FedAdam vs SCAFFOLD on SNIPS (7 intents) split over 100 clients by a
FedNLP partition, against centralized training of the same model (the FedNLP gap).

The argument picks the partition: "iid", or a Dirichlet label-skew alpha ("0.1", "1", "10");
append ",runlocal" for a seconds-long smoke version.

  python scripts/federated.py --config configs/fl_snips.py:iid
  python scripts/federated.py --config configs/fl_snips.py:0.1
"""

from trustjax.federated.experiments import default_config


def get_config(arg: str = "1"):
  part, *flags = arg.split(",")
  c = default_config()
  c.data.name = "snips"
  c.data.data_dir = "../shared/data/snips"
  c.data.num_clients = 100
  if part == "iid":
    c.data.partition = "iid"
  else:
    c.data.partition = "dirichlet_label"
    c.data.alpha = float(part)
  c.model.name = "bag_of_embeddings"
  c.model.embed_dim = 64
  c.model.mlp_dim = 128
  c.fl.rounds = 60
  c.fl.clients_per_round = 10
  c.fl.batch_size = 16
  c.fl.local_epochs = 1
  c.fl.client_lr = 0.3
  c.fl.eval_every = 5
  c.strategies = {
      "fedavg": {"algorithm": "fedavg"},
      "fedprox": {"algorithm": "fedprox", "mu": 0.1},
      "fedadam": {"algorithm": "fedadam", "server_lr": 0.03},
      "scaffold": {"algorithm": "scaffold"},
      "centralized": {"algorithm": "centralized", "rounds": 5},  # 5 epochs of pooled SGD
  }
  c.run_name = f"fl_snips_{part}"
  if "runlocal" in flags:
    c.data.num_clients = 20
    c.fl.rounds = 3
    c.fl.clients_per_round = 4
    c.fl.eval_every = 3
    c.strategies.centralized.rounds = 1
    c.run_name += "_runlocal"
  c.lock()
  return c
