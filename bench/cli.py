"""``sgl-kvext-bench``: one command for every benchmark."""

from __future__ import annotations

import argparse
import contextlib
import json
import shlex
import signal
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from sgl_kvext_bench.progress import Progress


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sgl-kvext-bench", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    tiers = _command(sub, "tiers", "each tier against its raw limit on the same bytes")
    tiers.add_argument("--object-mib", type=float, default=4.0, help="object size (MiB)")
    tiers.add_argument("--objects", type=int, default=32, help="objects per measurement")
    tiers.add_argument("--repeats", type=int, default=3, help="median of this many runs")
    tiers.add_argument("--work-dir", type=Path, default=None,
                       help="folder for disk files and SeaweedFS data (default: a temp folder)")
    tiers.add_argument("--s3-endpoint", default=None,
                       help="use this S3 endpoint instead of starting SeaweedFS on loopback")
    tiers.add_argument("--skip", action="append", default=[], choices=["host", "disk", "s3",
                                                                         "codec"])
    mt = _command(sub, "multiturn", "multi-turn chat TTFT: no cache vs SGLang's radix "
                                    "cache vs --enable-hierarchical-kv")
    _server_args(mt)
    mt.add_argument("--users", type=int, default=4)
    mt.add_argument("--turns", type=int, default=8)
    mt.add_argument("--system-words", type=int, default=300)
    mt.add_argument("--question-words", type=int, default=45)
    mt.add_argument("--answer-tokens", type=int, default=24)
    mt.add_argument("--pool-fraction", type=float, default=0.25,
                    help="device KV pool as a share of the working set")
    mt.add_argument("--configs", default="no_cache,radix,hierarchical",
                    help="comma-separated subset of no_cache, radix, hierarchical")
    mt.add_argument("--no-host-hit", action="store_true",
                    help="skip the 4k-token host-hit vs device-hit measurement")
    _trace_args(mt)
    bl = _command(sub, "blend", "CacheBlend: blended prefill at several recompute ratios "
                                "vs full prefill (TTFT, accuracy, agreement, KL)")
    _model_arg(bl)
    bl.add_argument("--ratios", default="0,0.05,0.15,0.3,1.0",
                    help="comma-separated recompute ratios in [0, 1]")
    bl.add_argument("--questions", type=int, default=12)
    bl.add_argument("--documents", type=int, default=24)
    bl.add_argument("--sentences", type=int, default=36, help="filler sentences per document")
    bl.add_argument("--answer-tokens", type=int, default=32)
    bl.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    bl.add_argument("--chunking", default="explicit", choices=["explicit", "auto"],
                    help="reuse whole documents (marked chunks) or the content-defined "
                         "fragments inside them")
    bl.add_argument("--min-tokens", type=int, default=16,
                    help="smallest automatic fragment (with --chunking auto)")
    bl.add_argument("--plot", type=Path, default=None,
                    help="also write a PNG of speed-up and quality per ratio (needs matplotlib)")
    rag = _command(sub, "rag", "RAG serving: no cache vs radix vs hierarchical KV vs "
                               "hierarchical KV + fragment blend (TTFT, accuracy)")
    _server_args(rag)
    rag.add_argument("--configs", default="no_cache,radix,hierarchical,hierarchical_blend",
                     help="comma-separated subset of no_cache, radix, hierarchical, "
                          "hierarchical_blend, hierarchical_blend_auto")
    rag.add_argument("--questions", type=int, default=16)
    rag.add_argument("--documents", type=int, default=24)
    rag.add_argument("--sentences", type=int, default=36, help="filler sentences per document")
    rag.add_argument("--answer-tokens", type=int, default=16)
    _trace_args(rag)
    _url_arg(rag)
    cd = _command(sub, "code", "code completion: a long file resent after successive "
                               "edits near its end (TTFT per edit)")
    _server_args(cd)
    cd.add_argument("--configs", default="no_cache,radix,hierarchical",
                    help="comma-separated subset of no_cache, radix, hierarchical, "
                         "hierarchical_blend_auto")
    cd.add_argument("--functions", type=int, default=64, help="functions in the file "
                                                              "(~56 tokens each)")
    cd.add_argument("--edits", type=int, default=8)
    cd.add_argument("--answer-tokens", type=int, default=16)
    _trace_args(cd)
    _url_arg(cd)
    rp = _command(sub, "replay", "replay a JSONL trace (arrival time, prompt or token "
                                 "ids, output length, optional chunk marks), open loop")
    rp.add_argument("trace", type=Path, help="the JSONL trace (see bench/replay.py)")
    _server_args(rp)
    rp.add_argument("--url", default=None,
                    help="replay against this running SGLang server instead of starting one")
    rp.add_argument("--configs", default="radix,hierarchical",
                    help="comma-separated subset of no_cache, radix, hierarchical, "
                         "hierarchical_blend, hierarchical_blend_auto (ignored with --url)")
    rp.add_argument("--speed", type=float, default=1.0,
                    help="divide every arrival time by this (2 = twice as fast)")
    att = _command(sub, "attention", "CPU attention: cold and fully cached TTFT, "
                                     "torch_native vs kvext_cpu")
    _server_args(att)
    att.add_argument("--lengths", default="1024,2048,4096",
                     help="comma-separated prompt lengths in tokens")
    att.add_argument("--backends", default="torch_native,kvext_cpu",
                     help="comma-separated subset of torch_native, kvext_cpu")
    att.add_argument("--repeats", type=int, default=3, help="prompts per length (median)")
    return parser


