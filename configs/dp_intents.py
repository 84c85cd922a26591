"""DP transformer intent classifier on the synthetic NLU corpus (the default demo).

Target (epsilon, delta) = (8, 1e-5) with N = 10,800 training utterances (delta < 1/N).

  python scripts/train.py --config configs/dp_intents.py
  python scripts/train.py --config configs/dp_intents.py:runlocal   # seconds, for tests
"""

from trustjax.experiments import default_config


def get_config(arg: str = ""):
  c = default_config()
  c.train.run_name = "dp_intents"
  c.dp.enabled = True
  c.dp.target_epsilon = 8.0
  c.dp.l2_clip = 1.0
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
    c.dp.accountant = "rdp"
    c.train.measure_step_time = False
  c.lock()
  return c
