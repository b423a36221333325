"""What a match decided, kept for the ``init_load_back`` that follows it, and what an eviction
hands to the tiers.

SGLang asks the tree twice per request: ``match_prefix`` (how much is cached, including a host
hit's length) and then ``init_load_back`` (bring it in). :class:`HierarchicalRadixCache
<sgl_kvext.sglang_plugin.tree.HierarchicalRadixCache>` decides in the first and acts in the
second; between them the decision waits as one of three steps, keyed by the request.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch

from sgl_kvext.fragments.blender import BlendPlan
from sgl_kvext.pages.keys import Tenant
from sgl_kvext.pages.plans import LoadPlan
from sgl_kvext.sglang_plugin.surface import RadixKey, TreeNode


@dataclasses.dataclass(frozen=True, slots=True)
class HoldStep:
    """A prefetch is still running: keep the request queued (``init_load_back`` -> None)."""


@dataclasses.dataclass(frozen=True, slots=True)
class LoadStep:
    """Load ``plan``'s pages into new slots under ``node``; ``key`` holds their tokens."""

    node: TreeNode
    key: RadixKey          # tokens [plan.start, plan.end), a copy (the request's ids change)
    plan: LoadPlan


@dataclasses.dataclass(frozen=True, slots=True)
class BlendStep:
    """Fill ``plan``'s span under ``node`` with the request's finished blend."""

    node: TreeNode
    key: RadixKey
    plan: BlendPlan


class Victim(NamedTuple):
    """An evicted node's path, to spill: tokens ``[start, ...)`` are the node's own, the
    rest is ``parent``'s path (None: spill the whole path)."""

    tenant: Tenant
    tokens: list[int]
    slots: torch.Tensor
    start: int
    parent: TreeNode | None
