"""``sgl-kvext-bench``: one command for every benchmark."""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sgl_kvext_bench.client import APIS
from sgl_kvext_bench.stall import LOADS as STALL_LOADS


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
                                                                         "codec", "pool"])
    tiers.add_argument("--pool-tokens", type=int, default=4256,
                       help="tokens spilled to and loaded from the host tier (pool section)")
    mt = _command(sub, "multiturn", "multi-turn chat TTFT: no cache vs SGLang's radix "
                                    "cache vs --enable-hierarchical-kv")
    _server_args(mt)
    _chat_args(mt, users=4)
    mt.add_argument("--configs", default="no_cache,radix,hierarchical",
                    help="comma-separated subset of no_cache, radix, hierarchical")
    mt.add_argument("--no-host-hit", action="store_true",
                    help="skip the 4k-token host-hit vs device-hit measurement")
    mt.add_argument("--host-hit-rounds", type=int, default=5,
                    help="rounds of the 4k-token host-hit measurement (a device hit and a "
                         "host hit each; default 5)")
    mt.add_argument("--qps", type=float, default=0.0,
                    help="request arrival rate; users run concurrently, each turn after the "
                         "user's previous answer (default 0: one request at a time); with "
                         "--export-trace, arrivals 1/QPS apart")
    _trace_args(mt)
    _url_arg(mt)
    su = _command(sub, "sustained", "sustained request rate at a p90 TTFT goal: the "
                                    "multi-turn workload at several arrival rates, each on a "
                                    "fresh server")
    _server_args(su)
    _chat_args(su, users=8)
    su.add_argument("--configs", default="radix,hierarchical",
                    help="comma-separated subset of no_cache, radix, hierarchical")
    su.add_argument("--rates", default="0.5,1,2,4",
                    help="comma-separated arrival rates (requests per second)")
    su.add_argument("--goal-p90", type=float, default=1.0,
                    help="p90 TTFT goal in seconds a sustained rate must meet")
    su.add_argument("--repeats", type=int, default=1,
                    help="runs per configuration and rate; a rate is sustained when every "
                         "run at it and at every lower rate met the goal")
    su.add_argument("--warmup-turns", type=int, default=0,
                    help="turns of every user sent before the clock starts, as fast as the "
                         "server answers, and left out of every figure (default 0)")
    fl = _command(sub, "fleet", "a 2-server fleet sharing one S3 (SeaweedFS on loopback) "
                                "behind round-robin, cache-aware and tier-aware routing, "
                                "against one server; one server killed and restarted midway")
    _server_args(fl)
    _chat_args(fl, users=8)
    fl.set_defaults(turns=6)
    fl.add_argument("--arms", default="single,round_robin,cache_aware,tier_aware",
                    help="comma-separated subset of single, round_robin, cache_aware, "
                         "tier_aware")
    bl = _command(sub, "blend", "blend methods at several recompute ratios vs the exact "
                                "prefill of the same prompts, offline (TTFT, accuracy, KL, "
                                "top-1 agreement)")
    _model_arg(bl)
    bl.add_argument("--methods", default="cacheblend",
                    help="comma-separated blend methods (see bench/blend.py METHODS)")
    bl.add_argument("--ratios", default="0,0.05,0.15,0.3",
                    help="comma-separated recompute ratios in [0, 1]")
    _rag_set_args(bl, questions=200, documents=200)
    bl.add_argument("--answer-tokens", type=int, default=8)
    bl.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                    help="default: the CPU's fast dtype (bfloat16 with bf16 matrix "
                         "instructions, else float32)")
    bl.add_argument("--reference-cache", type=Path, default=None, metavar="DIR",
                    help="keep each prompt's exact prefill result here and reuse it in "
                         "later runs (a method sweep computes the references once)")
    bl.add_argument("--plot", type=Path, default=None,
                    help="also write a PNG of quality against TTFT per method (needs "
                         "matplotlib)")
    mg = _command(sub, "merge", "blend sweeps run in slices over the same prompts (one "
                                "--reference-cache) as one: JSON, CSV and plot; a run a "
                                "slice repeats scales its TTFTs to the first slice's")
    mg.add_argument("parts", type=Path, nargs="+", help="results JSON of sgl-kvext-bench blend")
    mg.add_argument("--plot", type=Path, default=None,
                    help="also write a PNG of quality against TTFT per method")
    rag = _command(sub, "rag", "RAG serving: no cache vs radix vs hierarchical KV vs "
                               "hierarchical KV + fragment blend (TTFT, accuracy)")
    _server_args(rag)
    rag.add_argument("--configs", default="no_cache,radix,hierarchical,hierarchical_blend",
                     help="comma-separated subset of no_cache, radix, hierarchical, "
                          "hierarchical_blend, hierarchical_blend_auto")
    _rag_set_args(rag, questions=16, documents=24)
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
    _url_arg(rp)
    rp.add_argument("--configs", default="radix,hierarchical",
                    help="comma-separated subset of no_cache, radix, hierarchical, "
                         "hierarchical_blend, hierarchical_blend_auto")
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
    al = _command(sub, "attention-layouts", "kvext_cpu attention in-process: a request's KV "
                                            "read in place vs gathered, per slot layout")
    al.add_argument("--repeats", type=int, default=9, help="rounds (medians over them)")
    ac = _command(sub, "attention-calls", "kvext_cpu attention in-process: an extend over a "
                                          "cached prefix as one masked call vs two merged")
    ac.add_argument("--repeats", type=int, default=9, help="rounds (medians over them)")
    gt = _command(sub, "gate", "a blend run's quality and TTFT had its close calls (blended "
                               "first-token entropy above a threshold) been prefilled again, "
                               "exactly")
    gt.add_argument("results", type=Path, help="results JSON of sgl-kvext-bench blend")
    gt.add_argument("--method", default="check6_query_half", help="the method")
    gt.add_argument("--ratio", type=float, default=0.15, help="the ratio")
    gt.add_argument("--thresholds", default="inf,3,2.5,2,1.5,1,0.5",
                    help="comma-separated entropies in nats (inf: never prefill again)")
    cmp = _command(sub, "compare", "two quality runs over the same prompts (blend or rag "
                                   "results, say offline and server): each one's loss against "
                                   "exact and the difference, with its standard error")
    cmp.add_argument("a", type=Path, help="results JSON of sgl-kvext-bench blend or rag")
    cmp.add_argument("b", type=Path, help="results JSON of sgl-kvext-bench blend or rag")
    cmp.add_argument("--method", default="cacheblend", help="blend results: the method")
    cmp.add_argument("--ratio", type=float, default=0.15, help="blend results: the ratio")
    cmp.add_argument("--method-b", default=None,
                     help="blend results: b's method, if not --method (two methods of one "
                          "sweep: pass its JSON as both a and b)")
    cmp.add_argument("--ratio-b", type=float, default=None,
                     help="blend results: b's ratio, if not --ratio")
    cmp.add_argument("--config", default="hierarchical_blend",
                     help="rag results: the configuration")
    tr = _command(sub, "tree", "the tree's own cost: sgl-kvext's tree vs SGLang's RadixCache "
                               "replaying one recorded chat trace in-process")
    tr.add_argument("--requests", type=int, default=10_000)
    tr.add_argument("--pool-tokens", type=int, default=65_536,
                    help="device KV pool of the evicting runs")
    tr.add_argument("--rounds", type=int, default=5,
                    help="timed interleaved rounds (medians over them)")
    st = _command(sub, "stall", "the scheduler's longest stall (token gaps of a probe "
                                "client) under hostile requests and a frozen S3")
    _server_args(st)
    st.add_argument("--repeats", type=int, default=3, help="runs of each load (medians)")
    st.add_argument("--loads", default=",".join(STALL_LOADS),
                    help="comma-separated subset of " + ", ".join(STALL_LOADS))
    sk = _command(sub, "soak", "memory soak: RSS of every server process and host-tier bytes "
                               "over a long mixed multi-turn + RAG run")
    _server_args(sk)
    sk.add_argument("--minutes", type=float, default=30.0, help="how long traffic runs")
    sk.add_argument("--sample-s", type=float, default=10.0, help="seconds between samples")
    sk.add_argument("--warmup-share", type=float, default=0.2,
                    help="share of the run before RSS is held to --tolerance")
    sk.add_argument("--tolerance", type=float, default=0.05,
                    help="allowed growth of a window's floor (least RSS at rest) over the "
                         "first window's (0.05 = 5%%)")
    sk.add_argument("--windows", type=int, default=4,
                    help="windows the run after warm-up is cut into (their floors compared)")
    sk.add_argument("--host-size", default="256MiB", help="host tier size")
    return parser


