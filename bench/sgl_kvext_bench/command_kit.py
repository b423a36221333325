"""What every ``sgl-kvext-bench`` subcommand shares: option checks, where its
configurations run, how its results are written.

A handler returns the exit status: 0, or 2 after a one-line error on stderr naming the
option and what is allowed (:class:`BadOption`). Every run writes ``--json``, a CSV of its
rows beside it, prints a markdown table and the paths written (and a PNG where it has one).
"""

from __future__ import annotations

import argparse
import contextlib
import shlex
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from sgl_kvext_bench.progress import Progress
from sgl_kvext_bench.report import plot_or_say, redacted, write_csv, write_json
from sgl_kvext_bench.serving import Serving


class BadOption(ValueError):
    """An option the user must change; the message is the one line printed."""


@contextlib.contextmanager
def progress_bar() -> Iterator[Progress]:
    """A progress sink on stderr, its status line ended before the results print."""
    progress = Progress()
    try:
        yield progress
    finally:
        progress.close()


def parse_configs(text: str, allowed: Iterable[str], option: str = "--configs") -> list[str]:
    names = [c.strip() for c in text.split(",") if c.strip()]
    unknown = [c for c in names if c not in allowed]
    if unknown or not names:
        raise BadOption(f"{option}: unknown {unknown}; allowed: {', '.join(allowed)}")
    return names


def require_positive(args: argparse.Namespace, *names: str) -> None:
    bad = [n for n in names if getattr(args, n) < 1]
    if bad:
        raise BadOption(", ".join("--" + n.replace("_", "-") for n in bad) + " must be >= 1")


def serving_for(args: argparse.Namespace) -> Serving:
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


def finish(args: argparse.Namespace, results: dict[str, Any], table: str,
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
        where = getattr(args, "plot", None)      # --plot PATH, else beside the JSON
        print(plot_or_say(plot, results, where if isinstance(where, Path) else
                          args.json.with_suffix(".png")))
    return 0


def export_trace(args: argparse.Namespace, requests: Sequence[Any]) -> int:
    from sgl_kvext_bench.replay import write_trace

    if args.trace_interval_s < 0:
        raise BadOption("--trace-interval-s must be >= 0")
    args.export_trace.parent.mkdir(parents=True, exist_ok=True)
    print(f"trace: {write_trace(requests, args.export_trace)} ({len(requests)} requests)")
    return 0


def rag_spec_of(args: argparse.Namespace) -> Any:
    from sgl_kvext_bench.rag_set import RagSpec, sentences_for

    if args.chunk_tokens is not None:
        if args.chunk_tokens < 30:
            raise BadOption("--chunk-tokens must be >= 30 (a document is whole sentences)")
        args.sentences = sentences_for(args.chunk_tokens)
    require_positive(args, "questions", "documents", "sentences", "answer_tokens",
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
