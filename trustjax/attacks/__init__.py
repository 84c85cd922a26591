"""Privacy attacks that measure what a trained model leaks: membership inference (loss threshold,
LiRA and RMIA with shadow models trained in parallel), canary exposure, model inversion (ModIvA),
and the empirical epsilon lower bound that relates them to the accounted epsilon; and backdoor
poisoning (trigger words), measured against what DP's group guarantee allows."""

from trustjax.attacks import backdoor, canaries, inversion, membership, metrics, shadow
from trustjax.attacks.canaries import exposure, insert_canaries
from trustjax.attacks.inversion import Inversion, invert_canary
from trustjax.attacks.membership import (leave_one_out_lira, leave_one_out_rmia, lira_scores,
                                         logit_confidence, loss_threshold_scores, rmia_scores)
from trustjax.attacks.metrics import (best_threshold, empirical_epsilon_lower_bound,
                                      one_run_epsilon_lower_bound, roc_auc, roc_curve,
                                      tpr_at_fpr)
from trustjax.attacks.shadow import ParallelModels, membership_masks, train_in_parallel
