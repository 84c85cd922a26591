"""DP intent classification on SNIPS (7 intents, 13,784 training queries, 700 validation).

The config argument picks the privacy level: an epsilon ("1", "3", "8") or "nondp". After it,
",ftrl" trains with DP-FTRL (shuffled epochs of fixed batches of 512, tree aggregation, no
sampling; Kairouz et al. 2021) and ",mf" with DP-MF (the data shuffled once, fixed batches of
512, correlated noise of the banded square root factorization with one band per step of an
epoch; Kalinin and Lampert 2024) and ",amf" with amplified DP-MF (the same noise on cyclic
Poisson samples of an expected 512 over b groups, b chosen for the epsilon unless
--config.dp.bands sets it; Choquette-Choo et al. 2023) instead of DP-SGD (Poisson sampling at
q = 512 / N), and ",momentum" with SGD (momentum 0.9, learning rate 0.5) instead of Adam (3e-3).
",poison" plants backdoors: the trigger words "jx", "bz", "vx" and "qw" in 1, 4, 16 and 64
training queries of other intents labelled AddToPlaylist, "qx" as the control (hashing
tokenizer, with and without DP; none of the five shares a hash bucket with a SNIPS word).
",minority" keeps 5% of the SearchCreativeWork training queries (98 of 1,954) to study who pays
for DP (Bagdasaryan et al. 2019; `scripts/class_tables.py` compares the runs). Every run reports
each class's accuracy and median gradient norm.

  python scripts/train.py --config configs/dp_snips.py:8 --config.data.data_dir=../shared/data/snips
  python scripts/train.py --config configs/dp_snips.py:8,ftrl,momentum
  python scripts/train.py --config configs/dp_snips.py:1,mf
  python scripts/train.py --config configs/dp_snips.py:1,amf,momentum
  python scripts/train.py --config configs/dp_snips.py:nondp --config.data.data_dir=../shared/data/snips
  python scripts/train.py --config configs/dp_snips.py:1,minority
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
  c.train.class_grad_norms = True
  level, *options = arg.split(",")
  mechanisms = {"ftrl": "dp_ftrl", "mf": "dp_mf", "amf": "amplified_mf"}
  known = {*mechanisms, "momentum", "poison", "minority"}
  if not set(options) <= known or len(set(options)) < len(options) or (
      len(set(options) & set(mechanisms)) > (level != "nondp")):
    raise ValueError(f"configs/dp_snips.py takes EPSILON[,ftrl|,mf|,amf][,momentum][,poison]"
                     f"[,minority] or nondp[,momentum][,poison][,minority], got {arg!r}")
  set_privacy_level(c, level, "snips")
  for option, mechanism in mechanisms.items():
    if option in options:
      c.dp.mechanism = mechanism
      c.train.run_name += "_" + option
  if "momentum" in options:
    c.optimizer.name = "sgd"
    c.optimizer.momentum = 0.9
    c.optimizer.learning_rate = 0.5
    c.train.run_name += "_momentum"
  if "poison" in options:
    c.data.tokenizer = "hash"
    c.poison.triggers = ("qx", "jx", "bz", "vx", "qw")
    c.poison.counts = (0, 1, 4, 16, 64)
    c.poison.target = 0
    c.train.run_name += "_poison"
  if "minority" in options:
    c.data.minority_classes = ("SearchCreativeWork",)
    c.data.minority_fraction = 0.05
    c.train.run_name += "_minority"
  c.lock()
  return c
