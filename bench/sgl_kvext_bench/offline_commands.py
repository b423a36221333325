"""The in-process subcommands: the blend on the model's layers, the tiers, the tree's own
cost, and comparing two quality runs (no server started)."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import Any

from sgl_kvext_bench.command_kit import (
    BadOption,
    finish,
    parse_configs,
    progress_bar,
    rag_spec_of,
    require_positive,
)
from sgl_kvext_bench.report import markdown


def blend(args: argparse.Namespace) -> int:
    from sgl_kvext.harness.model_prep import prepare_smollm2
    from sgl_kvext.harness.server import fast_cpu_dtype
    from sgl_kvext_bench.blend import METHODS, run_blend

    methods = parse_configs(args.methods, METHODS, "--methods")
    try:
        ratios = [float(r) for r in args.ratios.split(",") if r.strip()]
    except ValueError:
        ratios = []
    if not ratios or any(not 0 <= r <= 1 for r in ratios):
        raise BadOption(f"--ratios {args.ratios!r}: need numbers in [0, 1]")
    spec = rag_spec_of(args)
    model = args.model_path or prepare_smollm2().path
    dtype = args.dtype or fast_cpu_dtype()
    try:
        with progress_bar() as progress:
            results = run_blend(model, spec, methods, ratios, args.answer_tokens, dtype,
                                progress=progress, reference_dir=args.reference_cache)
    except ValueError as exc:
        raise BadOption(str(exc)) from None
    return _finish_blend(args, results)


def merge(args: argparse.Namespace) -> int:
    from sgl_kvext_bench.merge import merge_blend_runs
    from sgl_kvext_bench.quality import load_results

    try:
        results = merge_blend_runs([load_results(p) for p in args.parts],
                                   [str(p) for p in args.parts])
    except ValueError as exc:
        raise BadOption(str(exc)) from None
    return _finish_blend(args, results)


def _finish_blend(args: argparse.Namespace, results: dict[str, Any]) -> int:
    """A blend sweep's table (one line per method and ratio), JSON, CSV and optional plot."""
    table = markdown(["method", "ratio", "TTFT p50 (s)", "speed-up", "exact acc.", "blend acc.",
                      "delta ± se", "KL mean", "KL median", "top-1"],
                     [[e["method"], e["ratio"], e["ttft_p50_s"], f"{e['speedup']:.1f}x",
                       e["exact_accuracy"], e["blend_accuracy"],
                       f"{e['accuracy_delta']:+.3f} ± {e['delta_stderr']:.3f}",
                       f"{e['kl_mean']:.4f}", f"{e['kl_median']:.4f}", e["top1_agreement"]]
                      for e in results["runs"]])
    head = (f"{results['questions']} questions ({results['workload']['corpus']}), prompts "
            f"{results['prompt_tokens_min']}-{results['prompt_tokens_max']} tokens, "
            f"{results['dtype']}; full prefill p50 {results['full_prefill_ttft_p50_s']:.2f}s")
    rows = results.pop("rows")
    return finish(args, results, head + "\n" + table, rows,
                   "blend" if args.plot is not None else None)


def tiers(args: argparse.Namespace) -> int:
    from sgl_kvext_bench.tiers import run_tier_bench

    require_positive(args, "objects", "repeats", "pool_tokens")
    if not args.object_mib > 0:
        raise BadOption("--object-mib must be > 0")
    results = run_tier_bench(object_bytes=int(args.object_mib * (1 << 20)), objects=args.objects,
                             repeats=args.repeats, work_dir=args.work_dir,
                             s3_endpoint=args.s3_endpoint, skip=set(args.skip),
                             pool_tokens=args.pool_tokens)
    names = [n for n in ("host", "disk", "disk_keyed", "disk_encrypted", "s3") if results.get(n)]
    rows = [{"tier": n, **{k: v for k, v in results[n].items() if isinstance(v, int | float)}}
            for n in names]
    table = markdown(["tier", "put GB/s", "limit", "ratio", "get GB/s", "limit", "ratio"],
                     [[n, *(results[n][k] for k in ("put_gbps", "limit_put_gbps", "put_ratio",
                                                    "get_gbps", "limit_get_gbps", "get_ratio"))]
                      for n in names])
    codec = results.get("codec")
    extra = [f"\ncodec zstd-1 shuffled on {codec['source']}: ratio {codec['ratio']:.2f}x, "
             f"compress {codec['compress_mbps']:.0f} MB/s, "
             f"decompress {codec['decompress_mbps']:.0f} MB/s"] if codec else []
    pool = results.get("pool")
    if pool:
        extra.append(f"pool <-> host tier, {pool['tokens']} tokens ({pool['bytes'] / 1e6:.0f} MB; "
                     f"one copy {pool['copy_s'] * 1e3:.1f} ms): spill in place "
                     f"{pool['spill_in_place_s'] * 1e3:.1f} ms / staged "
                     f"{pool['spill_staged_s'] * 1e3:.1f} ms, load in place "
                     f"{pool['load_in_place_s'] * 1e3:.1f} ms / staged "
                     f"{pool['load_staged_s'] * 1e3:.1f} ms; write-through spill to disk "
                     f"{pool['spill_through_room_s'] * 1e3:.1f} ms (host with room) / "
                     f"{pool['spill_through_full_s'] * 1e3:.1f} ms (host full) / "
                     f"{pool['spill_through_over_s'] * 1e3:.1f} ms (host half a path)")
    return finish(args, results, table, rows, extra=extra)


