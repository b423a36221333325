"""SGLangServer's start: a restart appends to the log after a marker, so a killed run's log is
kept; a server whose HTTP port was taken before it bound it is started again on another port.

The launch command is swapped for a Python one-liner (a start that fails fast, or a stand-in
HTTP server that fails to bind as uvicorn does): what is under test is the harness, not
SGLang."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest

from sgl_kvext.harness.server import HOST, PORT_RANGE, ServerStartError, SGLangServer, free_port


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


#: A stand-in for SGLang's HTTP side (``FakeUvicorn``): binds ``--port`` and answers /health,
#: or, with the port taken, logs uvicorn's bind error and hangs on as SGLang does.
FAKE_UVICORN = """
import http.server, sys, time
port = int(sys.argv[sys.argv.index("--port") + 1])
class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers()
try:
    server = http.server.HTTPServer(("127.0.0.1", port), Health)
except OSError:
    print(f"ERROR: [Errno 98] error while attempting to bind on address "
          f"('127.0.0.1', {port}): address already in use", flush=True)
    time.sleep(600)
server.serve_forever()
"""


def test_a_server_whose_port_was_taken_starts_again_on_another(tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    server = SGLangServer(tmp_path, log_path=log, startup_timeout_s=60)
    server._cmd = [sys.executable, "-c", FAKE_UVICORN, "--port", str(server.port)]
    taken = server.port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as squatter:
        squatter.bind((HOST, taken))        # bound, not listening: /health is refused at once
        with server:
            assert server.port != taken and server.url.endswith(f":{server.port}")
            assert server.get_text("/health") == ""
    text = log.read_text()
    assert f"('127.0.0.1', {taken}): address already in use" in text
    assert "server start 2" in text


def test_free_ports_come_from_below_the_ephemeral_range_never_twice() -> None:
    ports = [free_port() for _ in range(50)]
    assert len(set(ports)) == 50 and all(p in PORT_RANGE for p in ports)