def _command(sub: Any, name: str, help: str) -> argparse.ArgumentParser:
    """A subcommand's parser, with the ``--json`` every subcommand writes."""
    parser: argparse.ArgumentParser = sub.add_parser(name, help=help)
    parser.add_argument("--json", type=Path, required=True, help="where to write the results")
    return parser


def _model_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-path", type=Path, default=None,
                        help="checkpoint folder (default: the prepared SmolLM2)")


def _url_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default=None,
                        help="measure this running SGLang server (e.g. http://127.0.0.1:30000) "
                             "instead of starting the configurations; --configs is ignored")


def _server_args(parser: argparse.ArgumentParser) -> None:
    """The options of a subcommand that starts servers: the model and extra SGLang flags."""
    _model_arg(parser)
    parser.add_argument("--server-args", default="", metavar="FLAGS",
                        help="extra SGLang flags for every server started, one quoted string "
                             "(e.g. \"--page-size 16 --mem-fraction-static 0.3\")")


def _trace_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--export-trace", type=Path, default=None, metavar="JSONL",
                        help="only write the workload as a replay trace (no server is started)")
    parser.add_argument("--trace-interval-s", type=float, default=6.0,
                        help="seconds between arrivals in the exported trace")


def _write_trace(args: argparse.Namespace, requests: Sequence[Any]) -> int:
    from sgl_kvext_bench.replay import write_trace

    if args.trace_interval_s < 0:
        print("sgl-kvext-bench: error: --trace-interval-s must be >= 0", file=sys.stderr)
        return 2
    args.export_trace.parent.mkdir(parents=True, exist_ok=True)
    print(f"trace: {write_trace(requests, args.export_trace)} ({len(requests)} requests)")
    return 0


@contextlib.contextmanager
def _progress() -> Iterator[Progress]:
    """A progress sink on stderr, its status line ended before the results print."""
    progress = Progress()
    try:
        yield progress
    finally:
        progress.close()


def _exit_on_sigterm(signum: int, frame: object) -> None:
    # SystemExit unwinds the `with SGLangServer(...)` blocks, so started servers are stopped.
    sys.exit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if getattr(args, "url", None):
        try:
            return _dispatch(args)
        except OSError as exc:       # URLError included: the server at --url is not answering
            print(f"sgl-kvext-bench: error: --url {args.url}: {exc}", file=sys.stderr)
            return 2
    return _dispatch(args)


def _dispatch(args: argparse.Namespace) -> int:
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        shlex.split(getattr(args, "server_args", ""))
    except ValueError as exc:
        print(f"sgl-kvext-bench: error: --server-args: {exc}", file=sys.stderr)
        return 2
    if args.command == "multiturn":
        return _multiturn(args)
    if args.command == "blend":
        return _blend(args)
    if args.command == "rag":
        return _rag(args)
    if args.command == "attention":
        return _attention(args)
    if args.command == "replay":
        return _replay(args)
    if args.command == "code":
        return _code(args)
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


