"""Reward sources and how they combine.

A reward source scores sampled responses. Three kinds:

* ``reward_model``: a scalar reward model (a device function of the tokens);
* ``function``: a Python function of the decoded text, run on the host, batched;
* ``verifier``: a ``function`` whose values must be 0 or 1 (an exact checker);
* ``rule``: a ``function`` whose values are penalties <= 0 (0: the response satisfies the
  rule), with its violation rate logged (``rlhf_jax.rewards.rules``: length limits, banned
  strings, required formats).

Every host source has one signature, that of TRL's reward functions::

    def reward(prompts: list[str], responses: list[str], **columns) -> Sequence[float]

``prompts`` are the decoded prompt texts, ``responses`` the response texts (a prompt's
``response_prefix`` plus the sampled completion), and ``columns`` the prompt records' other
fields (e.g. ``answer=[...]``), one list entry per row. Sources combine as a weighted sum
(:class:`RewardSum`); each source's mean and wall time are logged under ``reward/<name>/``.
``load_reward`` reads the command line's ``--reward`` specs: ``module:function[=weight]``,
``module:factory(arg=value, ...)[=weight]`` or a registered rule ``max_length(words=40)=0.5``.
"""

from rlhf_jax.rewards.combine import RewardSum
from rlhf_jax.rewards.functions import Reward, RewardFunctionError, load_reward, rule, verifier
from rlhf_jax.rewards.rules import RULES, register_rule

__all__ = ["RULES", "Reward", "RewardFunctionError", "RewardSum", "load_reward", "register_rule",
           "rule", "verifier"]
