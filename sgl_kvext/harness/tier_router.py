"""A tier-aware router: each request goes to the server whose tiers hold most of its prompt.

SGLang's router (``sglang-router`` 0.3.2) routes by its own text-prefix tree (``cache_aware``)
and offers no hook to place a request by what the servers report: its ``manual`` policy maps
routing keys to servers it picks itself, and it ignores the ``X-SMG-Target-Worker`` header
(tried: the choice stays random). So this small front does the one thing the router cannot:
for every ``/generate`` or ``/v1/completions`` request it asks each server ``POST
/kvext/lookup`` (concurrently, with a short timeout) and forwards the request, streamed, to
the best one. Every other path goes round-robin. The lookups leave remote tiers out
(``"remote": false``): the servers share one S3 prefix, so what S3 holds adds the same to
every server and cannot change the ranking, and asking it was ~90% of a lookup's time
(28.6 ms against 2.9 ms for a 600-token prompt, one server, this 2-core machine).

The policy (:func:`score`): the tokens a server would serve without recomputing, each weighted
by what loading it costs against computing it (:data:`TIER_WEIGHTS`: device 1, host memory
0.9, disk 0.7, S3 0.5, rough CPU figures), less :data:`IN_FLIGHT_TOKENS` per request already
running there; ties go round-robin. A server that refuses a connection is skipped for
:data:`DOWN_S` and the request goes to the next best one (nothing has reached the client yet,
so no request fails while one server is left); a server whose lookup fails or times out is
ranked as holding nothing. It runs in one process with a thread per connection, on loopback.
"""

from __future__ import annotations

import collections
import http.client
import itertools
import json
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, NamedTuple

#: What a cached token is worth when it sits in each tier (1.0: free, 0.0: recomputed).
TIER_WEIGHTS: Mapping[str, float] = {"device": 1.0, "host": 0.9, "disk": 0.7, "s3": 0.5}
#: Weight of a tier not named above.
OTHER_TIER_WEIGHT = 0.5
#: A request running on a server costs it this many cached tokens of score.
IN_FLIGHT_TOKENS = 256
#: How long a server that refused a connection is skipped.
DOWN_S = 5.0
LOOKUP_TIMEOUT_S = 2.0
#: Largest request body forwarded.
MAX_BODY = 64 << 20
#: Request paths placed by lookup; every other one goes round-robin.
PLACED = ("/generate", "/v1/completions")


def score(lookup: Mapping[str, Any]) -> float:
    """Weighted cached tokens of one ``/kvext/lookup`` answer: the device prefix, then each
    further token at the weight of the fastest tier holding it (tiers run from token 0)."""
    device = int(lookup.get("device", 0))
    cached = int(lookup.get("cached", device))
    total, covered = float(device), device
    tiers = dict(lookup.get("tiers", {}))
    for name in sorted(tiers, key=lambda n: -TIER_WEIGHTS.get(n, OTHER_TIER_WEIGHT)):
        reach = min(int(tiers[name]), cached)
        if reach > covered:
            total += (reach - covered) * TIER_WEIGHTS.get(name, OTHER_TIER_WEIGHT)
            covered = reach
    return total


class Choice(NamedTuple):
    """Where one request goes, and why."""

    order: tuple[int, ...]          # server indices, best first (the fallbacks follow)
    scores: tuple[float, ...]       # per server, indexed like the servers
    by_lookup: bool                 # False: no lookup answered (round-robin)


def rank(scores: Sequence[float | None], in_flight: Sequence[int], start: int) -> Choice:
    """Servers best first. ``None``: the server's lookup failed (it ranks as holding nothing);
    ``start`` rotates the order ties keep (round-robin)."""
    n = len(scores)
    net = [(s or 0.0) - IN_FLIGHT_TOKENS * f for s, f in zip(scores, in_flight, strict=True)]
    rotated = [(start + i) % n for i in range(n)]
    order = tuple(sorted(rotated, key=lambda i: -net[i]))     # stable: ties keep the rotation
    return Choice(order, tuple(net), any(s is not None for s in scores))


