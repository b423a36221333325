"""GPU checks run by ``bench/gpu/check.sh``: one PASS / FAIL / SKIP line each, with timings.

Kernels against their torch references at serving shapes (32k tokens, 8 KV heads x 128,
bf16), the pinned host tier, ``KVTiering`` spilling and loading a CUDA pool from a side
stream, and the CacheBlend path on CUDA with a randomly initialised Llama (the blended
prefill, the fragment store, the whole ``FragmentBlender`` from registration to a blend).
Needs torch, triton and numpy (zstandard and xxhash for the tier and fragment checks).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import torch
from triton.testing import do_bench

from sgl_kvext_kernels import (
    Llama3RopeScaling,
    RopeConfig,
    kv_deviation,
    rerotate_k,
    subset_attention,
)

dev, bf, N, H, D, HQ = torch.device("cuda"), torch.bfloat16, 32768, 8, 128, 32
g = torch.Generator(device=dev).manual_seed(0)


def rnd(*shape: int, dt: torch.dtype = bf) -> torch.Tensor:
    return torch.randn(*shape, device=dev, generator=g).to(dt)


def say(ok: bool, msg: str) -> None:
    print(f"{'PASS' if ok else 'FAIL'} {msg}", flush=True)


def vs(f: Callable[[str], object]) -> str:
    """``f(backend)`` timed for triton and torch."""
    t, r = do_bench(lambda: f("triton")), do_bench(lambda: f("torch"))
    return f"triton {t:.3f} ms, torch {r:.3f} ms ({r / t:.1f}x)"


def rope() -> None:
    cfg = RopeConfig(D, D, 500000.0, Llama3RopeScaling(8.0, 1.0, 4.0, 8192))
    k, old = rnd(N, H, D, dt=torch.float32), torch.arange(N, device=dev)
    for d in (1_000, 30_000, 120_000):   # dim 0 turns by d radians: far outside [-pi, pi]
        e = (rerotate_k(k, old, old + d, cfg, backend="triton")
             - rerotate_k(k, old, old + d, cfg, backend="torch")).abs().max().item()
        say(e < 1e-4, f"rerotate_k fp32 delta {d}: max |triton - torch| {e:.1e}")
    kb, new = k.to(bf), old + 30_000
    e = (rerotate_k(kb, old, new, cfg, backend="triton").float()
         - rerotate_k(kb, old, new, cfg, backend="torch").float()).abs().max().item()
    say(e <= 1.6e-2, f"rerotate_k bf16 32k x 8 x 128 err {e:.1e}; "
        + vs(lambda be: rerotate_k(kb, old, new, cfg, backend=be)))


def deviation() -> None:
    a, b = rnd(N, H, D), rnd(N, H, D)
    t, r = kv_deviation(a, b, backend="triton"), kv_deviation(a, b, backend="torch")
    say(((t - r).abs() / r.clamp_min(1e-6)).max().item() < 1e-3,
        "kv_deviation bf16 " + vs(lambda be: kv_deviation(a, b, backend=be)))


def attention() -> None:
    """The blend's recompute (15% of 32k queries, scattered, GQA 32/8) and a whole causal
    prefill (every query), against torch and against SDPA's flash kernel."""
    kp = torch.arange(N, device=dev)
    k, v = rnd(N, H, D), (rnd(N, H, D, dt=torch.float32) * 0.1 + kp[:, None, None] / N).to(bf)
    nq = int(0.15 * N)
    qp = torch.randperm(N, device=dev, generator=g)[:nq].sort().values
    q = rnd(nq, HQ, D)

    def run(be: str) -> torch.Tensor:   # v ramps with position: a mask error shows
        return subset_attention(q, qp, k, v, kp, backend=be, kv_sorted=True)
    e = (run("triton").float() - run("torch").float()).abs().max().item()
    say(e < 3e-2, f"subset_attention bf16 {nq} of {N} queries err {e:.1e}; " + vs(run))
    n = 8192
    qa, ka, va, pa = rnd(n, HQ, D), k[:n], v[:n], kp[:n]
    ours = do_bench(lambda: subset_attention(qa, pa, ka, va, pa))
    ours_sorted = do_bench(lambda: subset_attention(qa, pa, ka, va, pa, kv_sorted=True))
    sorted_out = subset_attention(qa, pa, ka, va, pa, kv_sorted=True).float()
    kx, vx = (x.repeat_interleave(HQ // H, dim=1).transpose(0, 1) for x in (ka, va))
    flash = do_bench(lambda: torch.nn.functional.scaled_dot_product_attention(
        qa.transpose(0, 1), kx, vx, is_causal=True))
    out = subset_attention(qa, pa, ka, va, pa).float()
    ref = torch.nn.functional.scaled_dot_product_attention(
        qa.transpose(0, 1), ka.transpose(0, 1), va.transpose(0, 1), is_causal=True,
        enable_gqa=True).transpose(0, 1).float()
    e = max((out - ref).abs().max().item(), (sorted_out - ref).abs().max().item())
    say(e < 3e-2, f"subset_attention as a causal prefill of {n} tokens err {e:.1e}: "
        f"kv_sorted {ours_sorted:.3f} ms, unsorted "
        f"{ours:.3f} ms, SDPA (KV heads expanded) {flash:.3f} ms ({ours / flash:.1f}x its time)")


def host_tier() -> None:
    from sgl_kvext.tiers.host import HostTier

    def rss() -> float:
        return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30

    def pinned() -> float:
        stats = getattr(torch.cuda, "host_memory_stats", dict)()
        return max((v for k, v in stats.items() if "bytes.current" in k), default=0) / 2**30
    r0, p0 = rss(), pinned()
    host = HostTier(5 << 30, block_bytes=4 << 20)
    grew, by_torch = rss() - r0, pinned() - p0
    dma = torch.from_numpy(host._pool[:1]).is_pinned()   # what torch's copies see
    say(host.pinned and dma and abs(grew - 5.0) < 0.25 and by_torch < 0.01,
        f"HostTier(5 GiB) page-locked in place: pinned={host.pinned}, is_pinned={dma}, RSS "
        f"+{grew:.2f} GiB, torch's pinned allocator +{by_torch:.2f} GiB")
    host.close()


def tiering() -> None:
    from sgl_kvext.pages.keys import DEFAULT_TENANT, ModelIdentity
    from sgl_kvext.pages.kv_pages import PagedKV
    from sgl_kvext.pages.plans import LoadOutcome, LoadPlan
    from sgl_kvext.pages.tiering import KVTiering
    from sgl_kvext.tiers.chain import TierChain
    from sgl_kvext.tiers.host import HostTier
    layers, tokens, slots = 32, 32, 80_000   # a Llama-3-8B-shaped pool: 4 MiB tier pages
    kb, vb = [rnd(slots, H, D) for _ in range(layers)], [rnd(slots, H, D) for _ in range(layers)]
    paged = PagedKV(kb, vb, tokens)
    host = HostTier(5 << 30, block_bytes=paged.page_nbytes)
    tier = KVTiering(paged, TierChain([host]), ModelIdentity("c", "w", "bfloat16", tokens, "mha"),
                     prefetch_threads=1)
    perm = torch.randperm(slots, device=dev, generator=g)
    src, dst, toks = perm[:N], perm[N:2 * N], list(range(N))
    gb = N * paged.page_nbytes / tokens / 1e9
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    n = tier.spill(DEFAULT_TENANT, toks, src, 0)
    t1 = time.perf_counter()
    plan, side = tier.plan(DEFAULT_TENANT, toks, 0), torch.cuda.Stream()
    with torch.cuda.stream(side):   # as SGLang's scheduler on its own stream would
        got = tier.load(plan, dst) if isinstance(plan, LoadPlan) else None
    torch.cuda.synchronize()
    t2 = time.perf_counter()
    ok = got is LoadOutcome.LOADED and all(torch.equal(b[dst], b[src]) for b in kb + vb)
    tier.close()
    # A 1 GiB host tier over a disk: the spill evicts while its DMA copies are in flight,
    # evicted pages go down to disk, the load mixes DMA from host blocks with disk reads.
    from sgl_kvext.tiers.disk import DiskTier
    small = HostTier(1 << 30, block_bytes=paged.page_nbytes)
    chain = TierChain([small, DiskTier(Path("/tmp/kvx-disk"), 8 << 30, b"n" * 32, codec="none")])
    tier = KVTiering(paged, chain, ModelIdentity("c", "w", "bfloat16", tokens, "mha"),
                     prefetch_threads=1)
    toks2 = list(range(1, 16385))                         # 2 GiB of pages: half evicted
    src2, dst2 = perm[:16384], perm[N:N + 16384]
    tier.spill(DEFAULT_TENANT, toks2, src2, 0)
    assert chain.flush(120)
    tier.cost.prefill_tps = 1.0           # recomputing is slow: reading disk wins,
    tier.cost.load_s = lambda nbytes, t: 0.0   # and within the scheduler's direct-read bound
    plan = tier.plan(DEFAULT_TENANT, toks2, 0)
    got = tier.load(plan, dst2[:plan.tokens], "x") if isinstance(plan, LoadPlan) else None
    ok2 = got is LoadOutcome.LOADED and plan.tokens == 16384 and \
        all(torch.equal(b[dst2], b[src2]) for b in kb + vb)
    say(ok2, f"KVTiering through a 1 GiB host tier over disk: {set(plan.tiers) if ok2 else plan}"
        f" tiers read, exact={ok2}")
    x = torch.empty(1 << 30, dtype=torch.uint8, pin_memory=True)
    y = torch.empty(1 << 30, dtype=torch.uint8, device=dev)
    h2d = 1074 / do_bench(lambda: y.copy_(x, non_blocking=True))
    d2h = 1074 / do_bench(lambda: x.copy_(y, non_blocking=True))
    say(ok, f"KVTiering spill + load of {gb:.1f} GB ({n} pages) on a side stream, exact={ok}: "
        f"spill {gb / (t1 - t0):.1f} GB/s (raw D2H {d2h:.0f}), load {gb / (t2 - t1):.1f} GB/s "
        f"(raw H2D {h2d:.0f})")
    tier.close()


def _llama(dtype: torch.dtype = bf, layers: int = 8):   # type: ignore[no-untyped-def]
    from sgl_kvext_bench.random_llama import RandomLlamaOps
    return RandomLlamaOps(layers=layers, hidden=2048, q_heads=16, kv_heads=4, head_dim=128,
                          intermediate=5632, vocab=32000, device=dev, dtype=dtype)


def blend() -> None:
    """The blended prefill with CUDA weights: stays on the GPU, equals a full prefill at
    ratio 1, and costs less than one at ratio 0.15."""
    from sgl_kvext.blend import (
        BlendSettings,
        ReusedChunk,
        blended_prefill,
        compute_chunk_kv,
        full_prefill,
    )
    ops = _llama()
    n, chunk = 8192, 1024
    ids = torch.randint(0, 32000, (n,), device=dev, generator=g)
    chunks = [ReusedChunk(s, compute_chunk_kv(ops, ids[s:s + chunk]))
              for s in range(256, n - 1024, chunk)]
    full = full_prefill(ops, ids)
    whole = blended_prefill(ops, ids, chunks, ops.rope, settings=BlendSettings(1.0))
    e = (whole.last_logits - full.last_logits).abs().max().item()
    say(whole.k.is_cuda and e < 0.5, f"blended_prefill on CUDA at ratio 1 vs a full prefill of "
        f"{n} tokens: max logit diff {e:.2e}")
    t_full = do_bench(lambda: full_prefill(ops, ids), rep=300)
    t_blend = do_bench(lambda: blended_prefill(ops, ids, chunks, ops.rope), rep=300)
    r = blended_prefill(ops, ids, chunks, ops.rope)
    say(r.k.is_cuda, f"blended_prefill default settings, {r.reused_tokens} of {n} tokens reused, "
        f"{r.recomputed_tokens} recomputed: {t_blend:.1f} ms vs full prefill {t_full:.1f} ms "
        f"({t_full / t_blend:.1f}x)")


def fragments() -> None:
    """Fragment registration and a blend through FragmentBlender, model on CUDA."""
    import numpy as np

    from sgl_kvext.blend import PrefixKV
    from sgl_kvext.fragments.blender import BlendPlan, FragmentBlender
    from sgl_kvext.fragments.index import FragmentIndex, locate_chunks
    from sgl_kvext.fragments.store import FragmentStore, KVLayout
    from sgl_kvext.pages.keys import ModelIdentity, Tenant
    from sgl_kvext.tiers.chain import TierChain
    from sgl_kvext.tiers.host import HostTier
    ops = _llama(layers=6)
    layout = KVLayout(ops.num_layers, ops.kv_heads, ops.head_dim, ops.dtype)
    store = FragmentStore(TierChain([HostTier(1 << 30)]), ModelIdentity("c", "w", "bfloat16", 1,
                                                                         "mha"), layout,
                          device=dev)
    blender = FragmentBlender(ops, ops.rope, store, FragmentIndex(64, "explicit"))
    tenant = Tenant(blend=True)
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 32000, 512) for _ in range(4)]
    t0 = time.perf_counter()
    keys, _ = blender.prewarm_async(tenant, docs)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not all(blender.index.known(k) for k in keys):
        time.sleep(0.05)
    registered = sum(blender.index.known(k) for k in keys)
    reg_s = time.perf_counter() - t0
    prompt = np.concatenate([rng.integers(0, 32000, 40), *docs, rng.integers(0, 32000, 60)])
    plan = blender.plan(tenant, prompt, 0, locate_chunks(prompt, docs))
    empty = torch.empty((ops.num_layers, 0, ops.kv_heads, ops.head_dim), dtype=ops.dtype,
                        device=dev)
    out = blender.run(tenant, plan, prompt, PrefixKV(empty, empty)) \
        if isinstance(plan, BlendPlan) else plan
    blended = getattr(out, "k", None) is not None and out.k.is_cuda
    say(registered == len(keys) and blended,
        f"FragmentBlender on CUDA: {registered} of {len(keys)} fragments registered in "
        f"{reg_s:.1f} s, blend of a {prompt.size}-token prompt: {out.report.outcome.name} "
        f"({out.report.reused_tokens} reused)")
    blender.close()
    store.chain.close()


