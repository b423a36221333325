"""sgl-kvext-bench tiers and tree on tiny configurations: they run end to end and write their
JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def test_tier_bench_writes_every_field(tmp_path: Path, model_path: Path) -> None:
    out = tmp_path / "tiers.json"
    result = subprocess.run(
        [sys.executable, "-m", "sgl_kvext_bench.cli", "tiers", "--json", str(out),
         "--objects", "3", "--object-mib", "1", "--repeats", "1", "--work-dir", str(tmp_path),
         "--pool-tokens", "200"],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(out.read_text())
    for tier in ("host", "disk", "disk_keyed", "disk_encrypted", "s3"):
        for field in ("put_gbps", "get_gbps", "limit_put_gbps", "limit_get_gbps"):
            assert data[tier][field] > 0
    assert data["codec"]["ratio"] > 1.0
    assert data["codec"]["compress_mbps"] > 0 and data["codec"]["decompress_mbps"] > 0
    for op in ("spill", "load"):               # every load was checked token for token
        assert data["pool"][f"{op}_in_place_s"] > 0 and data["pool"][f"{op}_staged_s"] > 0
    assert data["pool"]["load_runs_in_place_s"] > 0
    assert data["pool"]["copy_s"] > 0 and "pool <-> host tier, 200 tokens" in result.stdout
    assert data["pool"]["spill_through_room_s"] > 0 and data["pool"]["spill_through_full_s"] > 0
    assert data["pool"]["spill_through_over_s"] > 0
    assert "| disk |" in result.stdout
    assert not list(tmp_path.glob("tmp*"))     # its work folder was removed


def test_bad_arguments_are_one_line() -> None:
    result = subprocess.run([sys.executable, "-m", "sgl_kvext_bench.cli", "tiers", "--json",
                             "x.json", "--objects", "0"], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2 and result.stderr.count("\n") == 1


def test_tree_overhead_bench_replays_one_trace_on_both_trees(tmp_path: Path) -> None:
    from helpers import bench_cli

    out = tmp_path / "tree.json"
    result = bench_cli("tree", "--json", str(out), "--requests", "300", "--pool-tokens",
                       "16384", "--rounds", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(out.read_text())
    runs = data["runs"]
    assert set(runs) == {"radix", "ours", "radix_no_evict", "ours_no_evict"}
    # Without evictions both trees cache exactly the same tokens; with them, ours brings
    # evicted prefixes back from the host tier, so it caches more.
    assert runs["ours_no_evict"]["cached_tokens"] == runs["radix_no_evict"]["cached_tokens"]
    assert runs["ours"]["loaded_tokens"] > 0
    assert runs["ours"]["cached_tokens"] > runs["radix"]["cached_tokens"]
    assert data["ratio_no_evict"] > 0 and "ours / radix" in result.stdout
    assert len(data["ratios_no_evict"]) == 2 and len(runs["ours"]["seconds_all"]) == 2
