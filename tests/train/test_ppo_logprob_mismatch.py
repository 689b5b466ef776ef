"""The sampler-vs-trainer log-prob mismatch metric through both PPO paths: the fused
iteration (``make_ppo_iteration``) and the staged one (``PPOStages.iteration``, as the
pipeline runs with host rewards). Sampling at the trainer's float32 the two agree to float
rounding; sampling in bfloat16 from float32 masters (``SamplingConfig.dtype``) the gap is
measured, non-negative and of bfloat16's size."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.control import KLController
from rlhf_jax.models.model import Model
from rlhf_jax.rollout.sampler import SamplingConfig
from rlhf_jax.train import ppo
from rlhf_jax.train.state import OptimizerConfig, create_train_state, make_optimizer
from tests.train._tiny import EOS, PAD, TINY, host_params, on_device, prompts, reduced

POLICY = Model(TINY, kind="lm_value")
REWARD = Model(TINY, kind="scalar")
TX = make_optimizer(OptimizerConfig(lr=1e-3), POLICY.abstract_params())
KL = KLController(kind="fixed", init_kl_coef=0.05)

def _cfg(dtype):
    return ppo.PPOConfig(sampling=SamplingConfig(max_new_tokens=6, eos_token_id=EOS,
                                                 pad_token_id=PAD, dtype=dtype),
                         num_ppo_epochs=1, num_minibatches=1, kl=KL)

def _state():
    train = create_train_state(on_device(host_params("lm_value")), TX, jax.random.key(1))
    return ppo.init_ppo_state(train, KL, jax.random.key(2))

def _metrics(path: str, dtype):
    cfg = _cfg(dtype)
    prompt, mask = prompts(8, 5, seed=3)
    prompt, mask = jnp.asarray(prompt), jnp.asarray(mask)
    ref = on_device(host_params("lm_value"))
    if path == "fused":
        step = ppo.make_ppo_iteration(policy_model=POLICY, reward_model=REWARD, policy_tx=TX,
                                      cfg=cfg)
        _, metrics = step(_state(), prompt, mask, ref, on_device(host_params("scalar")))
    else:
        stages = ppo.PPOStages(policy_model=POLICY, policy_tx=TX, cfg=cfg)
        _, metrics = stages.iteration(_state(), prompt, mask, ref,
                                      lambda p, r, m: np.linspace(-1, 1, r.shape[0]))
    return reduced(metrics)

@pytest.mark.parametrize("path", ["fused", "staged"])
def test_mismatch_is_rounding_at_the_training_dtype_and_measured_in_bfloat16(path):
    same = _metrics(path, None)
    bf16 = _metrics(path, "bfloat16")
    for m in (same, bf16):
        assert {"rollout/logprob_mismatch", "rollout/logprob_mismatch_k3"} <= set(m)
    assert same["rollout/logprob_mismatch"] < 1e-5
    assert abs(same["rollout/logprob_mismatch_k3"]) < 1e-9
    # bfloat16 keeps 8 bits of mantissa: per-token log-prob gaps of ~1e-3 to 1e-1 nats
    assert 1e-4 < bf16["rollout/logprob_mismatch"] < 0.5
    assert 0.0 <= bf16["rollout/logprob_mismatch_k3"] < bf16["rollout/logprob_mismatch"]
