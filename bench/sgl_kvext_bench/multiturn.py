"""Multi-turn chat benchmark: users x turns over a shared system prompt and growing histories.

Three server configurations run the same seeded workload one after another, each with a
device KV pool of about a quarter of the workload's working set:

- ``no_cache``: ``--disable-radix-cache`` (every prompt computed in full);
- ``radix``: SGLang's default radix cache (what the small pool evicts is recomputed);
- ``hierarchical``: ``--enable-hierarchical-kv`` (what the pool evicts spills to host memory).

Requests go one at a time, turn by turn, round-robin over users, and stream, so time to
first token is measured without queueing; with ``--qps`` users run concurrently at that
arrival rate instead. A separate run measures a 4k-token prefix served
from the host tier against the same prefix still on device.
"""

from __future__ import annotations

import random
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from sgl_kvext.harness.demo import build_context
from sgl_kvext.harness.server import SGLangServer
from sgl_kvext_bench.client import Endpoint, kvext_counters, stream_generate
from sgl_kvext_bench.configs import CONFIGS
from sgl_kvext_bench.serving import Serving

TOPICS = ("gardening", "sailing", "chess", "bread baking", "astronomy", "cycling", "pottery",
          "beekeeping", "photography", "birdwatching", "carpentry", "violin")
VERBS = ("explain", "compare", "list", "describe", "summarize", "suggest")
THINGS = ("tools", "mistakes", "habits", "techniques", "materials", "rules", "steps", "risks")
#: The configurations multiturn compares (its chats mark no chunks: no blend).
NAMES = ("no_cache", "radix", "hierarchical")


@dataclass(frozen=True)
class Workload:
    users: int = 4
    turns: int = 8
    system_words: int = 300
    question_words: int = 45
    answer_tokens: int = 24
    seed: int = 0
    #: Words of a document each user sends once, first in its history (0: none): the
    #: long private context of an agent or a chat over a pasted file.
    context_words: int = 0

    def system_prompt(self) -> str:
        rng = random.Random(self.seed)
        words = [rng.choice(TOPICS + THINGS + VERBS) for _ in range(self.system_words)]
        return ("System: You are a patient assistant. House notes follow. "
                + " ".join(words) + "\n")

    def user_context(self, user: int) -> str:
        """The user's own document, the start of its history ('' without one)."""
        if not self.context_words:
            return ""
        rng = random.Random(f"{self.seed}-context-{user}")
        words = [rng.choice(TOPICS + THINGS + VERBS) for _ in range(self.context_words)]
        return f"User {user + 1}'s document: " + " ".join(words) + "\n"

    def question(self, user: int, turn: int) -> str:
        rng = random.Random(f"{self.seed}-{user}-{turn}")
        topic = TOPICS[user % len(TOPICS)]
        filler = " ".join(rng.choice(THINGS + VERBS) for _ in range(self.question_words - 8))
        return (f"User: Please {rng.choice(VERBS)} the {rng.choice(THINGS)} of {topic}, "
                f"considering {filler}.\nAssistant:")


@dataclass(frozen=True)
class Sample:
    config: str
    user: int
    turn: int
    ttft_s: float
    prompt_tokens: int
    cached_tokens: int
    host_cached_tokens: int
    completion_tokens: int = 0
    itl_s: tuple[float, ...] = ()
    sent_s: float = 0.0             # when sent: from the measured start (warm-up: the run's)
    measured: bool = True           # False: a warm-up turn, sent before the clock started


