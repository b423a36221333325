"""Configuration: one frozen, validated ``KVExtConfig`` (``settings``), its value parsers
(``values``) and the only module that reads environment variables (``env``)."""

from sgl_kvext.config.settings import (
    BlendConfig,
    ConfigError,
    FragmentConfig,
    KVExtConfig,
    TierConfig,
)

__all__ = ["BlendConfig", "ConfigError", "FragmentConfig", "KVExtConfig", "TierConfig"]
