"""SGLangServer's log: a restart appends after a marker, so a killed run's log is kept.

The launch command is swapped for a Python one-liner that prints and exits (a start that
fails fast): what is under test is the log file the harness writes, not SGLang."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from sgl_kvext.harness.server import ServerStartError, SGLangServer


def _failing_start(server: SGLangServer, word: str) -> None:
    server._cmd = [sys.executable, "-c", f"print({word!r})"]
    with pytest.raises(ServerStartError, match=word):
        server.start()


def test_a_restart_appends_to_the_log_after_a_marker(tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    log.write_text("an older run's log\n")
    server = SGLangServer(tmp_path, log_path=log, startup_timeout_s=30)
    _failing_start(server, "first-run")
    _failing_start(server, "second-run")
    text = log.read_text()
    assert "an older run's log" not in text            # the first start begins a new log
    assert text.index("first-run") < text.index("server start 2") < text.index("second-run")
