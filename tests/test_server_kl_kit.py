"""SGLang's KL cache-hit kit (``sglang.test.kl_test_utils``, shipped in the sglang wheel)
against ``--enable-hierarchical-kv`` with a host tier far smaller than the batch: 6 prompts
of ~1,200 tokens sent as one batch to a 4,096-token device pool and a 64 MiB host tier (~1.4k
float32 tokens), the rest demoted to disk. Prefilled once, then generated again: the kit
wants more than half of the prompts to be cache hits and the cached KV to give the same
logprobs as a fresh prefill (KL). The pages the host tier could not keep come back from disk
straight into the pool (sgl_kvext/pages/tiering.py).

The kit downloads LongBench prompts; with no network it gets prompts made of Python's own
help topics.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from sgl_kvext.harness.server import SGLangServer

pytestmark = [pytest.mark.e2e, pytest.mark.extended]

PROMPTS, PROMPT_TOKENS = 6, 1200
#: No-tier level (a device-only radix hit, float32): the cached KV is the same bytes.
KL_LIMIT = 1e-3


def _prompts(model_path: Path) -> list[list[int]]:
    from pydoc_data.topics import topics

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    texts = sorted((t for t in topics.values() if len(t) > 8000), key=len)[:PROMPTS]
    return [tok(t, add_special_tokens=False).input_ids[:PROMPT_TOKENS] for t in texts]


def test_sglang_kl_kit_hits_through_disk_when_the_host_tier_is_short(
        model_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from sglang.test import kl_test_utils as kit

    prompts = _prompts(model_path)
    assert len(prompts) == PROMPTS and {len(p) for p in prompts} == {PROMPT_TOKENS}
    monkeypatch.setattr(kit, "get_input_ids", lambda **_: prompts)
    compared: list[bool] = []      # the kit returns early, passing, without a radix cache

    def compare(input_logprobs: Any, output_logprobs: Any, *args: Any) -> None:
        real_compare(input_logprobs, output_logprobs, *args)
        compared.append(True)

    real_compare = kit.compare_kl_divergence
    monkeypatch.setattr(kit, "compare_kl_divergence", compare)
    args = ["--dtype", "float32", "--max-total-tokens", "4096", "--enable-hierarchical-kv",
            "--kvext-host-size", "64MiB", "--kvext-disk-dir", str(tmp_path / "disk"),
            "--enable-metrics"]
    with SGLangServer(model_path, args, log_path=tmp_path / "server.log") as srv:
        hits: list[int] = []
        generate = kit._generate

        def counting(base_url: str, input_ids: Any, max_new_tokens: int, **kw: Any) -> Any:
            results = generate(base_url, input_ids, max_new_tokens, **kw)
            if max_new_tokens and kw.get("return_logprob") and kw.get("logprob_start_len",
                                                                         -1) == -1:
                hits.extend(r["meta_info"]["cached_tokens"] for r in results)
            return results

        monkeypatch.setattr(kit, "_generate", counting)
        # The kit asserts more than half hit and the KL below the threshold itself.
        kit.test_input_output_logprobs_match_prefill_cache_hit_helper(
            srv.url, {str(model_path): {"kl_div": KL_LIMIT}}, str(model_path),
            max_samples=PROMPTS, max_new_tokens=8)
        metrics = srv.get_text("/metrics")
    assert compared == [True]
    assert sum(h > 0 for h in hits) > PROMPTS // 2, hits
    streamed = [line for line in metrics.splitlines()
                if line.startswith("kvext_streamed_pages_total")]
    assert streamed and float(streamed[0].split()[-1]) > 0, streamed