def graphs() -> None:
    """The kernels inside a captured CUDA graph (no host sync in their wrappers)."""
    cfg = RopeConfig(D, D, 500000.0)
    k, pos = rnd(4096, H, D), torch.arange(4096, device=dev)
    q, qp = rnd(512, HQ, D), torch.randperm(4096, device=dev, generator=g)[:512].sort().values
    a, b = rnd(4096, H, D), rnd(4096, H, D)

    def run() -> list[torch.Tensor]:
        return [rerotate_k(k, pos, pos + 100, cfg), kv_deviation(a, b),
                subset_attention(q, qp, k, k, pos)]
    eager = run()
    torch.cuda.synchronize()
    graph, side = torch.cuda.CUDAGraph(), torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run()                                          # warm-up on the capture stream
    torch.cuda.current_stream().wait_stream(side)
    with torch.cuda.graph(graph):
        captured = run()
    graph.replay()
    torch.cuda.synchronize()
    ok = all(torch.equal(x, y) for x, y in zip(eager, captured, strict=True))
    say(ok, "rerotate_k, kv_deviation and subset_attention captured in a CUDA graph: replay "
        f"equals eager={ok}")


def writers() -> None:
    """How fast the disk tier's writer stores bf16 KV pages (256 x 4 MiB), zstd and none, by
    thread count, against a busy GPU server's spill rate."""
    import tempfile

    from sgl_kvext.tiers.codec import ZstdCodec
    from sgl_kvext.tiers.disk import DiskTier
    from sgl_kvext.tiers.objects import KVPage
    raw = (torch.randn(256, 2 << 20, device=dev) * 0.5).to(bf).view(torch.uint8).cpu().numpy()
    pages = [KVPage(i.to_bytes(32, "little"), raw[i].data, "bfloat16", (2 << 20,))
             for i in range(256)]
    codec = ZstdCodec(1)
    t0 = time.perf_counter()
    ratio = sum(len(raw[i]) for i in range(16)) / sum(len(codec.encode(raw[i].data))
                                                      for i in range(16))
    one = 16 * 4 / 1024 / (time.perf_counter() - t0)
    rates = []
    for codec_name, threads in (("zstd", 4), ("zstd", 16), ("none", 16)):
        with tempfile.TemporaryDirectory(dir="/tmp") as root:
            tier = DiskTier(Path(root), 8 << 30, b"w" * 32, codec=codec_name, threads=threads)
            t0 = time.perf_counter()
            stored = len(tier.put(pages).stored)
            rates.append(f"{codec_name} x{threads} {1.074 / (time.perf_counter() - t0):.2f} GB/s"
                         f"{'' if stored == 256 else f' ({stored} of 256 stored)'}")
            tier.close()
    say(True, f"disk writer, 1 GiB of bf16 KV pages: zstd on one thread {one:.2f} GB/s "
        f"(ratio {ratio:.2f}x); {', '.join(rates)}; {os.cpu_count()} cores")


