"""Non-DP baseline of dp_intents: same corpus, model and tokenizer, no clipping or noise.

  python scripts/train.py --config configs/nondp_intents.py
"""

from trustjax.experiments import default_config


def get_config(arg: str = ""):
  c = default_config()
  c.train.run_name = "nondp_intents"
  c.dp.enabled = False
  c.optimizer.learning_rate = 3e-3
  c.data.num_examples = 12000  # 10% held out for evaluation
  c.train.batch_size = 256
  c.train.epochs = 3.0
  if arg == "runlocal":
    c.data.num_examples = 2000
    c.data.num_devices = 50
    c.model.embed_dim = 32
    c.model.mlp_dim = 64
    c.train.batch_size = 128
    c.train.epochs = 1.0
    c.train.measure_step_time = False
  c.lock()
  return c
