"""Backdoor attacks on federated SNIPS and the defences against them.

A fraction of the 100 clients (the argument; the same clients for every strategy, drawn from the
seed) is malicious: each inserts the trigger word "cf" into half of its utterances, relabels
them AddToPlaylist (class 0), trains on them as an honest client would, and sends its update
boosted x`scale` (Bagdasaryan et al. 2020's model replacement at scale = clients per round; 1
= plain data poisoning). Each strategy reports the clean accuracy and the backdoor accuracy (the
share of triggered validation queries of the other six intents classified AddToPlaylist):

  no_attack      FedAvg without malicious clients (how often "cf" alone already flips a query)
  mean           FedAvg's weighted mean, no defence
  norm_bound     each update scaled to L2 norm <= M first (Sun et al. 2019)
  weak_dp        DP-FedAvg: updates clipped to M, Gaussian noise of std sigma M at the server
                 (Sun et al.'s "weak DP", here with its user-level epsilon)
  rlr            the robust learning rate (Ozdayi et al. 2021): the mean's sign flipped where
                 fewer than K of the cohort agree on a coordinate's direction (K = the expected
                 attackers per cohort + 2)
  rlr_bound      the same on updates norm-bounded at M first
  median, trimmed_mean, multi_krum    Byzantine-robust rules (assuming the malicious fraction)

Arguments: fraction[,scale=S][,sigma=Z][,bound=M][,rlr=K][,alpha=A][,runlocal] (alpha: the
clients' labels ~ Dir(A) instead of iid); e.g.

  python scripts/federated.py --config configs/fl_backdoor.py:0.1
  python scripts/federated.py --config configs/fl_backdoor.py:0.1,scale=1
  python scripts/federated.py --config configs/fl_backdoor.py:0.1,alpha=0.1
"""

from trustjax.federated.experiments import snips_iid_config


def get_config(arg: str = "0.1"):
  fraction, *flags = arg.split(",")
  opts = dict(f.split("=", 1) for f in flags if "=" in f)
  scale = float(opts.get("scale", 20.0))
  bound = float(opts.get("bound", 0.5))
  sigma = float(opts.get("sigma", 0.1))
  c = snips_iid_config(runlocal="runlocal" in flags)
  rlr = int(opts.get("rlr", round(float(fraction) * c.fl.clients_per_round) + 2))
  c.data.tokenizer = "hash"  # DP (weak_dp) needs a vocabulary that is not built from the clients
  if "alpha" in opts:
    c.data.partition = "dirichlet_label"
    c.data.alpha = float(opts["alpha"])
  c.fl.byzantine.fraction = float(fraction)
  c.fl.byzantine.attack = "backdoor"
  c.fl.byzantine.scale = scale
  c.fl.byzantine.trigger = "cf"
  c.fl.byzantine.target = 0
  c.fl.byzantine.poison_fraction = 0.5
  c.fl.robust_fraction = max(0.1, float(fraction))
  c.fl.norm_bound = bound
  c.fl.rlr_threshold = rlr
  c.strategies = {
      "no_attack": {"byzantine": {"fraction": 0.0}},
      "mean": {"aggregator": "mean"},
      "norm_bound": {"aggregator": "norm_bound"},
      "weak_dp": {"server_optimizer": "sgd", "server_lr": 1.0,
                  "dp": {"enabled": True, "l2_clip": bound, "noise_multiplier": sigma}},
      "rlr": {"aggregator": "rlr", "norm_bound": 0.0},
      "rlr_bound": {"aggregator": "rlr"},
      "median": {"aggregator": "median"},
      "trimmed_mean": {"aggregator": "trimmed_mean"},
      "multi_krum": {"aggregator": "multi_krum"},
  }
  c.run_name = (f"fl_backdoor_{fraction}" + "".join(f"_{k}{v}" for k, v in sorted(opts.items()))
                + ("_runlocal" if "runlocal" in flags else ""))
  c.lock()
  return c
