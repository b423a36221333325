"""Per-request fragment options, read once when the scheduler creates a request.

Clients pass them in ``custom_params`` (inside ``sampling_params`` for ``/generate``; a
top-level field for the OpenAI routes), flat values only, as SGLang's transport requires:

- ``kvext_exact`` (bool): never give this request blended (approximate) KV;
- ``kvext_chunks`` (list of strings): the request's RAG chunks as texts, found in the prompt;
- ``kvext_chunk_spans`` (flat list of ints ``[start0, end0, start1, end1, ...]``): chunks as
  token spans of the prompt.

A BEFORE hook on the tokenizer manager's ``_create_tokenized_object`` (the HTTP process,
where the prompt has just been tokenized) refuses malformed options with HTTP 400 and turns
``kvext_chunks`` into spans: it tokenizes the chunks there and finds them in the prompt, so
the scheduler thread never tokenizes client text. Chunks may hold at most as many characters
in all as the prompt (16 per token for a prompt sent as token ids): a chunk is part of it.

With ``--kvext-fragment-blend`` on, a request that is not exact gets the blend mark appended
to its extra key (:mod:`.tenant`: one namespace for KV that may be approximate), and the tree
notes its marked spans by request id. An AROUND hook on ``Scheduler._create_generation_req``
(SGLang's extension point for request-local state) does both, before any prefix match.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from sgl_kvext.fragments.index import locate_chunks
from sgl_kvext.sglang_plugin.process_config import process_config
from sgl_kvext.sglang_plugin.surface import HOOK_CREATE_REQ, HOOK_TOKENIZE, HookRegistry, HookType
from sgl_kvext.sglang_plugin.tenant import with_blend_mark
from sgl_kvext.sglang_plugin.tree import HierarchicalRadixCache

logger = logging.getLogger("sgl_kvext")
EXACT, CHUNKS, SPANS = "kvext_exact", "kvext_chunks", "kvext_chunk_spans"
#: Most chunks and spans, together, one request may mark; more is refused, not truncated.
MAX_MARKS = 1024
#: Characters of ``kvext_chunks`` allowed per prompt token when the prompt came as token ids.
CHARS_PER_TOKEN = 16
#: Largest token position a span may name (2**31 - 1: no prompt is longer).
MAX_POSITION = 2**31 - 1

_registered = False


class FragmentOptions:
    """A request's parsed options (see the module doc); ``ValueError`` names a bad one."""

    def __init__(self, custom_params: Any) -> None:
        params = custom_params if isinstance(custom_params, dict) else {}
        unknown = sorted(str(k) for k in params if str(k).startswith("kvext_")
                         and k not in (EXACT, CHUNKS, SPANS))
        if unknown:
            raise ValueError(f"custom_params: unknown option(s) {unknown}; allowed: {EXACT}, "
                             f"{CHUNKS}, {SPANS}")
        exact = params.get(EXACT, False)
        if not isinstance(exact, bool):
            raise ValueError(f"custom_params.{EXACT} must be true or false, got {exact!r}")
        chunks = params.get(CHUNKS, [])
        if not isinstance(chunks, list) or not all(isinstance(c, str) and c for c in chunks):
            raise ValueError(f"custom_params.{CHUNKS} must be a list of non-empty strings")
        spans = params.get(SPANS, [])
        if (not isinstance(spans, list) or len(spans) % 2
                or not all(isinstance(x, int) and not isinstance(x, bool) for x in spans)):
            raise ValueError(f"custom_params.{SPANS} must be a flat list of ints "
                             "[start0, end0, start1, end1, ...]")
        pairs = list(zip(spans[::2], spans[1::2], strict=True))
        if any(not 0 <= s < e <= MAX_POSITION for s, e in pairs):
            raise ValueError(f"custom_params.{SPANS}: each span needs 0 <= start < end "
                             f"<= {MAX_POSITION}")
        if len(chunks) + len(pairs) > MAX_MARKS:
            raise ValueError(f"custom_params: at most {MAX_MARKS} {CHUNKS} and spans per "
                             f"request in all, got {len(chunks)} and {len(pairs)}")
        self.exact: bool = exact
        self.chunks: list[str] = chunks
        self.spans: list[tuple[int, int]] = pairs


def register_hooks() -> None:
    global _registered
    if not _registered:
        HookRegistry.register(HOOK_CREATE_REQ, _create_generation_req, HookType.AROUND)
        HookRegistry.register(HOOK_TOKENIZE, _check_options, HookType.BEFORE)
        _registered = True


def _check_options(self: Any, obj: Any, *args: Any, **kwargs: Any) -> None:
    """In the HTTP process: refuse bad options (a ValueError there is a 400 naming them) and
    replace ``kvext_chunks`` by the spans where they occur in the tokenized prompt."""
    params = getattr(obj, "sampling_params", None)
    if not isinstance(params, dict) or not isinstance(params.get("custom_params"), dict):
        return
    custom = params["custom_params"]
    options = FragmentOptions(custom)
    if not options.chunks:
        return
    input_text = args[0] if args else kwargs.get("input_text")
    input_ids = args[1] if len(args) > 1 else kwargs.get("input_ids")
    tokenizer = getattr(self, "tokenizer", None)
    if input_ids is None or tokenizer is None:
        raise ValueError(f"custom_params.{CHUNKS} needs a tokenized prompt and the server's "
                         f"tokenizer; send {SPANS} instead")
    limit = max(len(input_text) if isinstance(input_text, str) else 0,
                CHARS_PER_TOKEN * len(input_ids))
    total = sum(len(c) for c in options.chunks)
    if total > limit:
        raise ValueError(f"custom_params.{CHUNKS}: {total} characters in all, more than the "
                         f"prompt's {limit}; allowed: chunks that are part of the prompt")
    encoded = [tokenizer.encode(c, add_special_tokens=False) for c in options.chunks]
    spans = options.spans + locate_chunks(np.asarray(input_ids, dtype=np.int64), encoded)
    params["custom_params"] = {**{k: v for k, v in custom.items() if k != CHUNKS},
                               SPANS: [x for span in spans for x in span]}


def _create_generation_req(original: Any, self: Any, recv_req: Any, *args: Any,
                           **kwargs: Any) -> Any:
    req = original(self, recv_req, *args, **kwargs)
    config = process_config()
    if config is None or not config.enabled or not config.fragments.enabled:
        return req
    try:
        options = FragmentOptions(getattr(req.sampling_params, "custom_params", None))
    except ValueError as exc:
        # The tokenizer-side check refuses these first; here they only fall back to exact.
        logger.warning("sgl-kvext: request %s: %s; serving it exactly", req.rid, exc)
        return req
    if options.exact:
        return req
    req.extra_key = with_blend_mark(req.extra_key)
    if options.chunks:      # turned into spans by the tokenizer manager; never tokenized here
        logger.warning("sgl-kvext: request %s reached the scheduler with %s; ignoring them",
                       req.rid, CHUNKS)
    tree = getattr(self, "tree_cache", None)
    if options.spans and isinstance(tree, HierarchicalRadixCache):
        tree.note_chunk_spans(req.rid, sorted(options.spans))   # beside the request
    return req
