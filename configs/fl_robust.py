"""Byzantine-robust aggregation on SNIPS: FedAvg's weighted mean against the coordinate-wise median,
the trimmed mean (Yin et al. 2018), Krum and Multi-Krum (Blanchard et al. 2017) and Bulyan
(El Mhamdi et al. 2018) when a fraction of the 100 clients is malicious (the same clients every
round, drawn from the seed).

The argument is that fraction, then optionally the attack ("sign_flip": each malicious client
sends -4 x its update; "gaussian": N(0, 4^2) noise in every coordinate); append ",runlocal" for a
seconds-long smoke version. The trimmed mean cuts, and Krum, Multi-Krum and Bulyan assume, the
malicious fraction (at least 10%).

  python scripts/federated.py --config configs/fl_robust.py:0.3
  python scripts/federated.py --config configs/fl_robust.py:0.1,gaussian
"""

from trustjax.federated.experiments import snips_iid_config


def get_config(arg: str = "0.2"):
  fraction, *flags = arg.split(",")
  attack = "gaussian" if "gaussian" in flags else "sign_flip"
  c = snips_iid_config(runlocal="runlocal" in flags)
  c.fl.byzantine.fraction = float(fraction)
  c.fl.byzantine.attack = attack
  c.fl.byzantine.scale = 4.0
  c.fl.robust_fraction = max(0.1, float(fraction))
  c.strategies = {
      "mean": {"aggregator": "mean"},
      "median": {"aggregator": "median"},
      "trimmed_mean": {"aggregator": "trimmed_mean"},
      "krum": {"aggregator": "krum"},
      "multi_krum": {"aggregator": "multi_krum"},
      "bulyan": {"aggregator": "bulyan"},
  }
  c.run_name = f"fl_robust_{fraction}_{attack}" + ("_runlocal" if "runlocal" in flags else "")
  c.lock()
  return c