def _command(sub: Any, name: str, help: str) -> argparse.ArgumentParser:
    """A subcommand's parser, with the ``--json`` every subcommand writes."""
    parser: argparse.ArgumentParser = sub.add_parser(name, help=help)
    parser.add_argument("--json", type=Path, required=True, help="where to write the results")
    return parser


def _rag_set_args(parser: argparse.ArgumentParser, questions: int, documents: int) -> None:
    """The RAG set's knobs (``RagSpec``), shared by ``rag`` and ``blend``."""
    parser.add_argument("--corpus", default="synthetic", choices=["synthetic", "prose"],
                        help="filler sentences around one fact, or Python's help topics "
                             "(documents of ~200-800 tokens) with one inserted fact")
    parser.add_argument("--questions", type=int, default=questions)
    parser.add_argument("--documents", type=int, default=documents, help="corpus size")
    parser.add_argument("--sentences", type=int, default=36,
                        help="synthetic: filler sentences per document (~13 tokens each; "
                             "36 = ~500 tokens)")
    parser.add_argument("--chunk-tokens", type=int, default=None, metavar="N",
                        help="synthetic: about N tokens per document (SmolLM2's tokenizer); "
                             "sets --sentences from it")
    parser.add_argument("--chunks-per-query", default="4-8", metavar="N|MIN-MAX",
                        help="documents in each prompt")
    parser.add_argument("--skew", type=float, default=0.0,
                        help="popularity skew: Zipf exponent over documents (0 = uniform)")
    parser.add_argument("--no-shuffle", action="store_true",
                        help="documents in corpus order in every prompt (default: shuffled)")
    parser.add_argument("--facts-per-document", type=int, default=1,
                        help="synthetic: distinct facts, hence questions, per document")
    parser.add_argument("--seed", type=int, default=1)


