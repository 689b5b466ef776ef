"""Host reward functions for the pipeline tests (loaded by ``--reward module:function``)."""

import numpy as np

CALLS = {"n": 0}


def length_bonus(prompts, responses, **columns):
    """0.1 per word of the response (a smooth reward: groups rarely tie)."""
    return np.asarray([0.1 * len(r.split()) for r in responses])


def fails_on_second_call(prompts, responses, **columns):
    """Fine on the first call; on the second returns NaN for sample 3."""
    CALLS["n"] += 1
    out = np.zeros(len(responses))
    if CALLS["n"] >= 2:
        out[3] = np.nan
    return out
