"""The subcommands of ``sgl-kvext-bench`` that run workloads against SGLang servers, and
:func:`run`, which dispatches every subcommand (the in-process ones are in
``offline_commands``; what they share in ``command_kit``)."""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Callable
from typing import Any

from sgl_kvext_bench.command_kit import (
    BadOption,
    export_trace,
    finish,
    parse_configs,
    progress_bar,
    rag_spec_of,
    require_positive,
    serving_for,
)
from sgl_kvext_bench.offline_commands import (
    attention_calls,
    attention_layouts,
    blend,
    compare,
    gate,
    merge,
    tiers,
    tree,
)
from sgl_kvext_bench.report import markdown


def chat_workload(args: argparse.Namespace) -> Any:
    """The multi-turn chat :class:`~sgl_kvext_bench.multiturn.Workload` of ``args``."""
    from sgl_kvext_bench.multiturn import Workload

    if args.context_words < 0:
        raise BadOption(f"--context-words {args.context_words}: must be >= 0")
    return Workload(args.users, args.turns, args.system_words, args.question_words,
                    args.answer_tokens, context_words=args.context_words)

def multiturn(args: argparse.Namespace) -> int:
    from sgl_kvext_bench.multiturn import NAMES, run_multiturn, trace_requests

    configs = parse_configs(args.configs, NAMES)
    require_positive(args, "users", "turns", "answer_tokens", "system_words", "question_words",
                     "host_hit_rounds")
    if not 0 < args.pool_fraction <= 1 or args.qps < 0:
        raise BadOption("--pool-fraction must be in (0, 1] and --qps >= 0")
    work = chat_workload(args)
    if args.export_trace is not None:
        interval = 1 / args.qps if args.qps > 0 else args.trace_interval_s
        return export_trace(args, trace_requests(work, interval))
    with progress_bar() as progress:
        results = run_multiturn(serving_for(args), work, configs, args.pool_fraction,
                                with_host_hit=not args.no_host_hit, progress=progress,
                                qps=args.qps, host_hit_rounds=args.host_hit_rounds)
    table = markdown(["configuration", "TTFT p50 (s), turn >= 5", "p90", "p50 all turns",
                      "ITL p50 (s)", "output tok/s"],
                     [[c["name"], c["ttft_p50_s"], c["ttft_p90_s"], c["ttft_p50_s_all_turns"],
                       c["itl_p50_s"], c["output_tokens_per_s"]] for c in results["configs"]])
    extra = [f"{k}: {results[k]:.1f}x" for k in ("p50_speedup_vs_radix",
                                                 "p50_speedup_vs_no_cache") if k in results]
    hit = results.get("host_hit_4k")
    if hit:
        extra.append(f"4k prefix, median of {hit['rounds']}: device hit "
                     f"{hit['ttft_device_s']:.3f}s, host hit "
                     f"{hit['ttft_host_s']:.3f}s ({hit['host_over_device']:.2f}x), cold "
                     f"{hit['ttft_cold_s']:.3f}s; cached tokens {hit['device_cached_tokens']} "
                     f"/ {hit['host_cached_tokens']} ({hit['host_tier_tokens']} from the tier)")
    rows = [{k: v for k, v in r.items() if k != "itl_s"} for c in results["configs"]
            for r in c["requests"]]
    return finish(args, results, table, rows, "multiturn", extra)


def sustained(args: argparse.Namespace) -> int:
    from sgl_kvext_bench.multiturn import NAMES
    from sgl_kvext_bench.sustained import run_sustained

    configs = parse_configs(args.configs, NAMES)
    require_positive(args, "users", "turns", "answer_tokens", "system_words", "question_words",
                     "repeats")
    try:
        rates = [float(r) for r in args.rates.split(",")]
    except ValueError:
        raise BadOption(f"--rates {args.rates!r}: comma-separated numbers > 0") from None
    if not rates or min(rates) <= 0 or args.goal_p90 <= 0 or not 0 < args.pool_fraction <= 1:
        raise BadOption("--rates must be > 0, --goal-p90 > 0 and --pool-fraction in (0, 1]")
    if not 0 <= args.warmup_turns < args.turns:
        raise BadOption(f"--warmup-turns {args.warmup_turns}: must be >= 0 and below --turns "
                        f"({args.turns})")
    work = chat_workload(args)
    with progress_bar() as progress:
        results = run_sustained(serving_for(args), work, configs, sorted(rates), args.goal_p90,
                                args.pool_fraction, progress, args.repeats, args.warmup_turns)
    table = markdown(["configuration", "offered (req/s)", "achieved (req/s)", "TTFT p50 (s)",
                      "p90 (s)", "cached"],
                     [[r["name"], r["offered_rps"], r["achieved_rps"], r["ttft_p50_s"],
                       r["ttft_p90_s"], r["cached_share"]] for r in results["runs"]])
    extra = [f"sustained at p90 <= {args.goal_p90:g}s: " + ", ".join(
        f"{name} {rate if rate is not None else 'none tried'}"
        for name, rate in results["sustained_rps"].items())]
    if results["hierarchical_over_radix"] is not None:
        extra.append(f"hierarchical / radix: {results['hierarchical_over_radix']:.1f}x")
    rows = [{k: v for k, v in q.items() if k != "itl_s"} for r in results["runs"]
            for q in r["requests"]]
    return finish(args, results, table, rows, extra=extra)


