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


class PrewarmFailed(RuntimeError):
    """Some fragments could not be stored after every attempt (the server's last tier refused
    or timed out: its log and ``kvext_fragment_register_failed`` say more)."""


def prewarm_corpus(base_url: str, texts: Sequence[str], *, extra_key: str = "",
                   cache_salt: str = "", timeout_s: float = 600.0,
                   poll_s: float = 0.5, api_key: str | None = None,
                   attempts: int = 3) -> PrewarmResult:
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
    attempts
        Times a part whose fragments failed to register is sent (>= 1); after the last,
        :class:`PrewarmFailed` names how many failed.
    """
    if not texts:
        raise ValueError("texts must hold at least one chunk")
    if attempts < 1:
        raise ValueError(f"attempts must be >= 1, got {attempts}")
    started = time.monotonic()
    base = base_url.rstrip("/")
    tenant = {"extra_key": extra_key, "cache_salt": cache_salt}
    deadline = started + timeout_s
    parts = _parts(texts)
    keys: list[list[str]] = [[] for _ in parts]
    todo = list(range(len(parts)))
    for _ in range(attempts):
        for i in todo:              # a part the server is too busy for waits its turn
            keys[i] = _send(base, {"texts": parts[i], **tenant}, deadline, api_key)
        states = _settled(base, [k for ks in keys for k in ks], tenant, deadline, poll_s,
                          api_key)
        failed = {k for k, s in states.items() if s != "registered"}
        if not failed:
            return PrewarmResult(len(states), time.monotonic() - started)
        todo = [i for i, ks in enumerate(keys) if failed.intersection(ks)]
    refused = sum(states[k] == "failed" for k in failed)
    why = [f"{refused} refused or timed out by the server's last tier (see its log)"] \
        if refused else []
    if len(failed) > refused:
        why.append(f"{len(failed) - refused} forgotten again (more fragments than the "
                   "server's fragment index holds: pre-warm fewer at a time)")
    raise PrewarmFailed(f"{len(failed)} of {len(states)} fragments could not be registered in "
                        f"{attempts} attempts: " + "; ".join(why))


def _send(base: str, body: dict[str, Any], deadline: float, api_key: str | None) -> list[str]:
    """POST one part to /kvext/prewarm, waiting out a full queue; its fragment keys."""
    while True:
        try:
            answer = _post(base + "/kvext/prewarm", body, max(1.0, deadline - time.monotonic()),
                           api_key)
            return list(answer["keys"])
        except _Busy as busy:
            if time.monotonic() + busy.retry_after_s >= deadline:
                raise TimeoutError("the server's pre-warm queue stayed full past the "
                                   "deadline") from None
            time.sleep(busy.retry_after_s)


def _settled(base: str, keys: list[str], tenant: dict[str, str], deadline: float,
             poll_s: float, api_key: str | None) -> dict[str, str]:
    """Each key's registration state once none is pending (``TimeoutError`` at the deadline).
    Servers older than the ``state`` field answer ``known`` only: unknown reads as pending."""
    while True:
        status = _post(base + "/kvext/fragments", {"keys": keys, **tenant}, 30.0, api_key)
        states = status.get("state") or ["registered" if k else "pending"
                                          for k in status["known"]]
        by_key = dict(zip(keys, states, strict=True))
        if "pending" not in by_key.values():
            return by_key
        if time.monotonic() >= deadline:
            done = sum(s == "registered" for s in by_key.values())
            raise TimeoutError(f"{done} of {len(by_key)} fragments registered by the deadline; "
                               "registration continues in the server")
        time.sleep(poll_s)
