"""The subcommands of ``sgl-kvext-bench``: check the options, run, report.

Each handler takes the parsed options and returns the exit status: 0, or 2 after a one-line
error on stderr naming the option and what is allowed. Every run writes ``--json``, a CSV of
its rows beside it, prints a markdown table and the paths written (and a PNG where it has one).
"""

from __future__ import annotations

import argparse
import contextlib
import shlex
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from sgl_kvext_bench.progress import Progress
from sgl_kvext_bench.report import markdown, plot_or_say, redacted, write_csv, write_json
from sgl_kvext_bench.serving import Serving


class BadOption(ValueError):
    """An option the user must change; the message is the one line printed."""


@contextlib.contextmanager
def _progress() -> Iterator[Progress]:
    """A progress sink on stderr, its status line ended before the results print."""
    progress = Progress()
    try:
        yield progress
    finally:
        progress.close()


def _configs(text: str, allowed: Iterable[str], option: str = "--configs") -> list[str]:
    names = [c.strip() for c in text.split(",") if c.strip()]
    unknown = [c for c in names if c not in allowed]
    if unknown or not names:
        raise BadOption(f"{option}: unknown {unknown}; allowed: {', '.join(allowed)}")
    return names


def _positive(args: argparse.Namespace, *names: str) -> None:
    bad = [n for n in names if getattr(args, n) < 1]
    if bad:
        raise BadOption(", ".join("--" + n.replace("_", "-") for n in bad) + " must be >= 1")


def _serving(args: argparse.Namespace) -> Serving:
    """Where the configurations run: ``--url``, or servers started from the model."""
    url = getattr(args, "url", None)
    model = None
    if url is None:
        from sgl_kvext.harness.model_prep import prepare_smollm2

        model = args.model_path or prepare_smollm2().path
    flags = tuple(shlex.split(args.server_args))
    if url is None:
        from sgl_kvext.harness.server import dtype_flags

        flags = (*dtype_flags(flags), *flags)
        if flags[:1] == ("--dtype",):
            print(f"sgl-kvext-bench: servers run in {flags[1]} on this CPU (pass --server-args "
                  "\"--dtype ...\" to choose)", file=sys.stderr)
    args.resolved_server_args = flags          # recorded in the results by _finish
    return Serving(model, args.json.parent, flags, url, getattr(args, "api", "sglang"))


def _finish(args: argparse.Namespace, results: dict[str, Any], table: str,
            rows: Sequence[dict[str, Any]], plot: str | None = None,
            extra: Sequence[str] = ()) -> int:
    if getattr(args, "resolved_server_args", None) is not None:
        results = {**results, "server_args": redacted(args.resolved_server_args)}
    write_json(results, args.json)
    csv_path = write_csv(rows, args.json.with_suffix(".csv"))
    print("\n" + table)
    for line in extra:
        print(line)
    print(f"\nJSON: {args.json}\nCSV: {csv_path}")
    if plot is not None:
        print(plot_or_say(plot, results, args.json.with_suffix(".png")))
    return 0


def _write_trace(args: argparse.Namespace, requests: Sequence[Any]) -> int:
    from sgl_kvext_bench.replay import write_trace

    if args.trace_interval_s < 0:
        raise BadOption("--trace-interval-s must be >= 0")
    args.export_trace.parent.mkdir(parents=True, exist_ok=True)
    print(f"trace: {write_trace(requests, args.export_trace)} ({len(requests)} requests)")
    return 0


