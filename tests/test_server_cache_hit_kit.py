"""SGLang's own multi-turn cache-hit test kit (``sglang.test.kits.cache_hit_kit``, shipped in
the sglang wheel) against ``--enable-hierarchical-kv`` with a 1,024-token device pool: 4
clients x 3 rounds of 192-token turns with 16 generated tokens each, so every round evicts
the others' histories to the tiers. The kit asserts that each turn's cached tokens cover the
previous turn's prompt and output down to the server's ``--page-size``: the tiers keep
32-token pages, so this holds only if the last partial page of an evicted history comes back
too (a tail object, sgl_kvext/pages/tiering.py).

The kit samples its prompts from a ShareGPT-format file; with no network it gets one made of
Python's own help topics.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sgl_kvext.harness.server import SGLangServer

pytestmark = pytest.mark.e2e


def _dataset(path: Path) -> Path:
    """A ShareGPT-format file of English prose (``pydoc_data`` topics), two turns each."""
    from pydoc_data.topics import topics

    texts = [t for t in topics.values() if len(t) > 2000][:64]
    path.write_text(json.dumps([{"conversations": [{"from": "human", "value": t},
                                                   {"from": "gpt", "value": "ok"}]}
                                for t in texts]))
    return path


@pytest.mark.parametrize("page_size", [1, pytest.param(16, marks=pytest.mark.extended)])
def test_sglang_cache_hit_kit_passes_with_tiers(model_path: Path, tmp_path: Path,
                                               page_size: int) -> None:
    from sglang.test.kits.cache_hit_kit import run_multiturn_cache_hit_test

    args = ["--dtype", "float32", "--max-total-tokens", "1024", "--page-size", str(page_size),
            "--enable-hierarchical-kv", "--kvext-host-size", "512MiB"]
    with SGLangServer(model_path, args, log_path=tmp_path / "server.log") as srv:
        result = run_multiturn_cache_hit_test(
            srv.url, str(model_path), num_clients=4, num_rounds=3, request_length=192,
            output_length=16, dataset_path=str(_dataset(tmp_path / "sharegpt.json")))
    rounds = result["rounds"]       # the kit asserted every turn already; the totals too:
    cached = [rounds[f"round_{r}"]["total_cached_tokens"] for r in range(3)]
    assert cached[0] == 0 and 4 * 192 <= cached[1] < cached[2], result
