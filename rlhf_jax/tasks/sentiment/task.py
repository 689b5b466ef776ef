"""The built-in sentiment task: the "positive review" task of Ziegler et al. 2019 §4.1 with
*human* judgements.

SFT on review snippets (any sentiment); a reward model on pairs of snippets whose mean human
ratings differ by ``data.margin`` (Hutto & Gilbert 2014, ``ratings.py``); PPO / DPO towards
positive text; and the VADER analyser as an independent judge that the reward model never
saw. RL and evaluation prompts are the domain's instruction with the opening words of a
held-out snippet pre-filled at the start of the response (``response_prefix``), so that
``prompt + response`` has exactly the format the reward model was trained on.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from rlhf_jax.tasks import Task, register_task


def _messages(instruction: str, system_prompt: str | None) -> list[dict] | str:
    """The chat prompt of a record: ``[system,] user`` (plain text without a system prompt)."""
    if system_prompt is None:
        return instruction
    return [{"role": "system", "content": system_prompt}, {"role": "user", "content": instruction}]


def vader_judge(prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
    """VADER compound score in [-1, 1] of each response text (Hutto & Gilbert 2014); the
    prompts are not judged."""
    del prompts
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    analyzer = SentimentIntensityAnalyzer()
    return np.asarray([analyzer.polarity_scores(t)["compound"] for t in responses], np.float64)


def sentiment_records(data, cache_dir=None) -> dict[str, list[dict]]:
    """The task's records by role from ``data`` (a ``rlhf_jax.pipeline.config.DataConfig``):
    SFT, preferences and unpaired examples (KTO: the sign of each snippet's human mean) from the
    train split, RL prompts from validation, evaluation prompts and held-out preferences from
    test (splits by document, ``ratings.split_sentiment_ratings``)."""
    from rlhf_jax.tasks.sentiment import records as r
    from rlhf_jax.tasks.sentiment.ratings import fetch_sentiment_ratings, split_sentiment_ratings
    splits = split_sentiment_ratings(fetch_sentiment_ratings(cache_dir), seed=0)
    kw = dict(min_words=data.min_words, max_words=data.max_words, domains=data.domains)
    prompt_kw = dict(opening_words=data.opening_words,
                     min_words=max(data.min_words, data.opening_words + 1),
                     max_words=data.max_words, domains=data.domains)
    sft = r.sentiment_sft_records(splits["train"], **kw)
    if data.system_prompt is not None:
        sft = [{"messages": _messages(x["prompt"], data.system_prompt)
                + [{"role": "assistant", "content": x["completion"]}]} for x in sft]

    def preferences(split):
        recs = r.sentiment_preference_records(splits[split], margin=data.margin, seed=data.seed, **kw)
        if split == "train":  # data.max_preferences: a random slice of the training pairs
            recs = r.random_subset(recs, data.max_preferences, seed=data.seed)
        return [{**x, "prompt": _messages(x["prompt"], data.system_prompt)} for x in recs]

    unpaired = [{**x, "prompt": _messages(x["prompt"], data.system_prompt)}
                for x in r.sentiment_unpaired_records(splits["train"], **kw)]

    def prompts(split):
        return [{"prompt": _messages(r.INSTRUCTIONS[x["domain"]], data.system_prompt),
                 "response_prefix": x["opening"]}
                for x in r.sentiment_prompt_records(splits[split], **prompt_kw)]

    return {"sft": sft, "preferences": preferences("train"),
            "eval_preferences": preferences("test"), "prompts": prompts("validation"),
            "eval_prompts": prompts("test"), "unpaired": unpaired}


@register_task("sentiment")
def sentiment_task(cfg) -> Task:
    """The sentiment task for ``cfg.data`` (domains, margin, lengths, system prompt)."""
    records = sentiment_records(cfg.data, cfg.cache_dir)
    return Task(
        name="sentiment", sources=records, judge=vader_judge,
        judge_name="VADER compound score",
        description=(
            "Human sentiment ratings (Hutto & Gilbert, ICWSM 2014; domains "
            f"{', '.join(cfg.data.domains or ('all',))}): SFT on snippets, reward model on "
            + (f"a random {cfg.data.max_preferences} of the " if cfg.data.max_preferences else "")
            + f"pairs whose mean human ratings differ by >= {cfg.data.margin}, prompts pre-filled "
            "with a held-out snippet's opening words. Judge: VADER compound score of the review "
            "text (opening + completion), an analyser the reward model never saw."))
