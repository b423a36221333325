"""Where a benchmark configuration is served: a server it starts, or one already running."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from sgl_kvext.harness.server import SGLangServer
from sgl_kvext_bench.client import Endpoint, endpoint

#: The configuration name results carry when the bench targets a running server (``--url``).
URL_CONFIG = "url"


@dataclass(frozen=True)
class Serving:
    """How a benchmark reaches the configurations it compares: servers it starts from
    ``model_path`` (plus ``server_args``; logs in ``log_dir``), or, with ``url``, the server
    running there, as it is, under the one configuration name ``url``. ``api`` is what the
    benchmark speaks to it (``sglang``'s ``/generate`` or ``openai``'s ``/v1/completions``)."""

    model_path: Path | None
    log_dir: Path
    server_args: tuple[str, ...] = ()
    url: str | None = None
    api: str = "sglang"

    def configs(self, names: Sequence[str]) -> list[str]:
        """The configurations to run: ``names``, or only ``url`` when a URL is given."""
        return [URL_CONFIG] if self.url is not None else list(names)

    @contextlib.contextmanager
    def serve(self, bench: str, name: str, flags: Sequence[str]) -> Iterator[Endpoint]:
        """Yield the warm :class:`Endpoint` of configuration ``name``: the server at ``url``
        (nothing started or stopped; ``flags`` unused), else a server started with ``flags``
        and ``server_args`` on 127.0.0.1, logging to ``<log_dir>/<bench>-<name>.log`` and
        stopped on exit, whatever happens."""
        if self.url is not None:
            target = endpoint(self.url, self.api)
            target.generate("Hello", 1)                  # warm-up, and a clear early error
            yield target
            return
        if self.model_path is None:
            raise ValueError("a model path is needed to start a server")
        with SGLangServer(self.model_path, (*flags, *self.server_args),
                          log_path=self.log_dir / f"{bench}-{name}.log") as srv:
            target = endpoint(srv.url, self.api)
            target.generate("Hello", 1)                  # warm-up
            yield target