def multiturn(args: argparse.Namespace) -> int:
    from sgl_kvext_bench.multiturn import NAMES, Workload, run_multiturn, trace_requests

    configs = _configs(args.configs, NAMES)
    _positive(args, "users", "turns", "answer_tokens", "system_words", "question_words")
    if not 0 < args.pool_fraction <= 1 or args.qps < 0:
        raise BadOption("--pool-fraction must be in (0, 1] and --qps >= 0")
    work = Workload(args.users, args.turns, args.system_words, args.question_words,
                    args.answer_tokens)
    if args.export_trace is not None:
        interval = 1 / args.qps if args.qps > 0 else args.trace_interval_s
        return _write_trace(args, trace_requests(work, interval))
    with _progress() as progress:
        results = run_multiturn(_serving(args), work, configs, args.pool_fraction,
                                with_host_hit=not args.no_host_hit, progress=progress,
                                qps=args.qps)
    table = markdown(["configuration", "TTFT p50 (s), turn >= 5", "p90", "p50 all turns",
                      "ITL p50 (s)", "output tok/s"],
                     [[c["name"], c["ttft_p50_s"], c["ttft_p90_s"], c["ttft_p50_s_all_turns"],
                       c["itl_p50_s"], c["output_tokens_per_s"]] for c in results["configs"]])
    extra = [f"{k}: {results[k]:.1f}x" for k in ("p50_speedup_vs_radix",
                                                 "p50_speedup_vs_no_cache") if k in results]
    hit = results.get("host_hit_4k")
    if hit:
        extra.append(f"4k prefix: device hit {hit['ttft_device_s']:.3f}s, host hit "
                     f"{hit['ttft_host_s']:.3f}s ({hit['host_over_device']:.2f}x), cold "
                     f"{hit['ttft_cold_s']:.3f}s")
    rows = [{k: v for k, v in r.items() if k != "itl_s"} for c in results["configs"]
            for r in c["requests"]]
    return _finish(args, results, table, rows, "multiturn", extra)


def _rag_spec(args: argparse.Namespace) -> Any:
    from sgl_kvext_bench.rag_set import RagSpec, sentences_for

    if args.chunk_tokens is not None:
        if args.chunk_tokens < 30:
            raise BadOption("--chunk-tokens must be >= 30 (a document is whole sentences)")
        args.sentences = sentences_for(args.chunk_tokens)
    _positive(args, "questions", "documents", "sentences", "answer_tokens",
              "facts_per_document")
    low, _, high = args.chunks_per_query.partition("-")
    try:
        chunks = (int(low), int(high or low))
    except ValueError:
        raise BadOption(f"--chunks-per-query {args.chunks_per_query!r}: need N or "
                        "MIN-MAX") from None
    spec = RagSpec(args.documents, args.questions, chunks, args.sentences, args.seed,
                   args.skew, not args.no_shuffle, args.facts_per_document, args.corpus)
    try:
        spec.build()
    except ValueError as exc:
        raise BadOption(str(exc)) from None
    return spec


def rag(args: argparse.Namespace) -> int:
    from sgl_kvext_bench.configs import CONFIGS
    from sgl_kvext_bench.rag import run_rag

    configs = _configs(args.configs, CONFIGS)
    spec = _rag_spec(args)
    if args.export_trace is not None:
        from sgl_kvext_bench.rag import trace_requests

        return _write_trace(args, trace_requests(spec, args.answer_tokens,
                                                 args.trace_interval_s))
    with _progress() as progress:
        results = run_rag(_serving(args), spec, configs, args.answer_tokens, progress)
    table = markdown(["configuration", "TTFT p50 (s)", "TTFT p90 (s)", "ITL p50 (s)",
                      "accuracy", "exact acc. (same prompts)", "blend - exact ± se",
                      "KL median / mean", "top-1"],
                     [[c["name"], c["ttft_p50_s"], c["ttft_p90_s"], c["itl_p50_s"],
                       c["accuracy"], *_quality_cells(c.get("quality"))]
                      for c in results["configs"]])
    extra = [f"{k}: {v:.3f}" for k, v in results.items()
             if k.endswith(("_vs_radix", "_vs_no_cache"))]
    for c in results["configs"]:
        if c.get("quality"):
            from sgl_kvext_bench.quality import describe

            reports = c["blend_reports"]
            extra += [f"{c['name']}: {describe(c['quality'])}",
                      f"{c['name']}: blends {reports.get('outcomes')}, marked used "
                      f"{reports.get('marked_used')} (partial {reports.get('marked_partial')}),"
                      f" dropped {reports.get('marked_dropped')}, automatic "
                      f"{reports.get('auto_used')}; per request "
                      f"{reports.get('reused_tokens_mean', 0):.0f} tokens reused, "
                      f"{reports.get('recomputed_tokens_mean', 0):.0f} recomputed"]
    rows = [{"config": c["name"], "question": n, **{k: q.get(k) for k in (
        "ttft_s", "correct", "prompt_tokens", "cached_tokens", "exact_correct", "kl",
        "top1_agree")}} for c in results["configs"] for n, q in enumerate(c["questions"], 1)]
    return _finish(args, results, table, rows, "rag", extra)


