"""Fairness: intrinsic association tests on embeddings (WEAT, SEAT, CEAT), extrinsic group
metrics (rate gaps with fairlearn's signatures, the bias AUCs of identity subgroups), threshold
post-processing (Hardt et al. 2016), the exponentiated-gradient and grid-search reductions
(Agarwal et al. 2018), adversarial debiasing (Zhang et al. 2018) and linear decorrelation for
group parity, prediction
sensitivity, counterfactual augmentation and counterfactual distillation, and the gender
polarity and sentiment of generated text (BOLD's measures)."""

from trustjax.fairness import (adversarial, association, counterfactual, generation, group,
                               postprocessing, preprocessing, reductions, sensitivity)
from trustjax.fairness.adversarial import (AdversarialResult, adversarial_probabilities,
                                          fit_adversarial)
from trustjax.fairness.association import (WEAT_TESTS, CEATResult, association as association_scores, ceat,
                                           seat, weat_effect_and_variance, weat_effect_size,
                                           weat_p_value)
from trustjax.fairness.group import (bnsp_auc, bpsn_auc, demographic_parity_difference,
                                     demographic_parity_ratio, equal_opportunity_difference,
                                     equalized_odds_difference, equalized_odds_ratio,
                                     generalized_mean_bias, group_rates, metric_frame,
                                     MetricFrame, subgroup_auc)
from trustjax.fairness.counterfactual import (GENDER_PAIRS, counterfactual_augment,
                                              counterfactual_swap, distillation_loss,
                                              perturb_teacher, swap_permutation)
from trustjax.fairness.sensitivity import (accumulated_prediction_sensitivity,
                                           embedding_prediction_sensitivity,
                                           prediction_sensitivity)
from trustjax.fairness.generation import (gender_counts, gender_polarity,
                                         group_generation_measures, sentiment_labels,
                                         vader_compound)
from trustjax.fairness.postprocessing import (ThresholdRule, expected_rates, fit_thresholds,
                                             threshold_predict, threshold_probabilities)
from trustjax.fairness.reductions import (GridSearchResult, Learner, ReductionResult,
                                         exponentiated_gradient, grid_search,
                                         grid_search_predict, reduction_probabilities)
from trustjax.fairness.preprocessing import (CorrelationRemover, fit_correlation_remover,
                                            remove_correlation)
