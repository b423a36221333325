"""The page path: a token path's KV cut into pages under chained keys (``keys``), copied out of
and into SGLang's pool (``kv_pages``), spilled to and loaded from the tier chain
(``tiering``), promoted from slow tiers ahead of need (``prefetch``) within what the cost model
allows (``cost_model``); ``recent_keys`` remembers what is stored."""
