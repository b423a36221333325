"""The server configurations the benchmarks compare: one table for every subcommand.

On a CPU every started server also gets SGLang's CPU engine flags with the ``kvext_cpu``
attention backend (``sgl_kvext.harness.server.CPU_FLAGS``) and, unless ``--server-args``
picks one, the CPU's fast dtype; those apply to every configuration alike.
"""

from __future__ import annotations

#: The host tier every hierarchical configuration gets.
HOST_SIZE = "4GiB"
HIERARCHICAL = ("--enable-hierarchical-kv", "--kvext-host-size", HOST_SIZE, "--enable-metrics")
BLEND = (*HIERARCHICAL, "--kvext-fragment-blend")

CONFIGS: dict[str, tuple[str, ...]] = {
    "no_cache": ("--disable-radix-cache",),
    "radix": (),
    "hierarchical": HIERARCHICAL,
    # Marked chunks (the rag benchmark marks each prompt's documents): only marked chunks are
    # indexed; automatic fragments would never be used beside marks that cover the documents,
    # yet each costs a computation and host-tier room (200 documents' automatic fragments and
    # spilled pages overflowed the 4 GiB host tier and evicted marked documents' KV) ...
    "hierarchical_blend": (*BLEND, "--kvext-fragment-chunking", "explicit"),
    # ... or automatic chunks only (nothing marked).
    "hierarchical_blend_auto": BLEND,
}
