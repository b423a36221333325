"""Load SGLang's own model in-process, without a server, for the offline blend benchmark.

SGLang's layers read their parallel configuration from process globals, so this publishes a
``ServerArgs`` and starts a one-process (gloo, TP 1) parallel runtime first. That can happen
once per process: call :func:`load_offline_model` once, and never in a process that also runs
an SGLang engine. Inside the server, the scheduler's already-loaded model is used instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sgl_kvext.harness.server import free_port
from sgl_kvext.sglang_plugin.kernel_fallback import ensure_sgl_kernel

DTYPES = ("float32", "bfloat16", "float16")


def load_offline_model(model_path: Path, dtype: str = "float32") -> Any:
    """SGLang's causal LM for ``model_path`` on CPU in ``dtype``, in eval mode."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; allowed: {', '.join(DTYPES)}")
    if not (Path(model_path) / "config.json").is_file():
        raise ValueError(f"model path {model_path} has no config.json")
    ensure_sgl_kernel()
    from sgl_kvext.sglang_plugin.surface import find

    args = find("sglang.srt.server_args:ServerArgs")(model_path=str(model_path), device="cpu",
                                                     dtype=dtype, tp_size=1)
    find("sglang.srt.runtime_context:publish")(
        args, role="scheduler",
        ranks=find("sglang.srt.runtime_context:SpawnRanks")(world_rank=0, gpu_id=0))
    find("sglang.srt.distributed.bootstrap:init_parallel_runtime")(
        server_args=args, device="cpu", dist_port=free_port())
    model_config = find("sglang.srt.configs.model_config:ModelConfig.from_server_args")(args)
    find("sglang.srt.distributed.bootstrap:init_layer_runtime")(model_config=model_config)
    model = find("sglang.srt.model_loader:get_model")(
        model_config=model_config, load_config=find("sglang.srt.configs.load_config:LoadConfig")(),
        device_config=find("sglang.srt.configs.device_config:DeviceConfig")("cpu", 0))
    return model.eval()
