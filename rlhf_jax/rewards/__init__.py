"""Reward sources and how they combine.

A reward source scores sampled responses. Three kinds:

* ``reward_model``: a scalar reward model (a device function of the tokens);
* ``function``: a Python function of the decoded text, run on the host, batched;
* ``verifier``: a ``function`` whose values must be 0 or 1 (an exact checker).

Every host source has one signature, that of TRL's reward functions::

    def reward(prompts: list[str], responses: list[str], **columns) -> Sequence[float]

``prompts`` are the decoded prompt texts, ``responses`` the response texts (a prompt's
``response_prefix`` plus the sampled completion), and ``columns`` the prompt records' other
fields (e.g. ``answer=[...]``), one list entry per row. Sources combine as a weighted sum
(:class:`RewardSum`); each source's mean and wall time are logged under ``reward/<name>/``.
"""

from rlhf_jax.rewards.combine import RewardSum
from rlhf_jax.rewards.functions import Reward, RewardFunctionError, load_reward, verifier

__all__ = ["Reward", "RewardFunctionError", "RewardSum", "load_reward", "verifier"]
