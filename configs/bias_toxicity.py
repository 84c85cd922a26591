"""Unintended identity bias of a toxicity classifier (Dixon et al. 2018): bag-of-embeddings
classifiers trained on the 1,492 Wikipedia talk-page comments as written and on their fuzzed copy
(identity terms swapped at random), 3 seeds each, scored on the 76,564 madlibs sentences.

  python scripts/bias.py --config configs/bias_toxicity.py
  python scripts/bias.py --config configs/bias_toxicity.py --config.data.data_dir=/path/to/eval_datasets
  python scripts/bias.py --config configs/bias_toxicity.py:runlocal   # one seed, 2 epochs
"""

from trustjax.fairness.experiments import default_config


def get_config(arg: str = ""):
  c = default_config()
  c.run_name = "bias_toxicity"
  c.data.data_dir = "../shared/data/toxicity_bias"
  if arg == "runlocal":
    c.run_name = "bias_toxicity_runlocal"
    c.seeds = (0,)
    c.train.epochs = 2.0
  elif arg:
    raise ValueError(f"unknown config argument {arg!r}; expected '' or 'runlocal'")
  c.lock()
  return c
