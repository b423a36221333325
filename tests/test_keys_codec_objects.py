"""Page keys, codecs and the stored-object format."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sgl_kvext.pages.keys import ModelIdentity, Namespace, Tenant, page_keys
from sgl_kvext.tiers.codec import CodecError, make_codec, shuffle, unshuffle
from sgl_kvext.tiers.objects import PLAIN, CorruptObject, KVPage, decode_object, encode_object

MODEL = ModelIdentity("cfg", "weights", "bfloat16", 4, "mha:layers=30,kv_heads=3,head_dim=64")


def test_keys_chain_and_ignore_the_partial_page() -> None:
    ns = Namespace(MODEL)
    keys = page_keys(ns, list(range(11)))
    assert len(keys) == 2 and all(len(k) == 32 for k in keys)
    assert page_keys(ns, list(range(8))) == keys           # the tail of 3 has no key
    other = page_keys(ns, [99, 1, 2, 3, 4, 5, 6, 7])
    assert other[0] != keys[0] and other[1] != keys[1]      # page 2 depends on page 1


@pytest.mark.parametrize("change", [
    {"config": "cfg2"}, {"weights": "w2"}, {"dtype": "float16"}, {"page_size": 8},
    {"kv_layout": "mha:layers=31"}, {"tp_rank": 1, "tp_size": 2}, {"quantization": "fp8"},
    {"object_format": 2}])
def test_every_identity_field_changes_the_keys(change: dict[str, object]) -> None:
    fields = {**{f: getattr(MODEL, f) for f in MODEL.__dataclass_fields__}, **change}
    other = ModelIdentity(**fields)  # type: ignore[arg-type]
    tokens = list(range(16))
    assert page_keys(Namespace(other), tokens)[0] != page_keys(Namespace(MODEL), tokens)[0]


def test_tenants_never_share_keys() -> None:
    tokens = list(range(8))
    assert page_keys(Namespace(MODEL, Tenant(cache_salt="tenant-a")), tokens) != page_keys(
        Namespace(MODEL, Tenant(cache_salt="tenant-b")), tokens)
    # Parts are length-prefixed: moving a character across the boundary is another tenant.
    assert Tenant("a\x00", "b").encode() != Tenant("a", "\x00b").encode()
    assert Tenant("a", "b").encode() != Tenant("a", "b", blend=True).encode()


def test_keys_are_stable_across_processes_and_hash_seeds() -> None:
    code = ("from sgl_kvext.pages.keys import *; "
            "m = ModelIdentity('cfg', 'weights', 'bfloat16', 4, "
            "'mha:layers=30,kv_heads=3,head_dim=64'); "
            "print(page_keys(Namespace(m, Tenant('x')), list(range(12)))[-1].hex())")
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           env={**os.environ, "PYTHONHASHSEED": seed}).stdout.strip()
            for seed in ("0", "1", "12345")}
    assert outs == {page_keys(Namespace(MODEL, Tenant("x")), list(range(12)))[-1].hex()}


def test_bad_token_ids_and_identity() -> None:
    with pytest.raises(ValueError, match=r"\[0, 2\*\*32\)"):
        page_keys(Namespace(MODEL), [-1, 2, 3, 4])
    with pytest.raises(ValueError, match="page_size"):
        ModelIdentity("c", "w", "bf16", 0, "l")
    with pytest.raises(ValueError, match="tp_rank"):
        ModelIdentity("c", "w", "bf16", 1, "l", tp_rank=2, tp_size=2)


@given(st.binary(max_size=3000), st.sampled_from([1, 2, 4]))
def test_shuffle_round_trips(data: bytes, width: int) -> None:
    assert unshuffle(shuffle(data, width), width).tobytes() == data


@settings(max_examples=30)
@given(st.binary(max_size=5000), st.sampled_from(["none", "zstd"]), st.sampled_from([1, 2, 4]))
def test_codecs_round_trip(data: bytes, name: str, width: int) -> None:
    codec = make_codec(name, width=width)
    assert codec.decode(codec.encode(data), len(data)) == data


def test_codec_rejects_wrong_sizes_and_names() -> None:
    blob = make_codec("zstd").encode(b"x" * 100)
    with pytest.raises(CodecError):
        make_codec("zstd").decode(blob, 99)
    with pytest.raises(CodecError):
        make_codec("zstd").decode(b"not zstd", 100)
    with pytest.raises(ValueError, match="none, zstd"):
        make_codec("lz4")


NS = bytes(range(32))
PAGE = KVPage(b"k" * 32, np.arange(500, dtype=np.uint16).tobytes(), "bfloat16", (500,))


@pytest.mark.parametrize("codec", ["none", "zstd"])
def test_object_round_trip(codec: str) -> None:
    got = decode_object(encode_object(PAGE, NS, codec).join(), NS, PAGE.key)
    assert bytes(got.data) == PAGE.data and (got.dtype, got.shape) == ("bfloat16", (500,))


def test_every_single_byte_flip_is_detected() -> None:
    blob = encode_object(PAGE, NS, "zstd").join()
    rng = random.Random(0)
    for pos in range(len(blob)):
        damaged = bytearray(blob)
        damaged[pos] ^= 1 << rng.randrange(8)
        with pytest.raises(CorruptObject):
            decode_object(bytes(damaged), NS, PAGE.key)


@pytest.mark.parametrize("codec", ["none", "zstd"])
def test_every_byte_set_to_any_other_value_is_rejected(codec: str) -> None:
    blob = encode_object(PAGE, NS, codec).join()
    for pos in range(len(blob)):
        for value in {0x00, 0xFF, blob[pos] ^ 0x80} - {blob[pos]}:
            damaged = bytearray(blob)
            damaged[pos] = value
            with pytest.raises(CorruptObject):
                decode_object(bytes(damaged), NS, PAGE.key)


EDITS = st.lists(st.tuples(st.sampled_from(["set", "insert", "delete"]), st.integers(0, 1 << 16),
                           st.integers(0, 255)), min_size=1, max_size=6)


@settings(max_examples=500, deadline=None)
@given(st.sampled_from(["none", "zstd"]), EDITS, st.binary(max_size=8))
def test_mutated_objects_are_rejected_or_exact(codec: str, edits: list[tuple[str, int, int]],
                                               tail: bytes) -> None:
    """Any mix of byte edits, insertions, deletions and appended bytes: decoding either
    refuses the object (CorruptObject, nothing else) or returns exactly the page."""
    blob = bytearray(encode_object(PAGE, NS, codec).join())
    for op, pos, value in edits:
        at = pos % (len(blob) + 1)
        if op == "set" and at < len(blob):
            blob[at] = value
        elif op == "insert":
            blob.insert(at, value)
        elif op == "delete" and at < len(blob):
            del blob[at]
    blob += tail
    try:
        got = decode_object(bytes(blob), NS, PAGE.key)
    except CorruptObject:
        return
    assert bytes(got.data) == PAGE.data and (got.dtype, got.shape) == (PAGE.dtype, PAGE.shape)


@pytest.mark.parametrize("cut", [0, 10, 36, 100, -1])
def test_truncation_is_detected(cut: int) -> None:
    blob = encode_object(PAGE, NS, "zstd").join()
    with pytest.raises(CorruptObject):
        decode_object(blob[:cut], NS, PAGE.key)


def test_wrong_key_or_namespace_is_refused() -> None:
    blob = encode_object(PAGE, NS, "none").join()
    with pytest.raises(CorruptObject, match="another key"):
        decode_object(blob, NS, b"x" * 32)
    with pytest.raises(CorruptObject, match="another namespace"):
        decode_object(blob, bytes(32), PAGE.key)


def test_a_deployment_key_refuses_objects_made_without_it() -> None:
    from sgl_kvext.tiers.objects import PREFIX_BYTES, Protection

    ours = Protection.tagged(b"s" * 32)
    theirs = Protection.tagged(b"t" * 32)
    blob = encode_object(PAGE, NS, "zstd", protection=ours).join()
    assert bytes(decode_object(blob, NS, PAGE.key, ours).data) == PAGE.data
    with pytest.raises(CorruptObject, match="another deployment"):
        decode_object(blob, NS, PAGE.key, theirs)
    with pytest.raises(CorruptObject, match="has no key"):
        decode_object(blob, NS, PAGE.key, PLAIN)
    meta_len = int.from_bytes(blob[8:12], "little")
    for at in (20, PREFIX_BYTES + meta_len - 3, len(blob) - 1):   # tag, meta, payload
        bad = bytearray(blob)
        bad[at] ^= 0x01
        with pytest.raises(CorruptObject):
            decode_object(bytes(bad), NS, PAGE.key, ours)
    forged = encode_object(PAGE, NS, "zstd").join()  # valid xxh3: all a forger can make
    with pytest.raises(CorruptObject, match="not sealed"):
        decode_object(forged, NS, PAGE.key, ours)
    with pytest.raises(ValueError, match="16"):
        Protection.tagged(b"short")


def test_a_tag_is_aes_gcm_over_meta_and_payload_so_stored_objects_stay_readable() -> None:
    """The tag is fed meta and payload in two parts (no copy of the payload); it must be the
    one-shot AES-GCM tag over their concatenation that objects were stored with before."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    from sgl_kvext.tiers.objects import PREFIX_BYTES, Protection, _derive, read_header

    ours = Protection.tagged(b"s" * 32)
    blob = encode_object(PAGE, NS, "none", protection=ours).join()
    header = read_header(blob)
    meta = blob[PREFIX_BYTES:PREFIX_BYTES + header.meta_len]
    payload = blob[PREFIX_BYTES + header.meta_len:]
    one_shot = AESGCM(_derive(b"s" * 32, b"kvext-objkey-v2")).encrypt(
        header.nonce, b"", meta + payload)
    assert blob[PREFIX_BYTES - 16:PREFIX_BYTES] == one_shot
    view = memoryview(bytearray(blob))                 # as the disk tier reads it
    assert bytes(decode_object(view, NS, PAGE.key, ours).data) == bytes(PAGE.data)


