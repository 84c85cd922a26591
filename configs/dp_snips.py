"""DP intent classification on SNIPS (7 intents, 13,784 training queries, 700 validation).

The config argument picks the privacy level: an epsilon ("1", "3", "8") or "nondp".

  python scripts/train.py --config configs/dp_snips.py:8 --config.data.data_dir=../shared/data/snips
  python scripts/train.py --config configs/dp_snips.py:nondp --config.data.data_dir=../shared/data/snips
"""

from trustjax.experiments import default_config, set_privacy_level


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
  set_privacy_level(c, arg, "snips")
  c.lock()
  return c
