"""The ASGI app SGLang's extra HTTP workers import with ``--tokenizer-worker-num > 1``.

Those workers are fresh processes that load no plugins, so the launcher points
``SGLANG_HTTP_SERVER_APP_PATH`` here (``prewarm.route_http_workers``): this module imports the
app the workers would have served (SGLang's, or the one the user had named) and adds the
sgl-kvext routes to it.
"""

from __future__ import annotations

import importlib
from typing import Any

from sgl_kvext.config import env
from sgl_kvext.config.settings import KVExtConfig
from sgl_kvext.sglang_plugin import prewarm
from sgl_kvext.sglang_plugin.surface import HTTP_APP_DEFAULT


def _import_app(path: str) -> Any:
    """The object named by ``module:attr`` (``attr`` defaults to ``app``)."""
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr or "app")


app = _import_app(env.get(env.WRAPPED_HTTP_APP) or HTTP_APP_DEFAULT)
_resolved = env.get(env.RESOLVED_CONFIG)     # the launcher's config, inherited
if _resolved:
    prewarm.add_routes(KVExtConfig.from_json(_resolved), app)
