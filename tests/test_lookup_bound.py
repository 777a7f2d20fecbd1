"""lookup_replay: replaying PromptLookup on the greedy tokens gives the calls and tokens that
speculative decoding with PromptLookup measures; the best-of-all-matches oracle never does
worse; a small case counted by hand."""

from __future__ import annotations

import pytest
import torch
from helpers import random_model

import pangu_fn as pf
from pangu_fn.errors import InputError
from pangu_fn.speculative import PromptLookup, SpecStats, lookup_replay, speculative_generate


def test_a_case_counted_by_hand():
    # prompt 1 2 3 4 1 2; the prefill gives 3. Context ...1 2 3: the 3-gram "1 2 3" occurred
    # ending before index 3, so lookup drafts 4 1 2 3 (k = 4). The target goes on 4 1 9 9 9:
    # call 1 keeps 4 1 and the correction 9. No 9 occurred before: call 2 keeps one 9. The last
    # token leaves no room to draft: call 3 keeps it.
    prompt, continuation = [1, 2, 3, 4, 1, 2], [3, 4, 1, 9, 9, 9]
    assert lookup_replay(prompt, continuation, k=4) == (3, 5)
    # no repeats at all: one token per call
    assert lookup_replay([1, 2], [3, 4, 5], k=4) == (2, 2)


def test_the_oracle_takes_an_older_match_when_the_latest_is_wrong():
    # context 7 1 5 0 7 1 6 0 7 1 (the last 1 from the prefill); the target continues 5 0 2.
    # Lookup's draft follows the 3-gram "0 7 1": 6 0, rejected (call 1 keeps 5); then "7 1 5"
    # gives 0 7, room for one draft: 0 accepted, call 2 keeps 0 2. The oracle also sees the
    # 2-gram "7 1" at the start, followed by 5 0: both accepted with the correction 2.
    prompt, continuation = [7, 1, 5, 0, 7, 1, 6, 0, 7], [1, 5, 0, 2]
    assert lookup_replay(prompt, continuation, k=2) == (2, 3)
    assert lookup_replay(prompt, continuation, k=2, best_of_all=True) == (1, 3)


@pytest.mark.parametrize("k", [1, 3, 6])
def test_replay_equals_speculative_decoding_with_prompt_lookup(k):
    torch.set_num_threads(1)
    params, cfg = random_model("tiny-openpangu", seed=3)
    params["tok_embed"] = {"weight": params["tok_embed"]["weight"] * 0.1}
    prompts = [[5, 6, 7, 8, 5, 6, 7, 8, 5, 6], [9, 10, 11, 9, 10], [3, 4, 5, 3, 4, 11, 12, 13, 3]]
    accepted = 0
    for prompt in prompts:
        plain = pf.generate(params, cfg, [prompt], 24, eos_token_ids=())[0].tokens
        stats = SpecStats()
        speculative_generate(params, cfg, [prompt], 24, eos_token_ids=(), drafter=PromptLookup(), k=k, stats=stats)
        assert lookup_replay(prompt, plain, k) == (stats.row_steps, stats.tokens)
        best_calls, best = lookup_replay(prompt, plain, k, best_of_all=True)
        assert best == stats.tokens and best_calls <= stats.row_steps
        accepted += stats.accepted
    assert accepted > 0  # the replays compared had drafts to accept


@pytest.mark.parametrize("bad", [{"k": 0}, {"k": 4, "min_ngram": 0}, {"k": 4, "max_ngram": 1, "min_ngram": 2}])
def test_bad_arguments_get_a_typed_error(bad):
    with pytest.raises(InputError, match="lookup_replay: expected"):
        lookup_replay([1, 2, 1], [2, 1], **bad)