def _quality_cells(quality: dict[str, Any] | None) -> list[Any]:
    """The rag table's quality columns: exact accuracy, the paired delta, KL, top-1."""
    if not quality:
        return [None, None, None, None]
    return [quality["exact_accuracy"],
            f"{quality['accuracy_delta']:+.3f} ± {quality['delta_stderr']:.3f}",
            f"{quality['kl_median']:.4f} / {quality['kl_mean']:.4f}", quality["top1_agreement"]]


def code(args: argparse.Namespace) -> int:
    from sgl_kvext_bench.code import CodeWorkload, run_code, trace_requests

    configs = _configs(args.configs, ("no_cache", "radix", "hierarchical",
                                      "hierarchical_blend_auto"))
    _positive(args, "functions", "edits", "answer_tokens")
    work = CodeWorkload(functions=args.functions, edits=args.edits,
                        answer_tokens=args.answer_tokens)
    if args.export_trace is not None:
        return _write_trace(args, trace_requests(work, args.trace_interval_s))
    with _progress() as progress:
        results = run_code(_serving(args), work, configs, progress)

    def share(c: dict[str, Any]) -> str:
        later = c["edits"][1:]
        cached = sum(e["cached_tokens"] for e in later)
        return f"{cached / max(1, sum(e['prompt_tokens'] for e in later)):.0%}"

    table = markdown(["configuration", "cold TTFT (s)", "TTFT p50, edits >= 2 (s)", "p90 (s)",
                      "ITL p50 (s)", "cached"],
                     [[c["name"], c["ttft_cold_s"], c["ttft_p50_s"], c["ttft_p90_s"],
                       c["itl_p50_s"], share(c)] for c in results["configs"]])
    rows = [{"config": c["name"], **e} for c in results["configs"] for e in c["edits"]]
    return _finish(args, results, table, rows)


def replay(args: argparse.Namespace) -> int:
    from sgl_kvext_bench.configs import CONFIGS
    from sgl_kvext_bench.replay import TraceError, load_trace, run_replay

    configs = _configs(args.configs, CONFIGS)
    if not args.speed > 0:
        raise BadOption("--speed must be > 0")
    try:
        requests = load_trace(args.trace)
    except TraceError as exc:
        raise BadOption(str(exc)) from None
    with _progress() as progress:
        results = run_replay(_serving(args), configs, requests, args.speed, progress)
    table = markdown(
        ["configuration", "requests", "errors", "TTFT p50 (s)", "p90 (s)", "p99 (s)",
         "ITL p50 (s)", "output tok/s", "cached"],
        [[c["name"], c["requests"], c["errors"], c.get("ttft_p50_s"), c.get("ttft_p90_s"),
          c.get("ttft_p99_s"), c.get("itl_p50_s"), c.get("output_tokens_per_s"),
          f"{c['cached_token_share']:.0%}" if "cached_token_share" in c else None]
         for c in results["configs"]])
    rows = [{"config": c["name"], "request": n, **r} for c in results["configs"]
            for n, r in enumerate(c.get("per_request", []), 1)]
    return _finish(args, results, table, rows)