def fleet(args: argparse.Namespace) -> int:
    from sgl_kvext_bench.fleet import ARMS, run_fleet

    arms = parse_configs(args.arms, ARMS, "--arms")
    require_positive(args, "users", "answer_tokens", "system_words", "question_words")
    if args.turns < 3 or not 0 < args.pool_fraction <= 1:
        raise BadOption("--turns must be >= 3 (before, failover, after the restart) and "
                        "--pool-fraction in (0, 1]")
    work = chat_workload(args)
    serving = serving_for(args)
    assert serving.model_path is not None          # no --url: fleet starts its servers
    with progress_bar() as progress:
        results = run_fleet(serving.model_path, serving.log_dir, work, arms,
                            serving.server_args, pool_fraction=args.pool_fraction,
                            progress=progress)
    table = markdown(["arm", "hit rate", "after restart", "TTFT p50 (s)", "p90 (s)",
                      "p50 failover turn (s)", "p50 first turn after restart (s)",
                      "p50 after restart (s)", "failed"],
                     [[a["name"], a["hit_rate"], a["hit_rate_after_restart"], a["ttft_p50_s"],
                       a["ttft_p90_s"], a["ttft_p50_failover_s"],
                       a["ttft_p50_first_after_restart_s"], a["ttft_p50_after_restart_s"],
                       a["failed"]] for a in results["arms"]])
    extra = [f"{a['name']}: failover turns that recomputed history "
             f"{a['failover_recomputed_users']} of {args.users}; tokens loaded per tier "
             f"{a['tier_tokens']}, restart "
             f"{a['restart_s']:.1f}s" + (f", marked down after {a['mark_down_s']:.1f}s"
                                         if "mark_down_s" in a else "")
             for a in results["arms"]]
    for a in results["arms"]:
        shares = [" ".join(f"{k} {v:.3f}" for k, v in a[key].items() if v)
                  for key in ("cached_by_source", "cached_by_source_failover",
                              "cached_by_source_first_after_restart",
                              "cached_by_source_router_restart")]
        extra.append(f"{a['name']}: prompt tokens cached by source: all turns {shares[0]}; "
                     f"failover turn {shares[1]}; first turn after the restart {shares[2]}"
                     + (f"; after the router's restart {shares[3]} (TTFT p50 "
                        f"{a['ttft_p50_router_restart_s']:.3f}s)"
                        if a["ttft_p50_router_restart_s"] is not None else ""))
    probe = results.get("cross_instance")
    if probe:
        delay = probe["write_through_delay_s"]
        extra.append("cross-instance (median of 3 contexts): 90% in S3 for the other server "
                     + (f"{delay:.2f}s after the answer" if delay is not None else
                        "not within 60 s for some context")
                     + f"; TTFT cold {probe['ttft_cold_s']:.3f}s, same instance "
                     f"{probe['ttft_same_instance_s']:.3f}s, other instance "
                     f"{probe['ttft_other_instance_s']:.3f}s, host-tier hit "
                     f"{probe['ttft_host_hit_s']:.3f}s; other instance cached "
                     f"{probe['other_instance_cached_share']:.1%}")
    rows = [r for a in results["arms"] for r in a["requests"]]
    return finish(args, results, table, rows, "fleet", extra)


def rag(args: argparse.Namespace) -> int:
    from sgl_kvext_bench.configs import CONFIGS
    from sgl_kvext_bench.rag import run_rag

    configs = parse_configs(args.configs, CONFIGS)
    spec = rag_spec_of(args)
    if args.export_trace is not None:
        from sgl_kvext_bench.rag import trace_requests

        return export_trace(args, trace_requests(spec, args.answer_tokens,
                                                 args.trace_interval_s))
    with progress_bar() as progress:
        results = run_rag(serving_for(args), spec, configs, args.answer_tokens, progress)
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
    return finish(args, results, table, rows, "rag", extra)


def _quality_cells(quality: dict[str, Any] | None) -> list[Any]:
    """The rag table's quality columns: exact accuracy, the paired delta, KL, top-1."""
    if not quality:
        return [None, None, None, None]
    return [quality["exact_accuracy"],
            f"{quality['accuracy_delta']:+.3f} ± {quality['delta_stderr']:.3f}",
            f"{quality['kl_median']:.4f} / {quality['kl_mean']:.4f}", quality["top1_agreement"]]