def run_workload(target: Endpoint, config: str, work: Workload,
                 progress: Callable[[str], None], qps: float = 0.0,
                 warmup_turns: int = 0) -> list[Sample]:
    """Every user's turns in order, each sent after that user's previous answer is in.

    ``qps == 0``: one request at a time, round-robin over users, so TTFT has no queueing.
    ``qps > 0``: request ``k`` of that round-robin order is sent at ``k / qps`` seconds, or
    when its user's previous answer is in if that is later; users run concurrently (the shape
    of LMCache's multi-round QA benchmark). The first ``warmup_turns`` turns of every user are
    sent before the clock starts, each as soon as its user's previous answer is in; they come
    back with ``measured=False``, and the measured turns are scheduled from the moment the
    last user finished its warm-up (its sessions established: a steady state, not every
    session's cold start at once)."""
    if not 0 <= warmup_turns < work.turns:
        raise ValueError(f"warmup_turns {warmup_turns}: must be in [0, {work.turns - 1}] "
                         f"(turns {work.turns})")
    system = work.system_prompt()
    histories = [work.user_context(u) for u in range(work.users)]
    samples: list[Sample] = []
    lock = threading.Lock()
    clock = {"start": time.perf_counter()}

    def send(user: int, turn: int) -> None:
        question = work.question(user, turn)
        sent = time.perf_counter() - clock["start"]
        r = target.generate(system + histories[user] + question, work.answer_tokens)
        histories[user] += question + r.text + "\n"       # only this user's thread writes it
        with lock:
            samples.append(Sample(config, user, turn, r.ttft_s, r.prompt_tokens,
                                  r.cached_tokens, r.host_cached_tokens, r.completion_tokens,
                                  r.itl_s, sent, turn > warmup_turns))
            progress(f"{config}: {len(samples)}/{work.users * work.turns} requests, turn "
                     f"{turn} user {user + 1} ttft {r.ttft_s:.2f}s "
                     f"({r.cached_tokens}/{r.prompt_tokens} cached)")

    # The last user to finish its warm-up starts the measured clock for all.
    warmed = threading.Barrier(work.users, action=lambda: clock.update(start=time.perf_counter()))

    def user_turns(user: int) -> None:
        try:
            for turn in range(1, warmup_turns + 1):
                send(user, turn)
            warmed.wait(timeout=3600)           # bounded: a stuck user breaks it for all
        except BaseException:
            warmed.abort()                      # the others stop waiting and fail too
            raise
        for turn in range(warmup_turns + 1, work.turns + 1):
            due = ((turn - warmup_turns - 1) * work.users + user) / qps
            time.sleep(max(0.0, due - (time.perf_counter() - clock["start"])))
            send(user, turn)

    if qps > 0:
        with ThreadPoolExecutor(max_workers=work.users) as pool:
            list(pool.map(user_turns, range(work.users)))    # re-raises a user's error
    else:
        for turn in range(1, work.turns + 1):
            if turn == warmup_turns + 1:
                clock["start"] = time.perf_counter()
            for user in range(work.users):
                send(user, turn)
    return sorted(samples, key=lambda x: (x.turn, x.user))


def trace_requests(work: Workload, interval_s: float) -> list[Any]:
    """The workload as replay-trace requests, one every ``interval_s``. A trace is static, so
    each turn's history holds a fixed stand-in answer of ``answer_tokens`` words instead of
    what the model said."""
    from sgl_kvext_bench.replay import TraceRequest

    system, history = work.system_prompt(), [work.user_context(u) for u in range(work.users)]
    out: list[Any] = []
    for turn in range(1, work.turns + 1):
        for user in range(work.users):
            question = work.question(user, turn)
            out.append(TraceRequest(len(out) * interval_s, system + history[user] + question,
                                    work.answer_tokens))
            history[user] += question + " " + " ".join(["noted"] * work.answer_tokens) + "\n"
    return out


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def summarize(config: str, samples: list[Sample], from_turn: int,
              wall_s: float) -> dict[str, Any]:
    late = [s.ttft_s for s in samples if s.turn >= from_turn]
    every = [s.ttft_s for s in samples]
    gaps = [g for s in samples for g in s.itl_s]
    return {"name": config, "ttft_p50_s": statistics.median(late),
            "ttft_p90_s": percentile(late, 0.9),
            "ttft_p50_s_all_turns": statistics.median(every),
            "ttft_p90_s_all_turns": percentile(every, 0.9), "from_turn": from_turn,
            "itl_p50_s": statistics.median(gaps) if gaps else None,
            "output_tokens_per_s": sum(s.completion_tokens for s in samples) / wall_s,
            "requests": [asdict(s) for s in samples]}


def working_set_tokens(work: Workload, tokenizer: Any) -> tuple[int, int]:
    """(tokens of all users' final histories, tokens of the longest single request)."""
    system = len(tokenizer(work.system_prompt()).input_ids)
    context = len(tokenizer(work.user_context(0)).input_ids) if work.context_words else 0
    turn = len(tokenizer(work.question(0, 1)).input_ids) + work.answer_tokens + 2
    longest = system + context + work.turns * turn
    return system + work.users * (context + work.turns * turn), longest


