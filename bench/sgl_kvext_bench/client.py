"""Streaming clients that measure time to first token and inter-token latency: SGLang's
``/generate`` here, OpenAI-compatible ``/v1/completions`` in ``openai_client``, one
:class:`Endpoint` for both."""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, NamedTuple


class Timed(NamedTuple):
    """One streamed greedy completion."""

    text: str
    ttft_s: float
    itl_s: tuple[float, ...]        # gaps between later chunks
    prompt_tokens: int
    cached_tokens: int
    host_cached_tokens: int
    completion_tokens: int = 0
    meta: Mapping[str, Any] = MappingProxyType({})     # the last chunk's meta_info


def stream_generate(url: str, text: str | list[int], max_new_tokens: int,
                    timeout_s: float = 600.0,
                    custom_params: dict[str, Any] | None = None,
                    extra: dict[str, Any] | None = None) -> Timed:
    """Greedy ``/generate`` with ``stream: true`` against an SGLang server at ``url``; ``text``
    is a prompt string or its token ids (``custom_params`` go into the sampling parameters,
    e.g. ``kvext_chunks``; ``extra`` into the request, e.g. ``return_logprob``)."""
    sampling: dict[str, Any] = {"temperature": 0.0, "max_new_tokens": max_new_tokens}
    if custom_params:
        sampling["custom_params"] = custom_params
    payload = {"text" if isinstance(text, str) else "input_ids": text, "stream": True,
               "sampling_params": sampling, **(extra or {})}
    req = urllib.request.Request(url.rstrip("/") + "/generate", data=json.dumps(payload).encode(),
                                 headers={"Content-Type": "application/json"})
    start = time.perf_counter()
    stamps: list[float] = []
    last: dict = {}  # type: ignore[type-arg]
    with urllib.request.urlopen(req, timeout=timeout_s) as resp:
        for raw in resp:
            line = raw.strip()
            if not line.startswith(b"data:") or line == b"data: [DONE]":
                continue
            stamps.append(time.perf_counter() - start)
            last = json.loads(line[5:])
    if not stamps:
        raise RuntimeError(f"{url}: the stream ended without a token")
    meta = last.get("meta_info", {})
    details = meta.get("cached_tokens_details") or {}
    return Timed(last.get("text", ""), stamps[0],
                 tuple(b - a for a, b in zip(stamps, stamps[1:], strict=False)),
                 int(meta.get("prompt_tokens", 0)), int(meta.get("cached_tokens", 0)),
                 int(details.get("host", 0)), int(meta.get("completion_tokens", 0)), meta)


#: The request APIs a benchmark can speak to a server at ``--url``.
APIS = ("sglang", "openai")


class Endpoint(NamedTuple):
    """Where a benchmark sends its requests: a base URL, the API it speaks there and, for the
    OpenAI API, the model name."""

    url: str
    api: str = "sglang"
    model: str = ""

    def generate(self, text: str | list[int], max_new_tokens: int, timeout_s: float = 600.0,
                 custom_params: dict[str, Any] | None = None,
                 extra: dict[str, Any] | None = None) -> Timed:
        """One greedy streamed completion; ``custom_params`` (e.g. ``kvext_chunks``) and
        ``extra`` request fields reach the server only through SGLang's API."""
        if self.api == "openai":
            from sgl_kvext_bench.openai_client import stream_completion

            return stream_completion(self.url, self.model, text, max_new_tokens, timeout_s)
        return stream_generate(self.url, text, max_new_tokens, timeout_s, custom_params, extra)


def endpoint(url: str, api: str = "sglang") -> Endpoint:
    """The :class:`Endpoint` at ``url`` (for ``openai``, the model it serves is asked)."""
    if api not in APIS:
        raise ValueError(f"unknown API {api!r}; allowed: {', '.join(APIS)}")
    url = url.rstrip("/")
    if api == "openai":
        from sgl_kvext_bench.openai_client import served_model

        return Endpoint(url, api, served_model(url))
    return Endpoint(url)


def kvext_counters(url: str, settle_s: float = 1.5, timeout_s: float = 30.0
                   ) -> dict[str, dict[str, float]]:
    """sgl-kvext's counters from a server's ``/metrics`` (needs ``--enable-metrics``), summed
    over ranks: ``{"host": {"hits": .., "misses": .., "bytes_out": ..}, "disk": {..},
    "flow": {"spilled_pages": ..}, "fragment": {"blends": ..}, "prefetch": {..}}``. Waits
    ``settle_s`` first: the server copies its counters to ``/metrics`` once a second."""
    time.sleep(settle_s)
    with urllib.request.urlopen(url.rstrip("/") + "/metrics", timeout=timeout_s) as resp:
        text = resp.read().decode()
    out: dict[str, dict[str, float]] = {}
    for line in text.splitlines():
        if not line.startswith("kvext_") or " " not in line:
            continue
        sample, value = line.rsplit(" ", 1)
        name, _, labels = sample.partition("{")
        if not name.endswith("_total"):
            continue                                 # _created timestamps, gauges
        name = name[len("kvext_"):-len("_total")]
        if name.startswith("tier_"):
            group, name = labels.split('tier="', 1)[1].split('"', 1)[0], name[len("tier_"):]
        elif name.startswith(("fragment_", "prefetch_")):
            group, name = name.split("_", 1)
        else:
            group = "flow"
        bucket = out.setdefault(group, {})
        bucket[name] = bucket.get(name, 0.0) + float(value)
    return out


def post_json(url: str, path: str, payload: dict[str, Any], timeout_s: float = 600.0
              ) -> dict[str, Any]:
    """POST ``payload`` to ``url + path``; the JSON answer."""
    req = urllib.request.Request(url.rstrip("/") + path, data=json.dumps(payload).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout_s) as resp:
        answer: dict[str, Any] = json.loads(resp.read())
    return answer
