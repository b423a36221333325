"""sgl-kvext-bench stall: how a load's stall is read off the probe's token gaps, and its
options (the measurement itself needs a server: docs/benchmarks.md has the run)."""

import pytest

from sgl_kvext_bench.cli import main
from sgl_kvext_bench.stall import summarize


def _runs(*max_gaps: float) -> list[dict]:
    return [{"max_gap_s": g, "p50_gap_s": 0.02,
             "scheduler": {"longest_gap_s": g / 10, "longest_forward_s": g / 5}}
            for g in max_gaps]


def test_a_stall_is_the_longest_gap_beyond_its_references() -> None:
    out = summarize({"idle": _runs(0.05, 0.04, 0.06), "prewarm_body_20mib": _runs(0.07, 0.5, 0.08),
                     "traffic": _runs(0.3, 0.3, 0.4), "traffic_s3_late": _runs(0.35, 0.2, 0.9)})
    loads = out["loads"]
    assert loads["idle"]["stall_s"] is None and loads["idle"]["reference"] is None
    assert loads["prewarm_body_20mib"]["stall_s"] == pytest.approx(0.08 - 0.05)  # medians
    assert loads["traffic"]["reference"] is None              # prefills: compute, a reference
    assert loads["traffic_s3_late"]["reference"] == "traffic"
    assert loads["traffic_s3_late"]["stall_s"] == pytest.approx(0.35 - 0.3)
    assert out["max_stall_s"] == pytest.approx(0.35 - 0.3)         # traffic not counted
    # The server's own figures: the worst window of the repeats, every load counted.
    assert loads["prewarm_body_20mib"]["scheduler_gap_s"] == pytest.approx(0.05)
    assert loads["traffic_s3_late"]["scheduler_forward_s"] == pytest.approx(0.18)
    assert out["max_scheduler_gap_s"] == pytest.approx(0.09)
    faster = summarize({"idle": _runs(0.1), "chunks_1024x100k": _runs(0.05)})
    assert faster["loads"]["chunks_1024x100k"]["stall_s"] == 0.0     # never negative


@pytest.mark.parametrize("argv, message", [
    (["--loads", "idle,nope"], "--loads: unknown ['nope']"),
    (["--loads", "traffic_s3_late"], "measured against traffic"),
    (["--repeats", "0"], "--repeats must be >= 1"),
])
def test_bad_options_are_one_line_errors(tmp_path, capsys, argv, message) -> None:
    assert main(["stall", "--json", str(tmp_path / "s.json"), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
