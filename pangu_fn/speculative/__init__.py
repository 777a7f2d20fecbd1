"""Speculative decoding: drafters, a pure step function, and generate/stream loops.

    state, events = spec_init(target, drafter, prompts, max_new_tokens, sampling, rng)
    state, events, stats = spec_step(target, drafter, state, sampling, rng)   # until not state.rows

Greedy output equals plain greedy decoding token for token; sampled output has exactly the
target's distribution (rejection sampling of Leviathan et al. / Chen et al.).
"""

from .accept import greedy_accept, rejection_sample
from .adaptive import AdaptiveK
from .drafters import Drafter, DraftModel, LookupFirst, Model, PromptLookup, SelfDraft, load_drafter, make_drafter
from .lookup_bound import lookup_replay
from .loop import SpecStats, speculative_generate, speculative_stream
from .step import SpecState, StepStats, spec_init, spec_step

__all__ = [
    "AdaptiveK", "DraftModel", "Drafter", "LookupFirst", "Model", "PromptLookup", "SelfDraft", "SpecState", "SpecStats",
    "StepStats", "greedy_accept", "load_drafter", "lookup_replay", "make_drafter", "rejection_sample", "spec_init", "spec_step",
    "speculative_generate", "speculative_stream",
]