@pytest.mark.parametrize("codec", ["none", "zstd"])
def test_an_encrypted_object_hides_its_kv_and_refuses_every_change(codec: str) -> None:
    from sgl_kvext.tiers.objects import PREFIX_BYTES, Protection

    ours, theirs = Protection.encrypted(b"s" * 32), Protection.encrypted(b"t" * 32)
    raw = bytes(PAGE.data)
    blob = encode_object(PAGE, NS, codec, protection=ours).join()
    assert bytes(decode_object(blob, NS, PAGE.key, ours).data) == raw
    assert raw[:64] not in blob and raw[-64:] not in blob        # the KV is not readable
    assert blob != encode_object(PAGE, NS, codec, protection=ours).join()   # fresh nonce
    meta_len = int.from_bytes(blob[8:12], "little")
    for at in (4 + 2 + 2 + 4 + 8,                       # the tag
               PREFIX_BYTES + meta_len - 3,             # the meta (authenticated, in clear)
               PREFIX_BYTES + meta_len + 5, len(blob) - 1):   # the ciphertext
        bad = bytearray(blob)
        bad[at] ^= 0x01
        with pytest.raises(CorruptObject):
            decode_object(bytes(bad), NS, PAGE.key, ours)
    with pytest.raises(CorruptObject, match="another deployment"):
        decode_object(blob, NS, PAGE.key, theirs)
    with pytest.raises(CorruptObject, match="has no key"):
        decode_object(blob, NS, PAGE.key, PLAIN)
    for made in (PLAIN, Protection.tagged(b"s" * 32)):      # all a forger without the key
        other = encode_object(PAGE, NS, codec, protection=made).join()   # can make
        with pytest.raises(CorruptObject, match="not sealed"):
            decode_object(other, NS, PAGE.key, ours)
    with pytest.raises(ValueError, match="32-byte"):
        Protection(b"k" * 16, "aes-256-gcm")


def test_weights_digest_sees_a_change_in_the_middle_of_a_weight_file(tmp_path: Path) -> None:
    from sgl_kvext.sglang_plugin.identity import weights_digest

    weights = tmp_path / "model.safetensors"
    data = bytearray(random.Random(0).randbytes(8 << 20))
    weights.write_bytes(bytes(data))
    before = weights_digest(str(tmp_path))
    data[4 << 20] ^= 1          # a fine-tune's change, far from both ends
    weights.write_bytes(bytes(data))
    assert weights_digest(str(tmp_path)) != before
    assert weights_digest("no-such/model-id", "main") != weights_digest("no-such/model-id", "v2")