def _configs(text: str, allowed: Iterable[str], option: str = "--configs") -> list[str] | None:
    """The names in a comma-separated ``option``; None (after a one-line error) when one is
    unknown or none is given."""
    names = [c.strip() for c in text.split(",") if c.strip()]
    unknown = [c for c in names if c not in allowed]
    if unknown or not names:
        print(f"sgl-kvext-bench: error: {option}: unknown {unknown}; allowed: "
              f"{', '.join(allowed)}", file=sys.stderr)
        return None
    return names


def _multiturn(args: argparse.Namespace) -> int:
    from sgl_kvext.model_prep import prepare_smollm2
    from sgl_kvext_bench.multiturn import CONFIGS, Workload, run_multiturn

    configs = _configs(args.configs, CONFIGS)
    if configs is None:
        return 2
    if min(args.users, args.turns, args.answer_tokens, args.system_words,
           args.question_words) < 1 or not 0 < args.pool_fraction <= 1:
        print("sgl-kvext-bench: error: sizes must be >= 1 and --pool-fraction in (0, 1]",
              file=sys.stderr)
        return 2
    work = Workload(args.users, args.turns, args.system_words, args.question_words,
                    args.answer_tokens)
    if args.export_trace is not None:
        from sgl_kvext_bench.multiturn import trace_requests

        return _write_trace(args, trace_requests(work, max(0.0, args.trace_interval_s)))
    model = args.model_path or prepare_smollm2().path
    out_dir = args.json.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    with _progress() as progress:
        results = run_multiturn(model, work, configs, out_dir, args.pool_fraction,
                                with_host_hit=not args.no_host_hit, progress=progress,
                                server_args=shlex.split(args.server_args))
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    print("\n| configuration | TTFT p50 (s), turn >= 5 | p90 | p50 all turns |")
    print("|---|---:|---:|---:|")
    for c in results["configs"]:
        print(f"| {c['name']} | {c['ttft_p50_s']:.3f} | {c['ttft_p90_s']:.3f} | "
              f"{c['ttft_p50_s_all_turns']:.3f} |")
    for key in ("p50_speedup_vs_radix", "p50_speedup_vs_no_cache"):
        if key in results:
            print(f"{key}: {results[key]:.1f}x")
    hit = results.get("host_hit_4k")
    if hit:
        print(f"4k prefix: device hit {hit['ttft_device_s']:.3f}s, host hit "
              f"{hit['ttft_host_s']:.3f}s ({hit['host_over_device']:.2f}x), cold "
              f"{hit['ttft_cold_s']:.3f}s")
    print(f"\nJSON: {args.json}")
    _plot_or_say("multiturn", results, args.json.with_suffix(".png"))
    return 0


def _rag(args: argparse.Namespace) -> int:
    from sgl_kvext.model_prep import prepare_smollm2
    from sgl_kvext_bench.rag import CONFIGS, run_rag

    configs = _configs(args.configs, CONFIGS)
    if configs is None:
        return 2
    if min(args.questions, args.documents, args.sentences, args.answer_tokens) < 1:
        print("sgl-kvext-bench: error: sizes must be >= 1", file=sys.stderr)
        return 2
    if args.export_trace is not None:
        return _export_rag_trace(args)
    model = None if args.url else (args.model_path or prepare_smollm2().path)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    try:
        with _progress() as progress:
            results = run_rag(model, configs, args.questions, args.documents, args.sentences,
                              args.answer_tokens, log_dir=args.json.parent, progress=progress,
                              server_args=shlex.split(args.server_args), url=args.url)
    except ValueError as exc:
        print(f"sgl-kvext-bench: error: {exc}", file=sys.stderr)
        return 2
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    from sgl_kvext_bench.rag import write_csv

    csv_path = write_csv(results, args.json.with_suffix(".csv"))
    print("\n| configuration | TTFT p50 (s) | TTFT p90 (s) | accuracy |")
    print("|---|---:|---:|---:|")
    for c in results["configs"]:
        print(f"| {c['name']} | {c['ttft_p50_s']:.3f} | {c['ttft_p90_s']:.3f} | "
              f"{c['accuracy']:.3f} |")
    for key, value in results.items():
        if key.endswith("_vs_radix") or key.endswith("_vs_no_cache"):
            print(f"{key}: {value:.3f}")
    print(f"\nJSON: {args.json}\nCSV: {csv_path}")
    _plot_or_say("rag", results, args.json.with_suffix(".png"))
    return 0


