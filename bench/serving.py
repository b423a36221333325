"""Where a benchmark configuration is served: a server it starts, or one already running."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path

from sgl_kvext.server import SGLangServer
from sgl_kvext_bench.client import stream_generate

#: The configuration name results carry when the bench targets a running server (``--url``).
URL_CONFIG = "url"


@contextlib.contextmanager
def served(model_path: Path | None, args: Sequence[str], log_path: Path,
           url: str | None = None) -> Iterator[str]:
    """Yield the base URL of a warm server: ``url`` itself when given (nothing is started or
    stopped), else a server started from ``model_path`` with ``args`` on 127.0.0.1 and
    stopped on exit, whatever happens."""
    if url is not None:
        stream_generate(url, "Hello", 1)                  # warm-up, and a clear early error
        yield url.rstrip("/")
        return
    if model_path is None:
        raise ValueError("a model path is needed to start a server")
    with SGLangServer(model_path, args, log_path=log_path) as srv:
        stream_generate(srv.url, "Hello", 1)              # warm-up
        yield srv.url