def _model_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-path", type=Path, default=None,
                        help="checkpoint folder (default: the prepared SmolLM2)")


def _chat_args(p: argparse.ArgumentParser, users: int) -> None:
    """The multi-turn chat workload's knobs and the device pool's share of it."""
    p.add_argument("--users", type=int, default=users)
    p.add_argument("--turns", type=int, default=8)
    p.add_argument("--system-words", type=int, default=300)
    p.add_argument("--question-words", type=int, default=45)
    p.add_argument("--answer-tokens", type=int, default=24)
    p.add_argument("--context-words", type=int, default=0,
                   help="words of a document each user sends once, first in its history "
                        "(an agent's or a pasted file's context; default 0: none)")
    p.add_argument("--pool-fraction", type=float, default=0.25,
                   help="device KV pool as a share of the working set")


def _url_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default=None,
                        help="measure the server running there (e.g. http://127.0.0.1:30000) "
                             "instead of starting the configurations; --configs is ignored")
    parser.add_argument("--api", default="sglang", choices=APIS,
                        help="what to speak to the server: SGLang's /generate or an "
                             "OpenAI-compatible /v1/completions (default: sglang)")


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


def _exit_on_sigterm(signum: int, frame: object) -> None:
    # SystemExit unwinds the `with SGLangServer(...)` blocks, so started servers are stopped.
    sys.exit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    from sgl_kvext_bench.commands import run

    args = _parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    if getattr(args, "url", None):
        try:
            return run(args)
        except OSError as exc:       # URLError included: the server at --url is not answering
            print(f"sgl-kvext-bench: error: --url {args.url}: {exc}", file=sys.stderr)
            return 2
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
