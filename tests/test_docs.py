"""The docs name every option and every module they promise to describe."""

from __future__ import annotations

from helpers import ROOT

from sgl_kvext.config.settings import options


def test_configuration_doc_lists_every_option() -> None:
    text = (ROOT / "docs" / "configuration.md").read_text()
    for key, option in options():
        assert f"`{key}`" in text and f"`{option.flag}`" in text and option.env_var in text


def test_architecture_doc_has_a_bullet_per_module() -> None:
    text = (ROOT / "docs" / "architecture.md").read_text()
    modules = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "sgl_kvext").rglob("*.py")
                     if "_sgl_kernel_shim" not in p.parts)
    missing = [m for m in modules if f"`{m}`" not in text]
    assert not missing, missing
