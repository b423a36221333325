"""Close calls: blended prompts computed again, exactly.

A blend's first-token KL against exact prefill is a tail, and what predicts it is the model's
own uncertainty, not anything the check layer sees (docs/cacheblend.md, "Close calls"): where
the next token is a close call a small change of the context moves it most. So a blend whose
first-token distribution has an entropy above a threshold is thrown away and its span
computed exactly; the threshold trades the blend's speed for its quality.
"""

from __future__ import annotations

import math

import torch


def first_token_entropy(logits: torch.Tensor) -> float:
    """Entropy (nats) of the softmax of ``logits`` [vocab]: 0 for a certain token, log(vocab)
    for a uniform choice."""
    logp = torch.log_softmax(logits.detach().double().cpu(), -1)
    return float(-(logp.exp() * logp).sum())


def check_threshold(threshold: float) -> float:
    """``threshold`` if it is a usable gate (>= 0; ``inf``: never), else ValueError."""
    if math.isnan(threshold) or threshold < 0:
        raise ValueError(f"the close-call entropy must be >= 0 nats (inf: never), got "
                         f"{threshold}")
    return threshold
