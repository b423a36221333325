"""A streaming client for OpenAI-compatible ``/v1/completions`` servers (SGLang's included).

Timing matches :func:`sgl_kvext_bench.client.stream_generate`: TTFT is the first streamed
chunk that carries text, inter-token latency the gaps between later ones. Prompt, completion
and cached token counts come from the final ``usage`` chunk (``stream_options.include_usage``);
a server reports cached tokens only when it chooses to (SGLang: ``--enable-cache-report``),
else they read 0.
"""

from __future__ import annotations

import json
import time
import urllib.request
from typing import Any

from sgl_kvext_bench.client import Timed


def served_model(url: str, timeout_s: float = 30.0) -> str:
    """The first model id ``GET /v1/models`` lists at ``url``."""
    with urllib.request.urlopen(url.rstrip("/") + "/v1/models", timeout=timeout_s) as resp:
        listed = json.loads(resp.read()).get("data") or []
    if not listed or not isinstance(listed[0], dict) or "id" not in listed[0]:
        raise RuntimeError(f"{url}/v1/models lists no model")
    return str(listed[0]["id"])


def stream_completion(url: str, model: str, prompt: str | list[int], max_new_tokens: int,
                      timeout_s: float = 600.0) -> Timed:
    """Greedy streamed ``POST /v1/completions`` of ``prompt`` (text or token ids)."""
    payload: dict[str, Any] = {"model": model, "prompt": prompt, "max_tokens": max_new_tokens,
                               "temperature": 0.0, "stream": True,
                               "stream_options": {"include_usage": True}}
    req = urllib.request.Request(url.rstrip("/") + "/v1/completions",
                                 data=json.dumps(payload).encode(),
                                 headers={"Content-Type": "application/json"})
    start = time.perf_counter()
    stamps: list[float] = []
    text: list[str] = []
    usage: dict[str, Any] = {}
    with urllib.request.urlopen(req, timeout=timeout_s) as resp:
        for raw in resp:
            line = raw.strip()
            if not line.startswith(b"data:") or line == b"data: [DONE]":
                continue
            chunk = json.loads(line[5:])
            usage = chunk.get("usage") or usage
            piece = "".join(c.get("text") or "" for c in chunk.get("choices") or [])
            if piece:
                stamps.append(time.perf_counter() - start)
                text.append(piece)
    if not stamps:
        raise RuntimeError(f"{url}: the stream ended without a token")
    details = usage.get("prompt_tokens_details") or {}
    return Timed("".join(text), stamps[0],
                 tuple(b - a for a, b in zip(stamps, stamps[1:], strict=False)),
                 int(usage.get("prompt_tokens", 0)), int(details.get("cached_tokens") or 0), 0,
                 int(usage.get("completion_tokens", 0)))