def code(args: argparse.Namespace) -> int:
    from sgl_kvext_bench.code import CodeWorkload, run_code, trace_requests

    configs = parse_configs(args.configs, ("no_cache", "radix", "hierarchical",
                                      "hierarchical_blend_auto"))
    require_positive(args, "functions", "edits", "answer_tokens")
    work = CodeWorkload(functions=args.functions, edits=args.edits,
                        answer_tokens=args.answer_tokens)
    if args.export_trace is not None:
        return export_trace(args, trace_requests(work, args.trace_interval_s))
    with progress_bar() as progress:
        results = run_code(serving_for(args), work, configs, progress)

    def share(c: dict[str, Any]) -> str:
        later = c["edits"][1:]
        cached = sum(e["cached_tokens"] for e in later)
        return f"{cached / max(1, sum(e['prompt_tokens'] for e in later)):.0%}"

    table = markdown(["configuration", "cold TTFT (s)", "TTFT p50, edits >= 2 (s)", "p90 (s)",
                      "ITL p50 (s)", "cached"],
                     [[c["name"], c["ttft_cold_s"], c["ttft_p50_s"], c["ttft_p90_s"],
                       c["itl_p50_s"], share(c)] for c in results["configs"]])
    rows = [{"config": c["name"], **e} for c in results["configs"] for e in c["edits"]]
    return finish(args, results, table, rows)


def replay(args: argparse.Namespace) -> int:
    from sgl_kvext_bench.configs import CONFIGS
    from sgl_kvext_bench.replay import TraceError, load_trace, run_replay

    configs = parse_configs(args.configs, CONFIGS)
    if not args.speed > 0:
        raise BadOption("--speed must be > 0")
    try:
        requests = load_trace(args.trace)
    except TraceError as exc:
        raise BadOption(str(exc)) from None
    with progress_bar() as progress:
        results = run_replay(serving_for(args), configs, requests, args.speed, progress)
    table = markdown(
        ["configuration", "requests", "errors", "TTFT p50 (s)", "p90 (s)", "p99 (s)",
         "ITL p50 (s)", "output tok/s", "cached"],
        [[c["name"], c["requests"], c["errors"], c.get("ttft_p50_s"), c.get("ttft_p90_s"),
          c.get("ttft_p99_s"), c.get("itl_p50_s"), c.get("output_tokens_per_s"),
          f"{c['cached_token_share']:.0%}" if "cached_token_share" in c else None]
         for c in results["configs"]])
    rows = [{"config": c["name"], "request": n, **r} for c in results["configs"]
            for n, r in enumerate(c.get("per_request", []), 1)]
    return finish(args, results, table, rows)


def attention(args: argparse.Namespace) -> int:
    from sgl_kvext_bench.attention import BACKENDS, run_attention

    backends = parse_configs(args.backends, BACKENDS, "--backends")
    try:
        lengths = [int(n) for n in args.lengths.split(",") if n.strip()]
    except ValueError:
        lengths = []
    if not lengths or min(lengths) < 2 or args.repeats < 1:
        raise BadOption(f"--lengths {args.lengths!r} needs integers >= 2 and --repeats >= 1")
    serving = serving_for(args)
    assert serving.model_path is not None
    with progress_bar() as progress:
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
    return finish(args, results, table, rows, extra=extra)


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
    serving = serving_for(args)
    assert serving.model_path is not None
    with progress_bar() as progress:
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
    return finish(args, results, table, rows, "soak", extra)


def stall(args: argparse.Namespace) -> int:
    from sgl_kvext_bench.stall import LOADS, run_stall

    loads = parse_configs(args.loads, LOADS, "--loads")
    if args.repeats < 1:
        raise BadOption("--repeats must be >= 1")
    if "traffic_s3_late" in loads and "traffic" not in loads:
        raise BadOption("--loads: traffic_s3_late is measured against traffic; add it")
    serving = serving_for(args)
    assert serving.model_path is not None
    with progress_bar() as progress:
        results = run_stall(serving.model_path, serving.log_dir, progress,
                            serving.server_args, args.repeats, tuple(loads))
    table = markdown(["load", "longest token gap (ms, median)", "p50 gap (ms)", "reference",
                      "stall beyond it (ms)", "scheduler: longest gap (ms)",
                      "longest forward (ms)", "longest GC (ms)"],
                     [[name, r["max_gap_s"] * 1e3, r["p50_gap_s"] * 1e3, r["reference"],
                       None if r["stall_s"] is None else r["stall_s"] * 1e3,
                       r["scheduler_gap_s"] * 1e3, r["scheduler_forward_s"] * 1e3,
                       r["scheduler_gc_s"] * 1e3]
                      for name, r in results["loads"].items()])
    rows = [{"load": name, "round": i, **{k: v for k, v in run.items() if k != "answer"}}
            for name, r in results["loads"].items() for i, run in enumerate(r["runs"], 1)]
    worst = results["max_stall_s"]
    extra = [f"longest stall beyond compute: {worst * 1e3:.0f} ms (token gaps), "
             f"{results['max_scheduler_gap_s'] * 1e3:.0f} ms (scheduler)" if worst is not None
             else "no load with a reference"]
    return finish(args, results, table, rows, extra=extra)


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "multiturn": multiturn, "sustained": sustained, "fleet": fleet, "rag": rag, "code": code,
    "replay": replay, "attention": attention, "attention-layouts": attention_layouts,
    "attention-calls": attention_calls, "blend": blend, "tiers": tiers, "soak": soak,
    "tree": tree, "compare": compare, "gate": gate, "merge": merge, "stall": stall}


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
