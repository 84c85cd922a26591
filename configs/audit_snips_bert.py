"""Privacy audit of DP fine-tuning on SNIPS: membership inference (LiRA, loss threshold) and
canary exposure against all-MiniLM-L6-v2 classifiers (`configs/dp_snips_bert.py`'s model: the
pretrained encoder, mean-pooled, and a linear head) fine-tuned without DP and with DP at epsilon
8, 3 and 1, 8 models per level trained in parallel on random halves of 1,000 SNIPS training
queries and 10 canaries, 6 epochs each.

The config argument picks what is fine-tuned (`configs/dp_snips_bert.py`'s modes):
  lora  LoRA adapters of rank 8 on every layer's query and value, and the head (the default)
  head  the linear head only (a linear probe of the pretrained sentence embeddings)
  full  every parameter (minutes per model on a 2-core CPU)
and ",runlocal" after it a smoke run (4 models, 300 queries, 2 canaries, DP at epsilon 8 only).

  python scripts/audit.py --config configs/audit_snips_bert.py
  python scripts/audit.py --config configs/audit_snips_bert.py:head
  python scripts/audit.py --config configs/audit_snips_bert.py:lora,runlocal

The secrets have 3 digits (1,000 candidates, 9.97 bits of exposure at most): WordPiece reads
most 3-digit numbers as one token and the audit scores every candidate with every model. Model
inversion is not run (WordPiece splits some secrets into several tokens; see
`trustjax.attacks.experiments`). 8 models per level is few for LiRA: its variance is pooled
over examples (`audit.global_variance`), as Carlini et al. 2022 recommend below 64.
"""

from trustjax.attacks.experiments import default_config

# What each mode trains: (model.frozen, model.lora_rank, non-DP learning rate, DP learning rate)
MODES = {
    "lora": ("", 8, 1e-3, 2e-3),
    "head": ("encoder", 0, 1e-2, 1e-2),
    "full": ("", 0, 1e-4, 5e-4),
}


def get_config(arg: str = "lora"):
  mode, _, extra = arg.partition(",")
  mode = mode or "lora"
  if mode not in MODES or extra not in ("", "runlocal"):
    raise ValueError(f"unknown config argument {arg!r}; expected MODE[,runlocal] with MODE one "
                     f"of {sorted(MODES)}")
  c = default_config()
  c.run_name = f"audit_snips_bert_{mode}"
  c.data.name = "snips"
  c.data.data_dir = "../shared/data/snips"
  c.data.tokenizer = "pretrained"
  c.data.max_length = 24
  c.data.pool_size = 1000
  c.model.name = "bert"
  c.model.frozen, c.model.lora_rank, c.train.learning_rate, c.train.dp_learning_rate = MODES[mode]
  c.canaries.num = 10
  c.canaries.digits = 3
  c.train.num_models = 8
  c.train.batch_size = 50  # Poisson rate 0.1 of each model's 500 members
  c.train.epochs = 6.0  # 60 steps
  c.train.chunk_steps = 10
  c.dp.epsilons = (8.0, 3.0, 1.0)
  if extra == "runlocal":
    c.run_name += "_runlocal"
    c.data.pool_size = 300
    c.canaries.num = 2
    c.train.num_models = 4
    c.train.batch_size = 30
    c.train.epochs = 2.0
    c.dp.epsilons = (8.0,)
    c.audit.bootstrap_resamples = 200
  c.lock()
  return c
