"""Pure loss maths for RLHF: arrays in, ``(loss, metrics)`` out.

Imports only jax, optax and chex (never flax, never a model). Metrics are
``name -> (sum, count)`` pairs; sum them across microbatches/devices and call
:func:`reduce_metrics` once. ``logprobs`` is the only module that shifts logits by one token.
"""

from rlhf_jax.losses.advantages import (
    broadcast_sequence_advantages,
    gae,
    grpo_advantages,
    reinforce_baseline_advantages,
    rloo_advantages,
    whiten_advantages,
)
from rlhf_jax.losses.dpo import (
    DPO_LOSSES,
    DPOLoss,
    dpo_loss,
    get_dpo_loss,
    dpo_sigmoid_loss,
    hinge_loss,
    ipo_loss,
    orpo_loss,
    robust_dpo_loss,
    simpo_loss,
)
from rlhf_jax.losses.dpo_variants import (
    apo_down_loss,
    apo_zero_loss,
    bco_pair_loss,
    bco_reward_shift,
    dpop_loss,
    exo_pair_loss,
    nca_pair_loss,
    sppo_hard_loss,
)
from rlhf_jax.losses.kto import kto_loss, kto_reference_point
from rlhf_jax.losses.kl import kl_estimate, kl_from_logits, sequence_kl
from rlhf_jax.losses.logprobs import (
    Metric,
    Metrics,
    add_metrics,
    aggregate_loss,
    entropy_from_logits,
    gather_logprobs,
    masked_count,
    masked_mean,
    masked_sum,
    masked_var,
    metric,
    reduce_metrics,
    sequence_logprobs,
    whiten,
)
from rlhf_jax.losses.ppo import (
    clipped_policy_loss,
    clipped_value_loss,
    kl_shaped_rewards,
    missing_eos_penalty,
    ppo_loss,
)
from rlhf_jax.losses.reward import (
    best_of_n_loss,
    bradley_terry_loss,
    normalization_gain_bias,
    ranking_loss,
)
from rlhf_jax.losses.sft import sft_loss

__all__ = [
    "Metric",
    "Metrics",
    "add_metrics",
    "aggregate_loss",
    "apo_down_loss",
    "apo_zero_loss",
    "bco_pair_loss",
    "bco_reward_shift",
    "best_of_n_loss",
    "bradley_terry_loss",
    "broadcast_sequence_advantages",
    "clipped_policy_loss",
    "clipped_value_loss",
    "DPO_LOSSES",
    "DPOLoss",
    "dpo_loss",
    "get_dpo_loss",
    "dpo_sigmoid_loss",
    "dpop_loss",
    "entropy_from_logits",
    "exo_pair_loss",
    "gae",
    "gather_logprobs",
    "grpo_advantages",
    "hinge_loss",
    "ipo_loss",
    "kl_estimate",
    "kl_from_logits",
    "kl_shaped_rewards",
    "kto_loss",
    "kto_reference_point",
    "masked_count",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "metric",
    "missing_eos_penalty",
    "nca_pair_loss",
    "normalization_gain_bias",
    "orpo_loss",
    "ppo_loss",
    "ranking_loss",
    "reduce_metrics",
    "reinforce_baseline_advantages",
    "rloo_advantages",
    "robust_dpo_loss",
    "sequence_kl",
    "sequence_logprobs",
    "sft_loss",
    "simpo_loss",
    "sppo_hard_loss",
    "whiten",
    "whiten_advantages",
]