def _code(args: argparse.Namespace) -> int:
    from sgl_kvext.model_prep import prepare_smollm2
    from sgl_kvext_bench.code import CodeWorkload, run_code

    configs = _configs(args.configs, ("no_cache", "radix", "hierarchical",
                                      "hierarchical_blend_auto"))
    if configs is None:
        return 2
    if min(args.functions, args.edits, args.answer_tokens) < 1:
        print("sgl-kvext-bench: error: --functions, --edits and --answer-tokens must be >= 1",
              file=sys.stderr)
        return 2
    work = CodeWorkload(functions=args.functions, edits=args.edits,
                        answer_tokens=args.answer_tokens)
    if args.export_trace is not None:
        from sgl_kvext_bench.code import trace_requests as code_trace

        return _write_trace(args, code_trace(work, max(0.0, args.trace_interval_s)))
    model = None if args.url else (args.model_path or prepare_smollm2().path)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    with _progress() as progress:
        results = run_code(model, work, configs, args.json.parent, progress=progress,
                           server_args=shlex.split(args.server_args), url=args.url)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    print("\n| configuration | cold TTFT (s) | TTFT p50, edits >= 2 (s) | p90 (s) | cached |")
    print("|---|---:|---:|---:|---:|")
    for c in results["configs"]:
        share = (sum(e["cached_tokens"] for e in c["edits"][1:])
                 / max(1, sum(e["prompt_tokens"] for e in c["edits"][1:])))
        print(f"| {c['name']} | {c['ttft_cold_s']:.3f} | {c['ttft_p50_s']:.3f} | "
              f"{c['ttft_p90_s']:.3f} | {share:.0%} |")
    print(f"\nJSON: {args.json}")
    return 0


def _export_rag_trace(args: argparse.Namespace) -> int:
    from sgl_kvext_bench.rag import prompt_text
    from sgl_kvext_bench.rag_set import make_rag_set
    from sgl_kvext_bench.replay import TraceRequest

    try:
        rag = make_rag_set(args.documents, args.questions, (4, 8), args.sentences, 1)
    except ValueError as exc:
        print(f"sgl-kvext-bench: error: {exc}", file=sys.stderr)
        return 2
    step = max(0.0, args.trace_interval_s)
    return _write_trace(args, [
        TraceRequest(i * step, prompt_text(rag, q), args.answer_tokens,
                     tuple(rag.documents[d] for d in q.documents))
        for i, q in enumerate(rag.questions)])


