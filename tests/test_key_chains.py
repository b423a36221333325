"""PathKeys: remembered keys equal freshly hashed ones, and the memories stay bounded."""

import numpy as np
import pytest

from sgl_kvext.pages import key_chains
from sgl_kvext.pages.key_chains import PathKeys
from sgl_kvext.pages.keys import DEFAULT_TENANT as T0
from sgl_kvext.pages.keys import ModelIdentity

T = 4
IDENTITY = ModelIdentity("cfg", "weights", "float32", T, "mha:layers=2,kv_heads=2,head_dim=4")


def test_request_keys_are_bounded_by_requests_and_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(key_chains, "MAX_REQUESTS", 3)
    monkeypatch.setattr(key_chains, "MAX_REQUEST_TOKENS", 100)
    keys = PathKeys(IDENTITY, T)
    prompts = {f"r{i}": list(range(i * 1000, i * 1000 + 40)) for i in range(5)}
    for rid, tokens in prompts.items():
        assert keys.for_request(T0, tokens, 0, rid, ()).keys == keys.all(T0, tokens)
    # 40 tokens each: two fit under 100 tokens (three would under MAX_REQUESTS alone).
    assert list(keys._requests) == ["r3", "r4"] and keys._request_tokens == 80
    keys.forget("r3")
    keys.forget("r3")                                      # twice is harmless
    assert keys._request_tokens == 40
    other = list(range(9000, 9040))                        # another prompt under r4's id
    assert keys.for_request(T0, other, 2, "r4", ()).keys == keys.all(T0, other)[2:]
    assert keys._request_tokens == 40 and len(keys._requests) == 1


def test_anchors_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(key_chains, "MAX_ANCHORS", 2)
    keys = PathKeys(IDENTITY, T)
    path = np.arange(5000, 5040).tolist()
    for node in range(5):
        chain = keys.from_page(T0, path, 0, [(node, 8 * (node + 1))])
        assert chain.keys == keys.all(T0, path)
    assert list(keys._anchors) == [3, 4]
