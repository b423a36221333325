"""KVExtConfig: parsing, layering of sources, and one-line errors naming the option."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sgl_kvext import BlendConfig, ConfigError, FragmentConfig, KVExtConfig, TierConfig
from sgl_kvext.config.settings import options
from sgl_kvext.config.values import GiB, MiB, format_size, parse_size


def test_defaults_are_valid_and_frozen() -> None:
    config = KVExtConfig()
    assert not config.enabled
    assert config.tiers.host_size == 4 * GiB
    assert config.tiers.eviction_policy == "lru"
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.enabled = True  # type: ignore[misc]


@pytest.mark.parametrize("text, size", [
    ("4GiB", 4 * GiB), ("512MiB", 512 * MiB), ("512MB", 512 * 10**6), ("1.5G", int(1.5 * GiB)),
    ("0", 0), (" 7 ", 7), (123, 123)])
def test_sizes_parse(text: str | int, size: int) -> None:
    assert parse_size(text) == size


@given(st.integers(min_value=0, max_value=1 << 50))
def test_format_size_round_trips(size: int) -> None:
    assert parse_size(format_size(size)) == size


def test_python_values_are_parsed_like_strings() -> None:
    tiers = TierConfig(host_size="2GiB", disk_size=1024, eviction_policy="S3FIFO")
    assert tiers.host_size == 2 * GiB and tiers.eviction_policy == "s3fifo"


@pytest.mark.parametrize("kwargs, needle", [
    ({"host_size": "-1"}, "--kvext-host-size"),
    ({"host_size": "12 parsecs"}, "must be a size"),
    ({"eviction_policy": "mru"}, "allowed values are lru, lfu, s3fifo"),
    ({"codec": "gzip"}, "allowed values are none, zstd"),
    ({"write_policy": "sometimes"}, "write_through, write_back"),
    ({"s3_url": "http://bucket/x"}, "s3://bucket[/prefix]"),
    ({"s3_url": "s3://UPPER_case"}, "bucket must be"),
    ({"s3_url": "s3://kv-bucket/x", "s3_endpoint": "ftp://127.0.0.1"}, "http://host:port"),
    ({"s3_endpoint": "http://127.0.0.1:8333"}, "needs --kvext-s3-url"),
    ({"disk_dir": "/proc/kvext-cannot-exist"}, "not writable"),
])
def test_bad_tier_values_name_the_option(kwargs: dict[str, object], needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        TierConfig(**kwargs)  # type: ignore[arg-type]
    message = str(err.value)
    assert needle in message
    assert "\n" not in message
    assert message.startswith("--kvext-")


def test_disk_dir_under_a_file_is_refused(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="is not a folder"):
        TierConfig(disk_dir=blocker / "cache")


@pytest.mark.parametrize("mode", [0o777, 0o1777, 0o770, 0o757])
def test_disk_dir_others_can_write_is_refused(tmp_path: Path, mode: int) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(mode)
    with pytest.raises(ConfigError, match="writable by group or others") as err:
        TierConfig(disk_dir=shared)
    assert "\n" not in str(err.value) and "chmod go-w" in str(err.value)
    shared.chmod(0o755)
    assert TierConfig(disk_dir=shared).disk_dir == shared


def test_disk_tier_files_and_folders_are_its_owners_only(tmp_path: Path) -> None:
    import stat

    from sgl_kvext.tiers.disk import DiskTier
    from sgl_kvext.tiers.objects import KVPage

    tier = DiskTier(tmp_path / "disk", 1 << 20, bytes(32))
    tier.put([KVPage(bytes(range(32)), bytes(64), "uint8", (64,))])
    tier.close()
    paths = [tmp_path / "disk", *(tmp_path / "disk").rglob("*")]
    assert len(paths) > 5
    for path in paths:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o700 if path.is_dir() else 0o600), (path, oct(mode))


def test_disk_dir_that_does_not_exist_yet_is_fine_and_not_created(tmp_path: Path) -> None:
    target = tmp_path / "new" / "cache"
    assert TierConfig(disk_dir=str(target)).disk_dir == target
    assert not target.exists()


@pytest.mark.parametrize("section, kwargs, needle", [
    (BlendConfig, {"recompute_ratio": 1.5}, "within [0, 1]"),
    (BlendConfig, {"recompute_ratio": "lots"}, "must be a number"),
    (BlendConfig, {"check_layer": -1}, ">= 0"),
    (BlendConfig, {"query_share": -0.1}, "= -0.1: must be within [0, 1]"),
    (BlendConfig, {"spread": "question"}, "prompt, chunk, attention"),
    (BlendConfig, {"fallback_entropy": -1}, "= -1.0: must be >= 0 nats"),
    (BlendConfig, {"fallback_entropy": "nan"}, "must be >= 0 nats"),
    (FragmentConfig, {"min_tokens": 0}, ">= 1"),
    (FragmentConfig, {"chunking": "regex"}, "explicit, auto, both"),
    (FragmentConfig, {"enabled": "maybe"}, "must be a boolean"),
    (KVExtConfig, {"max_request_bytes": "512KiB"},
     "= 524288: must be at least 1MiB"),
    (KVExtConfig, {"max_request_bytes": "lots"}, "must be a size"),
    (KVExtConfig, {"metrics_interval_s": 0.01}, "--kvext-metrics-interval"),
    (KVExtConfig, {"metrics_interval_s": 61}, "must be within [0.05, 60] seconds"),
])
def test_bad_section_values(section: type, kwargs: dict[str, object], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle.replace("[", r"\[")):
        section(**kwargs)


def test_fragment_blend_needs_the_hierarchical_cache() -> None:
    with pytest.raises(ConfigError, match="needs --enable-hierarchical-kv"):
        KVExtConfig(fragments=FragmentConfig(enabled=True))


def test_layering_yaml_then_env_then_overrides(tmp_path: Path) -> None:
    yaml_file = tmp_path / "kvext.yaml"
    yaml_file.write_text("enabled: true\ntiers:\n  host_size: 1GiB\n  codec: none\n"
                         "blend:\n  recompute_ratio: 0.3\n")
    environ = {"KVEXT_HOST_SIZE": "2GiB", "KVEXT_EVICTION_POLICY": "lfu"}
    config = KVExtConfig.load(config_file=yaml_file, environ=environ,
                              overrides={"tiers.eviction_policy": "s3fifo",
                                         "tiers.disk_size": None})
    assert config.enabled
    assert config.tiers.host_size == 2 * GiB          # env beats YAML
    assert config.tiers.codec == "none"                # YAML beats default
    assert config.tiers.eviction_policy == "s3fifo"    # override beats env
    assert config.tiers.disk_size == TierConfig().disk_size  # None override ignored
    assert config.blend.recompute_ratio == 0.3


def test_config_file_named_by_environment(tmp_path: Path) -> None:
    yaml_file = tmp_path / "kvext.yaml"
    yaml_file.write_text("tiers: {eviction_policy: lfu}\n")
    config = KVExtConfig.load(environ={"KVEXT_CONFIG": str(yaml_file)})
    assert config.tiers.eviction_policy == "lfu"


def test_env_error_names_the_variable() -> None:
    with pytest.raises(ConfigError, match="KVEXT_HOST_SIZE"):
        KVExtConfig.load(environ={"KVEXT_HOST_SIZE": "-3GiB"})


def test_unknown_variable_and_key_are_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown variable KVEXT_HOST_SIZ;"):
        KVExtConfig.load(environ={"KVEXT_HOST_SIZ": "1GiB"})
    bad = tmp_path / "bad.yaml"
    bad.write_text("tiers:\n  hots_size: 1GiB\n")
    with pytest.raises(ConfigError, match="unknown option 'tiers.hots_size'"):
        KVExtConfig.load(config_file=bad, environ={})


@pytest.mark.parametrize("content, needle", [("tiers: [1, 2]\n", "must be a mapping"),
                                             ("- just\n- a list\n", "top level must be"),
                                             ("tiers: {host_size: 1GiB\n", "not valid YAML")])
def test_malformed_yaml(tmp_path: Path, content: str, needle: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(content)
    with pytest.raises(ConfigError, match=needle):
        KVExtConfig.load(config_file=path, environ={})


def test_missing_yaml_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        KVExtConfig.load(config_file=tmp_path / "nope.yaml", environ={})


def test_close_call_gate_parses_inf_to_switch_it_off() -> None:
    assert BlendConfig(fallback_entropy="inf").fallback_entropy == float("inf")
    assert BlendConfig(fallback_entropy="2.5").fallback_entropy == 2.5


def test_json_round_trip(tmp_path: Path) -> None:
    config = KVExtConfig(enabled=True,
                         tiers=TierConfig(disk_dir=tmp_path / "d", s3_url="s3://kv-bucket/p",
                                          s3_endpoint="http://127.0.0.1:8333"),
                         fragments=FragmentConfig(enabled=True, min_tokens=32))
    assert KVExtConfig.from_json(config.to_json()) == config


def test_every_option_has_a_distinct_flag_and_variable() -> None:
    flags = [opt.flag for _, opt in options()]
    variables = [opt.env_var for _, opt in options()]
    assert len(set(flags)) == len(flags) and len(set(variables)) == len(variables)
    # SGLang rewrites SGL_* variables to SGLANG_*, so ours must not start with SGL_.
    assert all(v.startswith("KVEXT_") for v in variables)


def test_host_ratio_sizes_the_host_tier_from_the_device_pool() -> None:
    import torch

    from sgl_kvext.pages.kv_pages import PagedKV
    from sgl_kvext.sglang_plugin.backend import sized_tiers

    paged = PagedKV([torch.zeros(1000, 2, 8)] * 3, [torch.zeros(1000, 2, 8)] * 3, 4)
    pool_bytes = 1000 * 2 * 3 * 2 * 8 * 4                      # slots x K,V x layers x row
    ratio = TierConfig(host_ratio=2.5)
    assert sized_tiers(ratio, paged).host_size == int(2.5 * pool_bytes)
    assert sized_tiers(TierConfig(host_size="1GiB"), paged).host_size == 1 << 30
    with pytest.raises(ConfigError, match=r"--kvext-host-ratio .*must be in \[0, 100\]"):
        TierConfig(host_ratio=-1)


def test_a_check_layer_the_model_lacks_is_refused_at_start_in_one_line() -> None:
    from sgl_kvext.sglang_plugin.backend import check_blend_layer

    check_blend_layer(0, 30)
    check_blend_layer(29, 30)
    with pytest.raises(ValueError, match=r"^--kvext-blend-check-layer 30: this model has 30 "
                                         r"layers; allowed 0-29$"):
        check_blend_layer(30, 30)