def attention(args: argparse.Namespace) -> int:
    from sgl_kvext_bench.attention import BACKENDS, run_attention

    backends = _configs(args.backends, BACKENDS, "--backends")
    try:
        lengths = [int(n) for n in args.lengths.split(",") if n.strip()]
    except ValueError:
        lengths = []
    if not lengths or min(lengths) < 2 or args.repeats < 1:
        raise BadOption(f"--lengths {args.lengths!r} needs integers >= 2 and --repeats >= 1")
    serving = _serving(args)
    assert serving.model_path is not None
    with _progress() as progress:
        results = run_attention(serving.model_path, lengths, backends, args.repeats,
                                log_dir=serving.log_dir, progress=progress,
                                server_args=serving.server_args)
    rows = [{"backend": b, "prompt_tokens": int(n), **r}
            for b, per_length in results["backends"].items() for n, r in per_length.items()]
    table = markdown(["backend", "prompt tokens", "cold TTFT p50 (s)", "cached TTFT p50 (s)"],
                     [[r["backend"], r["prompt_tokens"], r["cold_p50_s"], r["cached_p50_s"]]
                      for r in rows])
    extra = [f"{n} tokens: " + ", ".join(f"{k} {v:.2f}" for k, v in ratios.items())
             for n, ratios in results["ratios"].items()]
    return _finish(args, results, table, rows, extra=extra)


def blend(args: argparse.Namespace) -> int:
    from sgl_kvext.harness.model_prep import prepare_smollm2
    from sgl_kvext.harness.server import fast_cpu_dtype
    from sgl_kvext_bench.blend import METHODS, run_blend

    methods = _configs(args.methods, METHODS, "--methods")
    try:
        ratios = [float(r) for r in args.ratios.split(",") if r.strip()]
    except ValueError:
        ratios = []
    if not ratios or any(not 0 <= r <= 1 for r in ratios):
        raise BadOption(f"--ratios {args.ratios!r}: need numbers in [0, 1]")
    spec = _rag_spec(args)
    model = args.model_path or prepare_smollm2().path
    dtype = args.dtype or fast_cpu_dtype()
    try:
        with _progress() as progress:
            results = run_blend(model, spec, methods, ratios, args.answer_tokens, dtype,
                                progress=progress)
    except ValueError as exc:
        raise BadOption(str(exc)) from None
    table = markdown(["method", "ratio", "TTFT p50 (s)", "speed-up", "exact acc.", "blend acc.",
                      "delta ± se", "KL mean", "KL median", "top-1"],
                     [[e["method"], e["ratio"], e["ttft_p50_s"], f"{e['speedup']:.1f}x",
                       e["exact_accuracy"], e["blend_accuracy"],
                       f"{e['accuracy_delta']:+.3f} ± {e['delta_stderr']:.3f}",
                       f"{e['kl_mean']:.4f}", f"{e['kl_median']:.4f}", e["top1_agreement"]]
                      for e in results["runs"]])
    head = (f"{results['questions']} questions ({spec.corpus}), prompts "
            f"{results['prompt_tokens_min']}-{results['prompt_tokens_max']} tokens, "
            f"{results['dtype']}; full prefill p50 {results['full_prefill_ttft_p50_s']:.2f}s")
    rows = results.pop("rows")
    return _finish(args, results, head + "\n" + table, rows,
                   "blend" if args.plot is not None else None)


def tiers(args: argparse.Namespace) -> int:
    from sgl_kvext_bench.tiers import run_tier_bench

    _positive(args, "objects", "repeats")
    if not args.object_mib > 0:
        raise BadOption("--object-mib must be > 0")
    results = run_tier_bench(object_bytes=int(args.object_mib * (1 << 20)), objects=args.objects,
                             repeats=args.repeats, work_dir=args.work_dir,
                             s3_endpoint=args.s3_endpoint, skip=set(args.skip))
    names = [n for n in ("host", "disk", "s3") if results.get(n)]
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
    return _finish(args, results, table, rows, extra=extra)