#: Rounds of the 4k host-hit measurement: one request each way is ~1.4x noise on 2 cores.
HOST_HIT_ROUNDS = 5


def host_hit_4k(model_path: Path, log_dir: Path, answer_tokens: int,
                server_args: Sequence[str] = (), rounds: int = HOST_HIT_ROUNDS) -> dict[str, Any]:
    """TTFT of a 4k-token prefix on device vs loaded back from the host tier: ``rounds``
    pairs on one server (a device hit, two fillers that push the prefix out of the pool, a
    host hit, each with a new question), medians and every round."""
    context = build_context(170, seed=7)[0]
    fillers = [build_context(170, seed=s)[0] for s in (8, 9)]
    args = ("--enable-hierarchical-kv", "--kvext-host-size", "2GiB", "--max-total-tokens",
            "9000", *server_args)
    device, host = [], []
    with SGLangServer(model_path, args, log_path=log_dir / "host-hit-4k.log") as server:
        stream_generate(server.url, "Hello", 1)
        cold = stream_generate(server.url, context + "Question zero?", answer_tokens)
        for n in range(rounds):
            device.append(stream_generate(server.url, context + f"Question {2 * n + 1}?",
                                          answer_tokens))
            for filler in fillers:                  # push the context out of the device pool
                stream_generate(server.url, filler + "Go on.", 2)
            host.append(stream_generate(server.url, context + f"Question {2 * n + 2}?",
                                        answer_tokens))
    device_s = statistics.median(d.ttft_s for d in device)
    host_s = statistics.median(h.ttft_s for h in host)
    return {"prompt_tokens": host[-1].prompt_tokens, "ttft_cold_s": cold.ttft_s,
            "rounds": rounds, "ttft_device_s": device_s, "ttft_host_s": host_s,
            "ttft_device_s_rounds": [d.ttft_s for d in device],
            "ttft_host_s_rounds": [h.ttft_s for h in host],
            "device_cached_tokens": min(d.cached_tokens for d in device),
            "host_cached_tokens": min(h.cached_tokens for h in host),
            "host_tier_tokens": min(h.host_cached_tokens for h in host),
            "host_over_device": host_s / device_s}


def run_multiturn(serving: Serving, work: Workload, configs: Sequence[str],
                  pool_fraction: float = 0.25, with_host_hit: bool = True,
                  progress: Callable[[str], None] = print, qps: float = 0.0,
                  host_hit_rounds: int = HOST_HIT_ROUNDS) -> dict[str, Any]:
    """The workload on each configuration, each server's device pool ``pool_fraction`` of the
    working set (or on the running server, as it is), then the 4k host-hit measurement."""
    results: dict[str, Any] = {"workload": asdict(work), "qps": qps, "configs": []}
    pool_args: tuple[str, ...] = ()
    if serving.url is None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(serving.model_path)
        total, longest = working_set_tokens(work, tokenizer)
        pool = max(int(total * pool_fraction), longest + 256)
        results.update(working_set_tokens=total, pool_tokens=pool)
        pool_args = ("--max-total-tokens", str(pool))
    for name in serving.configs(configs):
        with serving.serve("multiturn", name, (*pool_args, *CONFIGS.get(name, ()))) as target:
            started = time.perf_counter()
            samples = run_workload(target, name, work, progress, qps)
            wall = time.perf_counter() - started
            counters = kvext_counters(target.url) if name == "hierarchical" else {}
        summary = summarize(name, samples, min(5, work.turns), wall)
        summary.update(kvext_counters=counters, wall_s=wall)
        results["configs"].append(summary)
    by_name = {c["name"]: c for c in results["configs"]}
    if "hierarchical" in by_name:
        ours = by_name["hierarchical"]["ttft_p50_s"]
        for other in ("radix", "no_cache"):
            if other in by_name:
                results[f"p50_speedup_vs_{other}"] = by_name[other]["ttft_p50_s"] / ours
    if with_host_hit and serving.url is None and serving.model_path is not None:
        results["host_hit_4k"] = host_hit_4k(serving.model_path, serving.log_dir,
                                             work.answer_tokens, serving.server_args,
                                             host_hit_rounds)
    return results
