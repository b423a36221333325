"""Where a request's cached prompt tokens came from, in its response.

Every request the tiering sees gets ``meta_info["kvext_load"][0]``, a plain dict
``{"device": n, "<tier>": n, ...}``: the prompt tokens its device match held and, when a run
of pages was loaded for it, the tokens each tier supplied, by tier name (``host``, ``disk``,
``s3``). A page the prefetcher read ahead for the request counts for the tier it was read
from (S3, say); a page promoted into the host tier for a later request is that request's
``host`` hit. SGLang's own ``cached_tokens_details`` splits ``device`` / ``host`` only (every
loaded token is ``host`` there). A blended request's fragments are in its blend report
(``kvext_blend``), not here.

Written at each match and again when the load succeeds; the one on the request when its
first output token is sent is the response's (SGLang's ``customized_info`` channel).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

#: The response's ``meta_info`` key holding ``[{"device": n, "<tier>": n, ...}]``.
LOAD_KEY = "kvext_load"


def put_info(req: Any, key: str, value: Mapping[str, Any]) -> None:
    """Put ``value`` in ``req``'s response as ``meta_info[key] = [value]`` (a list with one
    entry: SGLang's ``customized_info`` channel); the last one put before the first output
    token is the one sent."""
    if req is not None:
        held = getattr(req, "customized_info", None) or {}
        req.customized_info = {**held, key: [dict(value)]}


def report_load(req: Any, device_tokens: int, tier_tokens: Mapping[str, int] | None = None
                ) -> None:
    """Report ``device_tokens`` matched on the device and ``tier_tokens`` loaded per tier."""
    put_info(req, LOAD_KEY, {"device": device_tokens, **(tier_tokens or {})})