def _replay(args: argparse.Namespace) -> int:
    from sgl_kvext.model_prep import prepare_smollm2
    from sgl_kvext_bench.rag import CONFIGS
    from sgl_kvext_bench.replay import TraceError, load_trace, run_replay

    configs = _configs(args.configs, CONFIGS)
    if configs is None:
        return 2
    if not args.speed > 0:
        print("sgl-kvext-bench: error: --speed must be > 0", file=sys.stderr)
        return 2
    try:
        requests = load_trace(args.trace)
    except TraceError as exc:
        print(f"sgl-kvext-bench: error: {exc}", file=sys.stderr)
        return 2
    model = None if args.url else (args.model_path or prepare_smollm2().path)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    with _progress() as progress:
        results = run_replay(model, args.url, configs, requests, args.speed, args.json.parent,
                             progress=progress, server_args=shlex.split(args.server_args))
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    print("\n| configuration | requests | errors | TTFT p50 (s) | p90 (s) | p99 (s) | "
          "ITL p50 (s) | output tok/s | cached |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for c in results["configs"]:
        if "ttft_p50_s" not in c:
            print(f"| {c['name']} | {c['requests']} | {c['errors']} | - | - | - | - | - | - |")
            continue
        itl = "-" if c["itl_p50_s"] is None else f"{c['itl_p50_s']:.3f}"
        print(f"| {c['name']} | {c['requests']} | {c['errors']} | {c['ttft_p50_s']:.3f} | "
              f"{c['ttft_p90_s']:.3f} | {c['ttft_p99_s']:.3f} | {itl} | "
              f"{c['output_tokens_per_s']:.1f} | {c['cached_token_share']:.0%} |")
    print(f"\nJSON: {args.json}")
    return 0


def _plot_or_say(kind: str, results: dict[str, Any], path: Path) -> None:
    """Write the PNG for ``kind``'s results and print its path; without matplotlib, say so."""
    from sgl_kvext_bench import plot

    try:
        written = getattr(plot, f"plot_{kind}")(results, path)
    except ValueError as exc:            # matplotlib missing
        print(f"plot: skipped ({exc})")
        return
    print(f"plot: {written}")


def _attention(args: argparse.Namespace) -> int:
    from sgl_kvext.model_prep import prepare_smollm2
    from sgl_kvext_bench.attention import BACKENDS, run_attention

    backends = _configs(args.backends, BACKENDS, "--backends")
    try:
        lengths = [int(n) for n in args.lengths.split(",") if n.strip()]
    except ValueError:
        lengths = []
    if backends is None:
        return 2
    if not lengths or min(lengths) < 2 or args.repeats < 1:
        print(f"sgl-kvext-bench: error: --lengths {args.lengths!r} needs integers >= 2 and "
              "--repeats >= 1", file=sys.stderr)
        return 2
    model = args.model_path or prepare_smollm2().path
    args.json.parent.mkdir(parents=True, exist_ok=True)
    with _progress() as progress:
        results = run_attention(model, lengths, backends, args.repeats,
                                log_dir=args.json.parent, progress=progress,
                                server_args=shlex.split(args.server_args))
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    print("\n| backend | prompt tokens | cold TTFT p50 (s) | cached TTFT p50 (s) |")
    print("|---|---:|---:|---:|")
    for backend, per_length in results["backends"].items():
        for n, row in per_length.items():
            print(f"| {backend} | {n} | {row['cold_p50_s']:.3f} | {row['cached_p50_s']:.3f} |")
    for n, ratios in results["ratios"].items():
        print(f"{n} tokens: " + ", ".join(f"{k} {v:.2f}" for k, v in ratios.items()))
    print(f"\nJSON: {args.json}")
    return 0


def _blend(args: argparse.Namespace) -> int:
    from sgl_kvext.model_prep import prepare_smollm2
    from sgl_kvext_bench.blend import run_blend

    try:
        ratios = [float(r) for r in args.ratios.split(",") if r.strip()]
    except ValueError:
        ratios = []
    if not ratios or any(not 0 <= r <= 1 for r in ratios):
        print(f"sgl-kvext-bench: error: --ratios {args.ratios!r}: need numbers in [0, 1]",
              file=sys.stderr)
        return 2
    if min(args.questions, args.documents, args.sentences, args.answer_tokens,
           args.min_tokens) < 1:
        print("sgl-kvext-bench: error: sizes must be >= 1", file=sys.stderr)
        return 2
    model = args.model_path or prepare_smollm2().path
    try:
        with _progress() as progress:
            results = run_blend(model, ratios, args.questions, args.documents,
                                args.sentences, args.answer_tokens, args.dtype,
                                chunking=args.chunking, min_tokens=args.min_tokens,
                                progress=progress)
    except ValueError as exc:
        print(f"sgl-kvext-bench: error: {exc}", file=sys.stderr)
        return 2
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    if args.plot is not None:
        from sgl_kvext_bench.plot import plot_blend

        print(f"plot: {plot_blend(results, args.plot)}")
    print(f"\n{results['questions']} questions, prompts {results['prompt_tokens_min']}-"
          f"{results['prompt_tokens_max']} tokens, {results['dtype']}")
    print("| ratio | TTFT (s) | full (s) | speedup | accuracy | full acc. | agreement 32 | KL |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for e in results["ratios"]:
        print(f"| {e['ratio']} | {e['ttft_s']:.3f} | {e['full_prefill_ttft_s']:.3f} | "
              f"{e['speedup']:.1f}x | {e['accuracy']:.3f} | {e['full_prefill_accuracy']:.3f} | "
              f"{e['agreement_32']:.3f} | {e['kl_first_token']:.4f} |")
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
