"""Shared fixtures (the prepared SmolLM2 checkpoint, transformers reference outputs, logs, a
real SeaweedFS, the session's server pool) and the test tiers.

Every test belongs to one tier, a marker: ``unit`` (no model, no server; given to every test
without another tier), ``kernel`` (``tests/kernels``), ``e2e`` (a real model or SGLang
server), ``fault`` (a real server under an injected fault), ``bench`` (a benchmark command
end to end), ``soak``. ``extended`` marks what only ``make test-all`` runs (longer variants of
what ``make test`` already covers). Tests that share a pool server say which
(``uses_server``) and run next to each other.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

TIERS = ("unit", "kernel", "e2e", "fault", "bench", "soak")
#: (test id, seconds) of every SGLang server start in this session (summary at the end).
_SERVER_STARTS: list[tuple[str, float]] = []


@pytest.fixture(scope="session", autouse=True)
def _count_server_starts() -> Iterator[None]:
    """Time every real server start (the suite's largest cost) for the closing summary."""
    import os
    import time

    from sgl_kvext.harness.server import SGLangServer

    start = SGLangServer.start

    def timed(self: SGLangServer) -> SGLangServer:
        began = time.perf_counter()
        try:
            return start(self)
        finally:
            test = os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0]
            _SERVER_STARTS.append((test, time.perf_counter() - began))

    SGLangServer.start = timed  # type: ignore[method-assign]
    try:
        yield
    finally:
        SGLangServer.start = start  # type: ignore[method-assign]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--ports", metavar="LO-HI", default=None,
                     help="loopback ports the harness hands out (tests/run_tiers.py gives its "
                          "two pytest processes disjoint ranges)")


def pytest_configure(config: pytest.Config) -> None:
    spec = config.getoption("--ports")
    if spec is None:
        return
    from sgl_kvext.harness import server

    lo, sep, hi = spec.partition("-")
    if not (sep and lo.isdigit() and hi.isdigit() and
            server.PORT_RANGE.start <= int(lo) < int(hi) < server.PORT_RANGE.stop):
        raise pytest.UsageError(f"--ports {spec!r}: expected LO-HI within "
                                f"{server.PORT_RANGE.start}-{server.PORT_RANGE.stop - 1}")
    server.PORT_RANGE = range(int(lo), int(hi) + 1)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _SERVER_STARTS:
        total = sum(s for _, s in _SERVER_STARTS)
        terminalreporter.write_line(f"SGLang server starts: {len(_SERVER_STARTS)}, "
                                    f"{total:.0f} s in all")
        by_test: dict[str, list[float]] = {}
        for test, seconds in _SERVER_STARTS:
            by_test.setdefault(test, []).append(seconds)
        for test, times in sorted(by_test.items(), key=lambda kv: -sum(kv[1])):
            terminalreporter.write_line(f"  {len(times)} x {sum(times) / len(times):5.1f} s  "
                                        f"{test}")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "kernels" in item.path.parts:
            item.add_marker("kernel")
        if not any(item.get_closest_marker(t) for t in TIERS):
            item.add_marker("unit")

    def shared(item: pytest.Item) -> str:
        marker = item.get_closest_marker("uses_server")
        return str(marker.args[0]) if marker else ""

    # Stable: tests keep their order within a module; those on a pool server move to the
    # position of the first test using it, so each pool server starts about once.
    first: dict[str, int] = {}
    for i, item in enumerate(items):
        first.setdefault(shared(item), i)
    order = {id(item): (first[shared(item)] if shared(item) else i, i)
             for i, item in enumerate(items)}
    items.sort(key=lambda item: order[id(item)])


@pytest.fixture(scope="module", autouse=True)
def _no_triton_interpreter(request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    """Outside tests/kernels, child processes (SGLang servers) must not run Triton interpreted."""
    if "kernels" in request.path.parts:
        yield
        return
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("TRITON_INTERPRET", raising=False)
        yield


@pytest.fixture(scope="session")
def model_path() -> Path:
    """The embedded SmolLM2 checkpoint (bf16), prepared once per cache folder."""
    from sgl_kvext.harness.model_prep import prepare_smollm2

    return prepare_smollm2().path


@pytest.fixture(scope="session")
def hf_greedy(model_path: Path) -> Callable[[Sequence[str], int], list[list[int]]]:
    """Greedy continuations from transformers in float32: the exactness reference."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()

    # Several server tests ask for the same prompts; transformers runs each once per session.
    done: dict[tuple[str, int], list[int]] = {}

    def generate(prompts: Sequence[str], max_new_tokens: int) -> list[list[int]]:
        for prompt in prompts:
            if (prompt, max_new_tokens) in done:
                continue
            ids = tokenizer(prompt, return_tensors="pt").input_ids
            with torch.no_grad():
                out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False,
                                     pad_token_id=tokenizer.eos_token_id)
            done[prompt, max_new_tokens] = out[0, ids.shape[1]:].tolist()
        return [list(done[p, max_new_tokens]) for p in prompts]

    return generate


@pytest.fixture
def log_dir(tmp_path: Path) -> Path:
    path = tmp_path / "logs"
    path.mkdir()
    return path


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """One real SeaweedFS S3 server on loopback for the session."""
    from sgl_kvext.harness.seaweedfs import SeaweedFS

    root = tmp_path_factory.mktemp("seaweed")
    with SeaweedFS(root / "data", log_path=root / "weed.log") as server:
        yield server


@pytest.fixture(scope="session")
def n_tokens(model_path: Path) -> Callable[[str], int]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    return lambda text: len(tok(text, add_special_tokens=False).input_ids)


_POOLS: list = []   # the session's server pool, once a test asked for it


@pytest.fixture(scope="session")
def servers(model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """The session's :class:`server_pool.ServerPool` (at most two servers alive)."""
    from server_pool import ServerPool

    pool = ServerPool(model_path, tmp_path_factory.mktemp("pool-logs"))
    _POOLS.append(pool)
    try:
        yield pool
    finally:
        _POOLS.remove(pool)
        pool.close()


@pytest.fixture(autouse=True)
def _pool_yields_memory(request: pytest.FixtureRequest) -> None:
    """A test that starts servers of its own gets the memory of the pool's servers: on a
    24 GiB CI machine two pool servers, a third with a 4 GiB host tier and the transformers
    reference do not fit together (the OOM killer took the third). Pool tests run next to each
    other (see the collection hook), so each pool server still starts about once."""
    if request.node.get_closest_marker("uses_server") is None and any(
            request.node.get_closest_marker(t) for t in ("e2e", "fault", "bench", "soak")):
        for pool in _POOLS:
            pool.close()


@pytest.fixture(scope="session")
def chain(seaweed, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """The shared every-tier server's disk folder and S3 prefix (``tiers_common.Chain``)."""
    import uuid

    from tiers_common import Chain

    from sgl_kvext.harness.server import free_port

    return Chain(tmp_path_factory.mktemp("chain-disk"), uuid.uuid4().hex, seaweed, free_port())


@pytest.fixture
def meta_default_device() -> Iterator[None]:
    """torch's default device is ``meta`` on this thread: a tensor made without an explicit
    device lands there and fails loudly when mixed with real ones (the CUDA-readiness check
    for code that may only ever make tensors on the model's or the pool's device)."""
    import torch

    torch.set_default_device("meta")
    try:
        yield
    finally:
        torch.set_default_device(None)
