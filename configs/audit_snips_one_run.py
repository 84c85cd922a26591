"""A one-run privacy audit on SNIPS (Steinke, Nasr and Jagielski, "Privacy Auditing with One (1)
Training Run", NeurIPS 2023): 1,000 of SNIPS's 13,784 training queries get a wrong intent at
random, each model trains on a random half of all of them (so each mislabeled query is in a
given model independently with probability 1/2), and the model's loss on the 1,000 guesses which
ones it trained on. The guesses bound epsilon with 95% confidence from one model, valid (unlike
the pooled estimates of LiRA and RMIA), at a delta small enough (1e-6, 2 m delta = 0.002) for
the test to have power. Bag-of-embeddings classifiers without DP and with DP at epsilon 8 and 2;
4 models per level (the bound needs one; LiRA and RMIA need a few shadows to run at all).

  python scripts/audit.py --config configs/audit_snips_one_run.py
"""

from trustjax.attacks.experiments import default_config


def get_config(arg: str = ""):
  if arg:
    raise ValueError(f"unknown config argument {arg!r}; expected none")
  c = default_config()
  c.run_name = "audit_snips_one_run"
  c.data.name = "snips"
  c.data.data_dir = "../shared/data/snips"
  c.data.pool_size = 0  # every training query
  c.canaries.mislabeled = 1000
  c.train.num_models = 4
  c.train.batch_size = 256
  c.train.epochs = 30.0
  c.dp.epsilons = (8.0, 2.0)
  c.dp.delta = 1e-6
  c.lock()
  return c