def tree(args: argparse.Namespace) -> int:
    from sgl_kvext.sglang_plugin.kernel_fallback import ensure_sgl_kernel
    from sgl_kvext_bench.tree_overhead import run_tree_overhead

    require_positive(args, "requests", "pool_tokens", "rounds")
    ensure_sgl_kernel()
    with progress_bar() as progress:
        results = run_tree_overhead(args.requests, args.pool_tokens, progress, args.rounds)
    runs = results["runs"]
    table = markdown(["tree", "seconds (median)", "cached tokens", "from the host tier"],
                     [[name, r["seconds"], r["cached_tokens"], r["loaded_tokens"]]
                      for name, r in runs.items()])
    extra = [f"ours / radix (median of {results['rounds']} interleaved rounds): "
             f"{results['ratio']:.2f}x with evictions (ours moves KV to and from the host "
             f"tier), {results['ratio_no_evict']:.2f}x without"]
    rows = [{"tree": name, **{k: v for k, v in r.items() if k != "seconds_all"}}
            for name, r in runs.items()]
    return finish(args, results, table, rows, extra=extra)


def attention_layouts(args: argparse.Namespace) -> int:
    from sgl_kvext_bench.attention_layouts import run_layouts

    return _two_ways(args, run_layouts, ("gathered", "gathered"), ("views", "views"))


def attention_calls(args: argparse.Namespace) -> int:
    from sgl_kvext_bench.attention_calls import run_calls

    return _two_ways(args, run_calls, ("split", "split"), ("one_call", "one call"))


def _two_ways(args: argparse.Namespace, run: Callable[..., dict[str, Any]],
              first: tuple[str, str], second: tuple[str, str]) -> int:
    """An in-process attention bench that times each case two ways (``(mode, label)``)."""
    from sgl_kvext.sglang_plugin.kernel_fallback import ensure_sgl_kernel

    require_positive(args, "repeats")
    ensure_sgl_kernel()
    with progress_bar() as progress:
        results = run(args.repeats, progress)
    rows = [{"case": name, **r} for name, r in results["cases"].items()]
    table = markdown(["case", f"{first[1]} (ms)", f"{second[1]} (ms)",
                      f"{first[1]} / {second[1]}"],
                     [[r["case"], r[f"{first[0]}_ms"], r[f"{second[0]}_ms"], r["speedup"]]
                      for r in rows])
    return finish(args, results, table, rows)


def compare(args: argparse.Namespace) -> int:
    from sgl_kvext_bench.quality import compare as compare_runs
    from sgl_kvext_bench.quality import describe, load_results

    try:
        results = compare_runs(load_results(args.a), load_results(args.b), args.method,
                               args.ratio, args.config, args.method_b, args.ratio_b)
    except ValueError as exc:
        raise BadOption(str(exc)) from None
    table = markdown(["run", "questions", "exact acc.", "blend acc.", "delta ± se", "KL mean",
                      "KL median", "top-1"],
                     [[str(path), s["questions"], s["exact_accuracy"], s["blend_accuracy"],
                       f"{s['accuracy_delta']:+.3f} ± {s['delta_stderr']:.3f}",
                       f"{s['kl_mean']:.4f}", f"{s['kl_median']:.4f}", s["top1_agreement"]]
                      for path, s in ((args.a, results["a"]), (args.b, results["b"]))])
    extra = [f"b's loss minus a's, per question (paired): {results['loss_difference']:+.3f} ± "
             f"{results['loss_difference_stderr']:.3f} (negative: b loses more); b loses "
             f"{'no more than a within' if results['within_one_stderr'] else 'more than a beyond'}"
             f" one standard error; exact answers agree on "
             f"{results['exact_answers_agree']:.3f} of the questions",
             f"b's first-token KL minus a's, per question: {results['kl_difference']:+.4f} ± "
             f"{results['kl_difference_stderr']:.4f}"]
    for side in ("a", "b"):
        split = results.get(f"{side}_inherited")
        if split:
            extra += [f"{side}, {group} (blend after a {split['head_tokens']}-token head, or "
                      f"past it: inherited): {describe(split[group])}"
                      for group in ("inherited", "head_only", "not_blended") if group in split]
    rows = [{"side": side, **{k: v for k, v in results[side].items()
                              if not isinstance(v, list)}} for side in ("a", "b")]
    return finish(args, results, table, rows, extra=extra)


def gate(args: argparse.Namespace) -> int:
    from sgl_kvext_bench.fallback_gate import gate_curve
    from sgl_kvext_bench.quality import load_results

    try:
        thresholds = [float(t) for t in args.thresholds.split(",")]
        if not thresholds or any(math.isnan(t) or t < 0 for t in thresholds):
            raise ValueError
    except ValueError:
        raise BadOption(f"--thresholds must be comma-separated entropies >= 0 (nats; inf: "
                        f"never), got {args.thresholds!r}") from None
    try:
        curve = gate_curve(load_results(args.results)["rows"], args.method, args.ratio,
                           thresholds)
    except ValueError as exc:
        raise BadOption(str(exc)) from None
    table = markdown(["entropy gate", "prefilled again", "TTFT p50", "TTFT mean", "blend acc.",
                      "delta ± se", "KL mean", "KL median", "top-1"],
                     [[c["threshold"], f"{c['fallback_share']:.3f}", f"{c['ttft_p50_s']:.3f}",
                       f"{c['ttft_mean_s']:.3f}", c["blend_accuracy"],
                       f"{c['accuracy_delta']:+.3f} ± {c['delta_stderr']:.3f}",
                       f"{c['kl_mean']:.4f}", f"{c['kl_median']:.4f}", c["top1_agreement"]]
                      for c in curve])
    return finish(args, {"results": str(args.results), "method": args.method,
                         "ratio": args.ratio, "curve": curve}, table, curve)
