"""``make test``: the model-free tiers beside the server tiers, two pytest processes at once.

The ``unit`` and ``kernel`` tiers (~5 min alone on 2 cores) need no model and no server. The
server tiers (``e2e``, ``fault``, ``bench``: ~17 min) leave much of a core idle: a server
start spends its first ~20 s importing on one thread, tests wait on HTTP and on /metrics.
Run side by side, the quick tiers finish inside the server tiers' time instead of after it.

The quick tiers run at a low CPU priority (``nice 10``: about a tenth of a core while the
server tiers keep both busy, any idle cycles otherwise) with one OpenMP thread. At equal
priority they took a whole core and doubled the first server tests' times (a clean-clone
run of 2026-12-05: quick tiers 4.5 min, server tiers 22.7 min, the whole suite in one
process had taken 22.6 min); at ``nice 19`` (a sixtieth of a core) a few-millisecond step
of a unit test could stretch past its 0.5-1 s bound. They take loopback ports from a range
of their own (``--ports``), so the two processes never hand out the same port. The server
tiers' output streams; the quick tiers' is printed after it.
Exit status: the first failure of the two (:func:`exit_status`).

Usage: ``python tests/run_tiers.py [pytest args for both]``
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

QUICK = "(unit or kernel) and not extended"
SERVERS = "not (unit or kernel) and not extended"
#: Disjoint halves of the harness's port range (sgl_kvext.harness.server.PORT_RANGE).
QUICK_PORTS, SERVER_PORTS = "12000-16999", "17000-21999"
NICE = "10"
ROOT = Path(__file__).resolve().parent.parent


def main(extra: list[str]) -> int:
    pytest = [sys.executable, "-m", "pytest", "-q", "--durations=25", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory(prefix="kvext-quick-") as scratch:
        log_path = Path(scratch) / "quick.log"
        with open(log_path, "wb") as log:
            quick = subprocess.Popen(
                ["nice", "-n", NICE, *pytest, "-m", QUICK, "--ports", QUICK_PORTS,
                 "-p", "no:cacheprovider", "--basetemp", str(Path(scratch) / "tmp")],
                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
            try:
                servers = subprocess.call([*pytest, "-m", SERVERS, "--ports", SERVER_PORTS],
                                          cwd=ROOT)
                quick_rc = quick.wait()
            finally:
                if quick.poll() is None:        # interrupted: never leave it running
                    quick.kill()
                    quick.wait()
        print("\n===== unit and kernel tiers (ran beside the server tiers) =====", flush=True)
        sys.stdout.write(log_path.read_text(errors="replace"))
    print(f"server tiers: exit {servers}; unit and kernel tiers: exit {quick_rc}", flush=True)
    return exit_status(servers, quick_rc)


def exit_status(*codes: int) -> int:
    """The first failure; pytest's 5 (nothing collected, e.g. ``-k`` matched one side only)
    counts as a failure only when every side collected nothing."""
    failed = [code for code in codes if code not in (0, 5)]
    return failed[0] if failed else (5 if all(code == 5 for code in codes) else 0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