def lookup_body(path: str, request: Mapping[str, Any]) -> dict[str, Any] | None:
    """The ``/kvext/lookup`` body for a request, or None when it names no single prompt."""
    prompt = request.get("prompt") if path == "/v1/completions" else (
        request.get("input_ids") if request.get("input_ids") is not None else request.get("text"))
    body: dict[str, Any] = {"remote": False}     # S3 is the same for every server
    if isinstance(prompt, str) and prompt:
        body["text"] = prompt
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        body["input_ids"] = prompt
    else:
        return None
    for field in ("cache_salt", "extra_key"):
        if isinstance(request.get(field), str):
            body[field] = request[field]
    return body


class TierAwareRouter:
    """Serve on ``127.0.0.1:port`` in front of ``workers`` until :meth:`stop`.

    ``admin_key``: sent as a bearer token with every lookup when the servers guard their
    ``/kvext`` routes (``--admin-api-key``); otherwise the client's ``Authorization`` is."""

    def __init__(self, workers: Sequence[str], port: int, *, admin_key: str | None = None,
                 host: str = "127.0.0.1") -> None:
        if not workers:
            raise ValueError("a tier-aware router needs at least one server URL")
        self.workers = [w.rstrip("/") for w in workers]
        self.admin_key = admin_key
        self._in_flight = [0] * len(self.workers)
        self._down_until = [0.0] * len(self.workers)
        self._turn = itertools.count()
        self._lock = threading.Lock()
        self._lookups = ThreadPoolExecutor(max_workers=2 * len(self.workers),
                                           thread_name_prefix="kvext-lookup")
        #: Requests placed by lookup, by round-robin, and retried on another server.
        self.counts = {"by_lookup": 0, "round_robin": 0, "retried": 0}
        #: Seconds each placement by lookup took (all servers asked), the latest 4,096.
        self.lookup_s: collections.deque[float] = collections.deque(maxlen=4096)
        self._http = ThreadingHTTPServer((host, port), _handler(self))
        self._http.daemon_threads = True
        self._thread = threading.Thread(target=self._http.serve_forever, daemon=True,
                                        name="kvext-tier-router")

    @property
    def url(self) -> str:
        host, port = self._http.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> TierAwareRouter:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._http.shutdown()
        self._http.server_close()
        self._lookups.shutdown(wait=False, cancel_futures=True)

    def healthy_workers(self) -> int:
        """Servers answering ``/health`` now."""
        return sum(_get_ok(w + "/health") for w in self.workers)

    # ------------------------------------------------------------------ placement
    def choose(self, path: str, request: Mapping[str, Any] | None,
               authorization: str | None) -> Choice:
        body = lookup_body(path, request) if request is not None else None
        now = time.monotonic()
        up = [i for i in range(len(self.workers)) if self._down_until[i] <= now]
        candidates = up or list(range(len(self.workers)))    # all down: try them anyway
        scores: list[float | None] = [None] * len(self.workers)
        if body is not None:
            auth = f"Bearer {self.admin_key}" if self.admin_key else authorization
            asked = {i: self._lookups.submit(_lookup, self.workers[i], body, auth)
                     for i in candidates}
            for i, future in asked.items():
                scores[i] = future.result()
            self.lookup_s.append(time.monotonic() - now)
        with self._lock:
            start = next(self._turn) % len(self.workers)
            flights = list(self._in_flight)
        choice = rank(scores, flights, start)
        order = tuple(i for i in choice.order if i in candidates)
        return choice._replace(order=order)

    def forward(self, handler: BaseHTTPRequestHandler, method: str, raw: bytes) -> None:
        path = handler.path
        request: dict[str, Any] | None = None
        if method == "POST" and urllib.parse.urlsplit(path).path in PLACED:
            try:
                parsed = json.loads(raw or b"{}")
                request = parsed if isinstance(parsed, dict) else None
            except ValueError:
                request = None           # the server answers the bad body itself
        choice = self.choose(urllib.parse.urlsplit(path).path, request,
                             handler.headers.get("Authorization"))
        with self._lock:
            self.counts["by_lookup" if choice.by_lookup else "round_robin"] += 1
        for attempt, i in enumerate(choice.order):
            with self._lock:
                self._in_flight[i] += 1
            try:
                try:
                    conn, resp = self._open(i, method, path, raw, handler)
                except OSError:
                    with self._lock:
                        self._down_until[i] = time.monotonic() + DOWN_S
                        self.counts["retried"] += attempt == 0
                    continue
                try:
                    _relay(resp, handler)
                finally:
                    conn.close()
                return
            finally:
                with self._lock:
                    self._in_flight[i] -= 1
        _reply(handler, 503, "no server reachable: "
               + ", ".join(self.workers[i] for i in choice.order))

    def _open(self, i: int, method: str, path: str, raw: bytes, handler: BaseHTTPRequestHandler
              ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        parts = urllib.parse.urlsplit(self.workers[i])
        conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=600)
        headers = {k: v for k, v in handler.headers.items()
                   if k.lower() in ("content-type", "authorization", "accept")}
        try:
            conn.request(method, path, body=raw if method == "POST" else None, headers=headers)
            return conn, conn.getresponse()
        except BaseException:
            conn.close()
            raise


