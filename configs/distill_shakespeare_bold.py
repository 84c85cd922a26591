"""Gender polarity on BOLD's prompts through distillation (Gupta et al. 2022's measurement, on
a word-level GPT teacher trained on Shakespeare's plays): the teacher and the five students of
`configs/distill_professions.py`, each continuing BOLD's gender and profession prompts; 3 seeds.

  python scripts/distill.py --config configs/distill_shakespeare_bold.py
  python scripts/distill.py --config configs/distill_shakespeare_bold.py:runlocal  # 3 plays, small

`data.bold_dir` defaults to ../shared/data/bold; point it at a copy of BOLD's prompts folder.
"""

from trustjax.fairness.distillation_bold import default_config


def get_config(arg: str = ""):
  c = default_config()
  if arg == "runlocal":
    c.run_name = "distill_shakespeare_bold_runlocal"
    c.seeds = (0,)
    c.data.plays = ("hamlet", "macbeth", "romeo_and_juliet")
    c.data.max_vocab = 3000
    c.generation.per_group = 10
    c.train.teacher.epochs = 1.0
  elif arg:
    raise ValueError(f"unknown config argument {arg!r}; expected '' or 'runlocal'")
  c.lock()
  return c
