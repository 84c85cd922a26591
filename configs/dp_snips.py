"""DP intent classification on SNIPS (7 intents, 13,784 training queries, 700 validation).

The config argument picks the privacy level: an epsilon ("1", "3", "8") or "nondp".

  python scripts/train.py --config configs/dp_snips.py:8 --config.data.data_dir=../shared/data/snips
  python scripts/train.py --config configs/dp_snips.py:nondp --config.data.data_dir=../shared/data/snips
"""

from trustjax.experiments import default_config


def get_config(arg: str = "8"):
  c = default_config()
  c.data.name = "snips"
  c.data.data_dir = "../shared/data/snips"
  c.data.max_length = 32
  c.data.vocab_size = 8192
  c.model.name = "transformer"
  c.optimizer.learning_rate = 3e-3
  c.train.batch_size = 512
  c.train.epochs = 6.0
  c.train.measure_step_time = False
  if arg == "nondp":
    c.dp.enabled = False
    c.train.run_name = "snips_nondp"
  else:
    c.dp.target_epsilon = float(arg)
    c.train.run_name = f"snips_dp_eps{arg}"
  c.lock()
  return c
