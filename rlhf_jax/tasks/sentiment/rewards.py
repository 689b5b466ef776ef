"""Host rewards of the sentiment task.

``vader_positive`` is the classifier reward of the seed documents in its simplest form: a
0/1 verdict of an independent classifier (VADER, Hutto & Gilbert 2014) on the response text.
Use it on the command line as ``--reward rlhf_jax.tasks.sentiment.rewards:vader_positive``,
alone (``--ppo.reward-model-weight 0``) or beside the learned reward model.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from rlhf_jax.rewards import verifier

#: VADER's own threshold for "positive" (compound >= 0.05; Hutto & Gilbert 2014, the
#: vaderSentiment README's recommended cut-offs).
POSITIVE_THRESHOLD = 0.05


@verifier
def vader_positive(prompts: Sequence[str], responses: Sequence[str], **columns) -> np.ndarray:
    """``[B]`` 1.0 where VADER's compound score of the response is >= 0.05 (positive), else
    0.0. The prompts and record columns are not used."""
    del prompts, columns
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    analyzer = SentimentIntensityAnalyzer()
    return np.asarray([analyzer.polarity_scores(t)["compound"] >= POSITIVE_THRESHOLD
                       for t in responses], np.float64)