def soak(args: argparse.Namespace) -> int:
    from sgl_kvext.config.settings import ConfigError
    from sgl_kvext.config.values import parse_size
    from sgl_kvext_bench.soak import SoakSpec, run_soak

    if not (args.minutes > 0 and args.sample_s > 0 and 0 <= args.warmup_share < 1
            and args.tolerance >= 0 and args.windows >= 1):
        raise BadOption("need --minutes > 0, --sample-s > 0, --warmup-share in [0, 1), "
                        "--tolerance >= 0 and --windows >= 1")
    try:
        parse_size(args.host_size)
    except (ConfigError, ValueError) as exc:
        raise BadOption(f"--host-size: {exc}") from None
    spec = SoakSpec(minutes=args.minutes, sample_s=args.sample_s,
                    warmup_share=args.warmup_share, host_size=args.host_size,
                    tolerance=args.tolerance, windows=args.windows)
    serving = _serving(args)
    assert serving.model_path is not None
    with _progress() as progress:
        results = run_soak(serving.model_path, spec, serving.log_dir, progress,
                           serving.server_args)
    mib = 1 << 20
    table = markdown(["process", "floor, first window (MiB)", "floor, last window (MiB)",
                      "peak (MiB)", "growth (floors)", "peak over first floor"],
                     [[p["process"], p["rss_window_floors_bytes"][0] / mib,
                       p["rss_window_floors_bytes"][-1] / mib, p["rss_peak_bytes"] / mib,
                       f"{p['growth'] - 1:+.1%}", f"{p['peak_over_floor'] - 1:+.1%}"]
                      for p in results["processes"]])
    extra = [f"{results.get('requests', 0)} requests, {results.get('errors', 0)} errors; host "
             f"tier max {results['host_used_max_bytes'] / mib:.1f} MiB of "
             f"{results['host_cap_bytes'] / mib:.0f} MiB; RSS flat within "
             f"{spec.tolerance:.0%}: {results['rss_flat']}"]
    rows = [{"t_s": smp["t_s"], "process": name, "rss_bytes": rss,
             "host_used_bytes": smp["host_used_bytes"]}
            for smp in results["samples"] for name, rss in smp["rss"].items()]
    return _finish(args, results, table, rows, "soak", extra)


def tree(args: argparse.Namespace) -> int:
    from sgl_kvext.sglang_plugin.kernel_fallback import ensure_sgl_kernel
    from sgl_kvext_bench.tree_overhead import run_tree_overhead

    _positive(args, "requests", "pool_tokens")
    ensure_sgl_kernel()
    with _progress() as progress:
        results = run_tree_overhead(args.requests, args.pool_tokens, progress)
    runs = results["runs"]
    table = markdown(["tree", "seconds", "cached tokens", "from the host tier"],
                     [[name, r["seconds"], r["cached_tokens"], r["loaded_tokens"]]
                      for name, r in runs.items()])
    extra = [f"ours / radix: {results['ratio']:.2f}x with evictions (ours moves KV to and from "
             f"the host tier), {results['ratio_no_evict']:.2f}x without"]
    rows = [{"tree": name, **r} for name, r in runs.items()]
    return _finish(args, results, table, rows, extra=extra)


def compare(args: argparse.Namespace) -> int:
    from sgl_kvext_bench.quality import compare as compare_runs
    from sgl_kvext_bench.quality import describe, load_results

    try:
        results = compare_runs(load_results(args.a), load_results(args.b), args.method,
                               args.ratio, args.config)
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
             f"{results['exact_answers_agree']:.3f} of the questions"]
    for side in ("a", "b"):
        split = results.get(f"{side}_inherited")
        if split:
            extra += [f"{side}, {group} (blend after a {split['head_tokens']}-token head, or "
                      f"past it: inherited): {describe(split[group])}"
                      for group in ("inherited", "head_only", "not_blended") if group in split]
    rows = [{"side": side, **{k: v for k, v in results[side].items()
                              if not isinstance(v, list)}} for side in ("a", "b")]
    return _finish(args, results, table, rows, extra=extra)


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "multiturn": multiturn, "rag": rag, "code": code, "replay": replay,
    "attention": attention, "blend": blend, "tiers": tiers, "soak": soak, "tree": tree,
    "compare": compare}


def run(args: argparse.Namespace) -> int:
    """Run the subcommand ``args.command``; a :class:`BadOption` becomes a one-line error."""
    try:
        try:
            shlex.split(getattr(args, "server_args", ""))
        except ValueError as exc:
            raise BadOption(f"--server-args: {exc}") from None
        return COMMANDS[args.command](args)
    except BadOption as exc:
        print(f"sgl-kvext-bench: error: {exc}", file=sys.stderr)
        return 2
