"""Pre-warm a RAG corpus into a running server (``--kvext-fragment-blend``), from Python.

:func:`prewarm_corpus` posts the texts to ``/kvext/prewarm`` and waits until the server has
registered every fragment (computed on its own, stored and written through its tier chain),
so other instances sharing the disk folder or S3 prefix find them too. Standard library only.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any, NamedTuple


class PrewarmResult(NamedTuple):
    """Fragments registered for the corpus (whole texts and their automatic fragments)."""

    fragments: int
    seconds: float


#: Texts and characters per pre-warm request (the server takes at most 4,096 texts and
#: 262,144 tokens per request; English runs ~4 characters per token).
PART_TEXTS, PART_CHARS = 1024, 512 << 10


class _Busy(Exception):
    """HTTP 429: the server's registration queue is full for now."""

    def __init__(self, retry_after_s: float) -> None:
        super().__init__(f"busy, retry after {retry_after_s} s")
        self.retry_after_s = retry_after_s


def _post(url: str, body: dict[str, Any], timeout_s: float,
          api_key: str | None = None) -> dict[str, Any]:
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            answer: dict[str, Any] = json.loads(resp.read())
            return answer
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")[:500]
        if exc.code == 429:
            retry = exc.headers.get("Retry-After", "1")
            raise _Busy(float(retry) if retry.replace(".", "", 1).isdigit() else 1.0) from None
        raise ValueError(f"{url}: HTTP {exc.code}: {detail}") from None


def _parts(texts: Sequence[str]) -> list[list[str]]:
    """``texts`` in consecutive parts of at most PART_TEXTS texts / PART_CHARS characters
    (a longer text goes alone)."""
    parts: list[list[str]] = [[]]
    size = 0
    for text in texts:
        if parts[-1] and (len(parts[-1]) >= PART_TEXTS or size + len(text) > PART_CHARS):
            parts.append([])
            size = 0
        parts[-1].append(text)
        size += len(text)
    return parts


def prewarm_corpus(base_url: str, texts: Sequence[str], *, extra_key: str = "",
                   cache_salt: str = "", timeout_s: float = 600.0,
                   poll_s: float = 0.5, api_key: str | None = None) -> PrewarmResult:
    """Register ``texts`` (RAG chunks) as fragments in the server at ``base_url``.

    Parameters
    ----------
    base_url
        e.g. ``http://127.0.0.1:30000``.
    texts
        Non-empty chunk texts, each as it appears in prompts.
    extra_key, cache_salt
        The tenant the fragments belong to (as the requests that will use them send).
    timeout_s
        Longest wait for registration; ``TimeoutError`` after it (what was registered stays).
    api_key
        The server's ``--admin-api-key`` (or ``--api-key`` when it has no admin key): the
        routes are gated like SGLang's own control routes.
    """
    if not texts:
        raise ValueError("texts must hold at least one chunk")
    started = time.monotonic()
    base = base_url.rstrip("/")
    tenant = {"extra_key": extra_key, "cache_salt": cache_salt}
    deadline = started + timeout_s
    keys: list[str] = []
    for part in _parts(texts):        # a part the server is too busy for waits its turn
        while True:
            try:
                answer = _post(base + "/kvext/prewarm", {"texts": part, **tenant},
                               max(1.0, deadline - time.monotonic()), api_key)
                break
            except _Busy as busy:
                if time.monotonic() + busy.retry_after_s >= deadline:
                    raise TimeoutError(f"the server's pre-warm queue stayed full for "
                                       f"{timeout_s:.0f}s ({len(keys)} fragments sent)") from None
                time.sleep(busy.retry_after_s)
        keys += answer["keys"]
    while True:
        status = _post(base + "/kvext/fragments", {"keys": keys, **tenant}, 30.0, api_key)
        known = sum(bool(k) for k in status["known"])
        if known == len(keys):
            return PrewarmResult(len(keys), time.monotonic() - started)
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{known} of {len(keys)} fragments registered after "
                               f"{timeout_s:.0f}s; registration continues in the server")
        time.sleep(poll_s)
