"""tests/run_tiers.py (``make test``): how two pytest processes' results combine, and the
``--ports`` option that keeps their loopback ports apart."""

from __future__ import annotations

import subprocess
import sys

import pytest
from run_tiers import QUICK_PORTS, ROOT, SERVER_PORTS, exit_status


@pytest.mark.parametrize(("codes", "want"), [
    ((0, 0), 0), ((1, 0), 1), ((0, 1), 1), ((2, 1), 2),
    ((5, 0), 0), ((0, 5), 0), ((5, 5), 5), ((5, 1), 1),
])
def test_the_first_failure_wins_and_nothing_collected_on_one_side_is_no_failure(
        codes: tuple[int, int], want: int) -> None:
    assert exit_status(*codes) == want


def test_the_two_port_ranges_are_disjoint_halves_of_the_harness_range() -> None:
    lo_q, hi_q = map(int, QUICK_PORTS.split("-"))
    lo_s, hi_s = map(int, SERVER_PORTS.split("-"))
    # The harness's own range, not this session's (run_tiers.py narrows it with --ports).
    whole = subprocess.run(
        [sys.executable, "-c", "from sgl_kvext.harness.server import PORT_RANGE as r; "
                               "print(r.start, r.stop - 1)"],
        capture_output=True, text=True, timeout=120, check=True).stdout.split()
    assert (lo_q, hi_s) == tuple(map(int, whole))
    assert hi_q + 1 == lo_s


@pytest.mark.parametrize("spec", ["12000", "x-y", "16000-12000", "1000-2000"])
def test_a_bad_port_range_is_refused_in_one_line(spec: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--ports", spec,
         "--collect-only", "tests/test_config.py"],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 4
    assert f"--ports {spec!r}: expected LO-HI within 12000-21999" in result.stderr
