"""``sgl-kvext-bench``: one command for every benchmark."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sgl-kvext-bench", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    tiers = sub.add_parser("tiers", help="each tier against its raw limit on the same bytes")
    tiers.add_argument("--json", type=Path, required=True, help="where to write the results")
    tiers.add_argument("--object-mib", type=float, default=4.0, help="object size (MiB)")
    tiers.add_argument("--objects", type=int, default=32, help="objects per measurement")
    tiers.add_argument("--repeats", type=int, default=3, help="median of this many runs")
    tiers.add_argument("--work-dir", type=Path, default=None,
                       help="folder for disk files and SeaweedFS data (default: a temp folder)")
    tiers.add_argument("--s3-endpoint", default=None,
                       help="use this S3 endpoint instead of starting SeaweedFS on loopback")
    tiers.add_argument("--skip", action="append", default=[], choices=["host", "disk", "s3",
                                                                         "codec"])
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.objects < 1 or args.object_mib <= 0 or args.repeats < 1:
        print("sgl-kvext-bench: error: --objects, --object-mib and --repeats must be positive",
              file=sys.stderr)
        return 2
    from sgl_kvext_bench.tiers import run_tier_bench

    results = run_tier_bench(object_bytes=int(args.object_mib * (1 << 20)), objects=args.objects,
                             repeats=args.repeats, work_dir=args.work_dir,
                             s3_endpoint=args.s3_endpoint, skip=set(args.skip))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    _print_table(results)
    print(f"\nJSON: {args.json}")
    return 0


def _print_table(results: dict) -> None:  # type: ignore[type-arg]
    print("| tier | put GB/s | limit | ratio | get GB/s | limit | ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name in ("host", "disk", "s3"):
        r = results.get(name)
        if r:
            print(f"| {name} | {r['put_gbps']:.2f} | {r['limit_put_gbps']:.2f} | "
                  f"{r['put_ratio']:.2f} | {r['get_gbps']:.2f} | {r['limit_get_gbps']:.2f} | "
                  f"{r['get_ratio']:.2f} |")
    codec = results.get("codec")
    if codec:
        print(f"\ncodec zstd-1 shuffled on {codec['source']}: ratio {codec['ratio']:.2f}x, "
              f"compress {codec['compress_mbps']:.0f} MB/s, "
              f"decompress {codec['decompress_mbps']:.0f} MB/s")


if __name__ == "__main__":
    sys.exit(main())
