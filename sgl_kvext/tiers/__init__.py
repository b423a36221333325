"""The tier chain: host memory, local disk and S3 stores of KV pages (no SGLang import).

Tiers do not import the tree or the fragment index; the SGLang integration wires them.
"""

from sgl_kvext.tiers.base import PutResult, Tier, TierCapabilities
from sgl_kvext.tiers.chain import ChainGet, ChainLookup, TierChain
from sgl_kvext.tiers.objects import CorruptObject, KVPage

__all__ = ["ChainGet", "ChainLookup", "CorruptObject", "KVPage", "PutResult", "Tier",
           "TierCapabilities", "TierChain"]
