"""The SGLang internals the plugin relies on (sgl_kvext/sglang_plugin/surface.py) exist in the
installed SGLang with the expected signatures, and only that module imports SGLang. An SGLang
upgrade that moves one fails here, in seconds, naming it."""

from __future__ import annotations

import ast
import dataclasses

from helpers import ROOT


def test_every_internal_the_plugin_relies_on_is_there() -> None:
    from sgl_kvext.sglang_plugin.kernel_fallback import ensure_sgl_kernel

    ensure_sgl_kernel()
    from sgl_kvext.sglang_plugin import surface

    assert surface.problems() == []
    assert len(surface.INTERNALS) >= 40


def test_a_renamed_internal_is_reported_by_name() -> None:
    from sgl_kvext.sglang_plugin.kernel_fallback import ensure_sgl_kernel

    ensure_sgl_kernel()
    from sgl_kvext.sglang_plugin import surface

    def moved(item: surface.Internal, **changes: object) -> surface.Internal:
        return dataclasses.replace(item, **changes)

    by_path = {i.path: i for i in surface.INTERNALS}
    renamed = moved(by_path["sglang.srt.mem_cache.radix_cache:RadixCache._delete_leaf"],
                    path="sglang.srt.mem_cache.radix_cache:RadixCache._remove_leaf")
    reordered = moved(by_path["sglang.srt.mem_cache.radix_cache:RadixCache.init_load_back"],
                      params=("self", "node", "params"))
    field = moved(by_path["sglang.srt.mem_cache.base_prefix_cache:MatchResult"],
                  fields=("device_prefix_len", "host_hit_tokens"))
    found = surface.problems((renamed, reordered, field))
    assert len(found) == 3
    assert found[0].startswith("sglang.srt.mem_cache.radix_cache:RadixCache._remove_leaf: "
                               "missing")
    assert "expected ['self', 'node', 'params']" in found[1]
    assert found[2].endswith("no host_hit_tokens")


def test_only_the_surface_module_imports_sglang() -> None:
    importers = []
    for path in sorted((ROOT / "sgl_kvext").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            if any(n == "sglang" or n.startswith("sglang.") for n in names):
                importers.append(path.relative_to(ROOT).as_posix())
    assert sorted(set(importers)) == ["sgl_kvext/sglang_plugin/surface.py"]