def _lookup(worker: str, body: dict[str, Any], authorization: str | None) -> float | None:
    headers = {"Content-Type": "application/json"}
    if authorization:
        headers["Authorization"] = authorization
    req = urllib.request.Request(worker + "/kvext/lookup", data=json.dumps(body).encode(),
                                 headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=LOOKUP_TIMEOUT_S) as resp:
            return score(json.loads(resp.read()))
    except (OSError, ValueError):
        return None


def _get_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


def _relay(resp: http.client.HTTPResponse, handler: BaseHTTPRequestHandler) -> None:
    """The server's answer to the client as it arrives (chunked: streams pass through)."""
    handler.send_response(resp.status)
    handler.send_header("Content-Type", resp.getheader("Content-Type", "application/json"))
    handler.send_header("Transfer-Encoding", "chunked")
    handler.send_header("Connection", "close")
    handler.end_headers()
    try:
        while chunk := resp.read1(65536):
            handler.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            handler.wfile.flush()
        handler.wfile.write(b"0\r\n\r\n")
    except (BrokenPipeError, ConnectionResetError):
        pass                              # the client left; closing aborts the server's side


def _reply(handler: BaseHTTPRequestHandler, status: int, message: str) -> None:
    _reply_json(handler, status, {"error": message})


def _handler(router: TierAwareRouter) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            if self.path == "/readiness":
                healthy = router.healthy_workers()
                _reply_json(self, 200 if healthy else 503,
                            {"healthy_workers": healthy, "total_workers": len(router.workers)})
            elif self.path == "/kvext/router":
                took = sorted(router.lookup_s)
                _reply_json(self, 200, {
                    "workers": router.workers, **router.counts,
                    "lookup_p50_s": took[len(took) // 2] if took else None,
                    "lookup_max_s": took[-1] if took else None})
            else:
                router.forward(self, "GET", b"")
            self.close_connection = True

        def do_POST(self) -> None:
            self.close_connection = True
            try:
                length = int(self.headers.get("Content-Length", "0"))
            except ValueError:
                length = -1
            if not 0 <= length <= MAX_BODY:
                _reply(self, 413 if length > MAX_BODY else 400,
                       f"Content-Length must be 0..{MAX_BODY} bytes")
                return
            router.forward(self, "POST", self.rfile.read(length))

        def log_message(self, format: str, *args: Any) -> None:    # noqa: A002
            pass                          # a line per request would flood the caller's log

    return Handler


def _reply_json(handler: BaseHTTPRequestHandler, status: int, obj: Any) -> None:
    body = json.dumps(obj).encode()
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(body)))
    handler.send_header("Connection", "close")
    handler.end_headers()
    handler.wfile.write(body)
