"""PNG plots of benchmark JSON (matplotlib, headless Agg backend)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as exc:   # the `bench` extra installs it
        raise ValueError("plots need matplotlib: pip install 'sgl-kvext[bench]'") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(plt: Any, fig: Any, path: Path) -> Path:
    """Lay out, write ``path`` (creating its folder) and free the figure."""
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_blend(results: dict[str, Any], path: Path) -> Path:
    """Quality against TTFT per blend method from ``run_blend``'s results, to ``path``: one
    line per method over its ratios. Left: median first-token KL against the exact prefill;
    right: answer accuracy (exact prefill's as a dashed line, at its own TTFT)."""
    plt = _pyplot()
    fig, (kl, acc) = plt.subplots(1, 2, figsize=(11, 4.2))
    methods: dict[str, list[dict[str, Any]]] = {}
    for e in results["runs"]:
        methods.setdefault(e["method"], []).append(e)
    for name, entries in methods.items():
        entries.sort(key=lambda e: e["ttft_p50_s"])
        x = [e["ttft_p50_s"] for e in entries]
        kl.plot(x, [max(e["kl_median"], 1e-5) for e in entries], "o-", label=name)
        acc.errorbar(x, [e["blend_accuracy"] for e in entries],
                     yerr=[e["blend_stderr"] for e in entries], fmt="o-", capsize=2, label=name)
    full_x = results["full_prefill_ttft_p50_s"]
    exact = results["runs"][0]["exact_accuracy"]
    kl.axhline(0.02, color="grey", ls=":", label="goal: median 0.02")
    kl.set(xlabel="TTFT p50 (s)", ylabel="median first-token KL vs exact", yscale="log",
           title="Distribution")
    acc.axhline(exact, color="grey", ls="--", label=f"exact prefill ({full_x:.2f}s)")
    acc.set(xlabel="TTFT p50 (s)", ylabel="answer accuracy", title="Answers")
    kl.legend(fontsize=7)
    acc.legend(fontsize=7, loc="lower right")
    workload = results["workload"]
    fig.suptitle(f"Blend methods on {Path(results['model']).name}, {results['questions']} "
                 f"questions ({workload['corpus']}), {results['prompt_tokens_min']}-"
                 f"{results['prompt_tokens_max']} tokens, {results['dtype']}")
    return _save(plt, fig, path)


def plot_rag(results: dict[str, Any], path: Path) -> Path:
    """TTFT CDF per configuration (left) and accuracy / share of prompt tokens cached (right)
    from ``run_rag``'s results, to ``path``."""
    plt = _pyplot()
    configs = results["configs"]
    fig, (cdf, bars) = plt.subplots(1, 2, figsize=(11, 4))
    for c in configs:
        ttfts = sorted(q["ttft_s"] for q in c["questions"])
        cdf.step(ttfts, [(i + 1) / len(ttfts) for i in range(len(ttfts))], where="post",
                 label=f"{c['name']} (p50 {c['ttft_p50_s']:.2f}s)")
    cdf.set(xlabel="time to first token (s)", ylabel="share of requests", ylim=(0, 1.02),
            title="TTFT CDF")
    cdf.legend(loc="lower right", fontsize=8)
    names = [c["name"] for c in configs]
    cached = [sum(q["cached_tokens"] for q in c["questions"])
              / max(1, sum(q["prompt_tokens"] for q in c["questions"])) for c in configs]
    xs = range(len(configs))
    bars.bar([x - 0.2 for x in xs], [c["accuracy"] for c in configs], 0.4, label="accuracy")
    bars.bar([x + 0.2 for x in xs], cached, 0.4, label="prompt tokens cached")
    bars.set_xticks(list(xs), names, rotation=20, ha="right", fontsize=8)
    bars.set(ylim=(0, 1.05), title="Quality and reuse")
    bars.legend(loc="upper left", fontsize=8)
    fig.suptitle(f"RAG on {Path(results['model']).name}: {results['questions']} questions, "
                 f"{results['documents']} documents")
    return _save(plt, fig, path)


def plot_multiturn(results: dict[str, Any], path: Path) -> Path:
    """TTFT (median over users) by turn per configuration (left) and the hierarchical server's
    hits and misses per tier (right) from ``run_multiturn``'s results, to ``path``."""
    plt = _pyplot()
    fig, (turns, tiers) = plt.subplots(1, 2, figsize=(11, 4))
    for c in results["configs"]:
        by_turn: dict[int, list[float]] = {}
        for r in c["requests"]:
            by_turn.setdefault(r["turn"], []).append(r["ttft_s"])
        xs = sorted(by_turn)
        turns.plot(xs, [sorted(by_turn[t])[len(by_turn[t]) // 2] for t in xs], "o-",
                   label=c["name"])
    turns.set(xlabel="turn", ylabel="TTFT, median over users (s)", title="TTFT by turn")
    turns.set_ylim(bottom=0)
    turns.legend()
    counters = next((c.get("kvext_counters") or {} for c in results["configs"]
                     if c["name"] == "hierarchical"), {})
    names = [t for t in ("host", "disk", "s3") if t in counters]
    xs_t = range(len(names))
    tiers.bar([x - 0.2 for x in xs_t], [counters[t].get("hits", 0) for t in names], 0.4,
              label="hits")
    tiers.bar([x + 0.2 for x in xs_t], [counters[t].get("misses", 0) for t in names], 0.4,
              label="misses")
    tiers.set_xticks(list(xs_t), names)
    tiers.set(ylabel="pages", title="hierarchical: tier hits (pages)")
    if names:
        tiers.legend()
    pool = f", pool {results['pool_tokens']} tokens" if "pool_tokens" in results else ""
    fig.suptitle(f"Multi-turn: {results['workload']['users']} users x "
                 f"{results['workload']['turns']} turns{pool}")
    return _save(plt, fig, path)


def plot_soak(results: dict[str, Any], path: Path) -> Path:
    """RSS of every server process (left) and the host tier's bytes against its cap (right)
    over the run, from ``run_soak``'s results, to ``path``."""
    plt = _pyplot()
    fig, (rss, host) = plt.subplots(1, 2, figsize=(11, 4))
    samples = results["samples"]
    for name in sorted({n for s in samples for n in s["rss"]}):
        points = [(s["t_s"] / 60, s["rss"][name] / (1 << 20)) for s in samples if name in s["rss"]]
        rss.plot(*zip(*points, strict=True), label=name)
    warm = results["spec"]["warmup_share"] * results["spec"]["minutes"]
    rss.axvline(warm, color="grey", ls=":", label="end of warm-up")
    rss.set(xlabel="minutes", ylabel="RSS (MiB)", title="Server processes")
    rss.set_ylim(bottom=0)
    rss.legend(fontsize=7)
    host.plot([s["t_s"] / 60 for s in samples],
              [s["host_used_bytes"] / (1 << 20) for s in samples], label="host tier bytes")
    host.axhline(results["host_cap_bytes"] / (1 << 20), color="red", ls="--", label="cap")
    host.set(xlabel="minutes", ylabel="MiB", title="Host tier")
    host.set_ylim(bottom=0)
    host.legend()
    fig.suptitle(f"Soak: {results.get('requests', 0)} requests, "
                 f"{results.get('errors', 0)} errors")
    return _save(plt, fig, path)


def plot_fleet(results: dict[str, Any], path: Path) -> Path:
    """Per turn and arm of ``run_fleet``'s results, to ``path``: median TTFT (left), the
    share of prompt tokens served from cache (middle) and from S3 (right); the dotted line
    marks the kill (a fleet serves the next turn on the survivor, then gets the killed server
    back; ``single`` restarts at once), the dashed one the fleets' router restart."""
    import statistics

    plt = _pyplot()
    fig, (ttft, hit, s3) = plt.subplots(1, 3, figsize=(15, 4.2))
    for arm in results["arms"]:
        turns = sorted({r["turn"] for r in arm["requests"] if r["ok"]})
        rows = [[r for r in arm["requests"] if r["ok"] and r["turn"] == t] for t in turns]
        ttft.plot(turns, [statistics.median(r["ttft_s"] for r in rs) for rs in rows], "o-",
                  label=arm["name"])
        hit.plot(turns, [sum(r["cached_tokens"] for r in rs)
                         / max(1, sum(r["prompt_tokens"] for r in rs)) for rs in rows], "o-",
                 label=arm["name"])
        s3.plot(turns, [sum(r.get("s3_tokens", 0) for r in rs)
                        / max(1, sum(r["prompt_tokens"] for r in rs)) for rs in rows], "o-",
                label=arm["name"])
    failover = [r["turn"] for a in results["arms"] for r in a["requests"]
                if r["phase"] == "failover"]
    routed = [r["turn"] for a in results["arms"] for r in a["requests"]
              if r["phase"] == "router_restart"]
    for ax in (ttft, hit, s3):
        if failover:
            ax.axvline(min(failover) - 0.5, color="grey", ls=":")
        if routed:
            ax.axvline(min(routed) - 0.5, color="grey", ls="--")
        ax.legend(fontsize=7)
    ttft.set(xlabel="turn", ylabel="TTFT p50 (s)", title="Time to first token")
    hit.set(xlabel="turn", ylabel="prompt tokens cached", title="Hit rate", ylim=(0, 1.02))
    s3.set(xlabel="turn", ylabel="prompt tokens loaded from S3",
           title="From the shared S3 (the rest: own device / host)", ylim=(0, 1.02))
    work = results["workload"]
    fig.suptitle(f"Fleet of 2 vs one server: {work['users']} users x {work['turns']} turns; "
                 "the busier server killed at the dotted line, back for the turn after it;\n"
                 "the fleets' routers restarted at the dashed line")
    return _save(plt, fig, path)