def kvikio_io() -> None:
    try:
        import kvikio
    except ImportError:
        print("SKIP kvikio is not installed (the gpu extra)")
        return
    from sgl_kvext.tiers.disk_io import KvikioIO
    io, data, p = KvikioIO(), os.urandom(256 << 20), Path("/tmp/kvx-check.bin")
    p.unlink(missing_ok=True)
    t0 = time.perf_counter()
    io.write(p, [data])
    t1 = time.perf_counter()
    back = io.read(p)
    t2 = time.perf_counter()
    mode = getattr(kvikio.defaults, "get", lambda _: "?")("compat_mode")
    say(bytes(back) == data, f"KvikioIO 256 MiB of host bytes (compat_mode={mode}): write "
        f"{.268 / (t1 - t0):.2f} GB/s, read {.268 / (t2 - t1):.2f} GB/s")


if __name__ == "__main__":
    for name, fn in [("rope", rope), ("deviation", deviation), ("subset_attention", attention),
                     ("host tier", host_tier), ("KVTiering", tiering), ("blend", blend),
                     ("fragments", fragments), ("CUDA graphs", graphs),
                     ("disk writers", writers), ("kvikio", kvikio_io)]:
        try:
            fn()
        except Exception as e:   # one FAIL line per check; the others still run
            say(False, f"{name}: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:240]}")
        torch.cuda.empty_cache()
