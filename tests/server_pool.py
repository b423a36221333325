"""Real SGLang servers shared by the tests of a session, keyed by name (import as
``from server_pool import ...``).

Starting a CPU server costs ~30 s; most end-to-end tests only need *a* server with given
flags, and keep apart from each other by asking under their own ``cache_salt`` (SGLang keeps
salted KV apart in the tree and sgl-kvext in every tier). :class:`ServerPool` starts a server
the first time a name is asked for and keeps at most ``keep`` alive (least recently used
stopped first); the collection hook in ``conftest.py`` sorts tests by the name they use
(``@pytest.mark.uses_server("name")``), so each starts about once.
"""

from __future__ import annotations

import uuid
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path

from sgl_kvext.harness.server import SGLangServer

#: The ``serve`` pool server: ``sglang serve`` with the hierarchical cache, float32 (exact
#: against transformers), cache reports for the OpenAI API (tests/test_server.py and
#: tests/test_bench_code.py share it).
SERVE_ARGS = ("--dtype", "float32", "--max-total-tokens", "32768", "--enable-cache-report",
              "--enable-hierarchical-kv")


def salt() -> str:
    """A fresh tenant for one test on a shared server."""
    return f"test-{uuid.uuid4().hex[:12]}"


class ServerPool:
    """Named servers started on demand, at most ``keep`` running (see the module doc)."""

    def __init__(self, model_path: Path, log_dir: Path, keep: int = 2) -> None:
        self.model_path, self.log_dir, self.keep = model_path, log_dir, keep
        self._running: OrderedDict[str, tuple[tuple[str, ...], SGLangServer]] = OrderedDict()
        self.starts: list[str] = []

    def get(self, name: str, args: Sequence[str], env: Mapping[str, str] | None = None,
            launcher: str = "launch_server") -> SGLangServer:
        """The running server ``name`` with ``args`` (started, or restarted if its arguments
        or its launcher changed)."""
        flags = (launcher, *args)
        held = self._running.get(name)
        if held is not None and held[0] == flags:
            self._running.move_to_end(name)
            return held[1]
        self.stop(name)
        while len(self._running) >= self.keep:
            self.stop(next(iter(self._running)))
        server = SGLangServer(self.model_path, args, env=dict(env or {}), launcher=launcher,
                              log_path=self.log_dir / f"{name}-{len(self.starts)}.log")
        server.start()
        self.starts.append(name)
        self._running[name] = (flags, server)
        return server

    def stop(self, name: str) -> None:
        held = self._running.pop(name, None)
        if held is not None:
            held[1].stop()

    def close(self) -> None:
        for name in list(self._running):
            self.stop(name)
