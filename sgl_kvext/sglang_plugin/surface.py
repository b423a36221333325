"""Every SGLang internal sgl-kvext relies on, named once.

The plugin extends SGLang through its own extension points (plugin entry point, hook
registry, radix-cache and attention-backend registries) but also leans on internals that carry
no stability promise: method names it hooks or overrides, parameter orders, request fields,
the Llama module layout. :data:`INTERNALS` lists each of them with what the plugin expects;
:func:`problems` checks the installed SGLang against that list in seconds
(``tests/test_sglang_surface.py``), so an upgrade fails there with the list of what moved,
not inside a server start. The other modules of this package take SGLang's classes, hook
targets and lazy imports from here, and only from here (the same test checks that).
"""

from __future__ import annotations

import importlib
import inspect
import re
from dataclasses import dataclass
from typing import Any

from sglang.srt.disaggregation.kv_events import BlockRemoved, BlockStored
from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend
from sglang.srt.mem_cache.base_prefix_cache import (
    EvictParams,
    EvictResult,
    InitLoadBackParams,
    MatchPrefixParams,
    MatchResult,
)
from sglang.srt.mem_cache.cache_init_params import CacheInitParams
from sglang.srt.mem_cache.radix_cache import RadixCache, RadixKey, TreeNode
from sglang.srt.mem_cache.registry import (
    TreeCacheBuildContext,
    register_radix_cache_backend,
    registered_radix_cache_backends,
)
from sglang.srt.plugins.hook_registry import HookRegistry, HookType

__all__ = ["BlockRemoved", "BlockStored", "CacheInitParams", "EvictParams", "EvictResult",
           "HookRegistry", "HookType", "InitLoadBackParams", "MatchPrefixParams", "MatchResult",
           "RadixCache", "RadixKey",
           "TorchNativeAttnBackend", "TreeCacheBuildContext", "TreeNode",
           "register_radix_cache_backend", "registered_radix_cache_backends"]

# Hook targets (HookRegistry takes dotted strings).
HOOK_ADD_CLI_ARGS = "sglang.srt.server_args.ServerArgs.add_cli_args"
HOOK_FROM_CLI_ARGS = "sglang.srt.server_args.ServerArgs.from_cli_args"
HOOK_CREATE_REQ = "sglang.srt.managers.scheduler.Scheduler._create_generation_req"
HOOK_TOKENIZE = "sglang.srt.managers.tokenizer_manager.TokenizerManager._create_tokenized_object"
HOOK_CONTROL = "sglang.srt.managers.scheduler.Scheduler.handle_dumper_control"
HOOK_RUN_BATCH = "sglang.srt.managers.scheduler.Scheduler.run_batch"
HOOK_ON_IDLE = "sglang.srt.managers.scheduler.Scheduler.on_idle"
#: The scheduler loop's phases between two forwards, timed as parts of a gap.
HOOK_GAP_PHASES = {
    "sglang.ingest_requests": "sglang.srt.managers.scheduler.Scheduler.ingest_requests",
    "sglang.get_next_batch_to_run":
        "sglang.srt.managers.scheduler.Scheduler.get_next_batch_to_run",
    "sglang.process_batch_result":
        "sglang.srt.managers.scheduler.Scheduler.process_batch_result",
}
#: The ASGI app SGLang's HTTP workers serve unless ``SGLANG_HTTP_SERVER_APP_PATH`` names another.
HTTP_APP_DEFAULT = "sglang.srt.entrypoints.http_server:app"


@dataclass(frozen=True)
class Internal:
    """One thing the plugin expects of SGLang.

    ``path`` is ``module:qualified.name``. ``params``: parameter names a callable must take,
    in this order (a prefix of its signature). ``fields``: names a class must have, as
    attributes, dataclass / NamedTuple fields or ``self.<name> =`` assignments in its source
    (instance attributes exist only once built). ``why``: what breaks without it."""

    path: str
    params: tuple[str, ...] = ()
    fields: tuple[str, ...] = ()
    why: str = ""


_SDPA = ("self", "query", "output", "k_cache", "v_cache", "req_to_token", "req_pool_indices",
         "seq_lens")
INTERNALS: tuple[Internal, ...] = (
    # Extension points and flags.
    Internal("sglang.srt.plugins.hook_registry:HookRegistry.register",
             ("target", "hook", "hook_type"), why="every hook"),
    Internal("sglang.srt.plugins.hook_registry:HookType", fields=("AROUND", "BEFORE")),
    Internal("sglang.srt.server_args:ServerArgs.add_cli_args", ("parser",),
             why="the --kvext-* flags"),
    Internal("sglang.srt.server_args:ServerArgs.from_cli_args", ("cls", "args"),
             why="validating the flags, selecting the tree backend"),
    Internal("sglang.srt.server_args:ServerArgs",
             fields=("radix_cache_backend", "enable_hierarchical_cache", "disable_radix_cache",
                     "enable_lmcache", "disable_cuda_graph", "tokenizer_worker_num",
                     "attention_backend", "pp_size", "quantization")),
    Internal("sglang.srt.mem_cache.registry:register_radix_cache_backend", ("name", "factory")),
    Internal("sglang.srt.mem_cache.registry:registered_radix_cache_backends"),
    Internal("sglang.srt.mem_cache.registry:TreeCacheBuildContext",
             fields=("server_args", "params", "tp_worker", "model_config", "tp_size", "tp_rank",
                     "is_hybrid_swa", "is_hybrid_ssm", "is_dsa"), why="building the tree"),
    Internal("sglang.srt.mem_cache.cache_init_params:CacheInitParams",
             fields=("page_size", "token_to_kv_pool_allocator", "disable", "is_eagle",
                     "enable_metrics", "tp_cache_group", "pp_rank", "pp_size")),
    Internal("sglang.srt.layers.attention.attention_registry:register_attention_backend",
             ("name",), why="--attention-backend kvext_cpu"),
    Internal("sglang.srt.arg_groups.choices:ATTENTION_BACKEND_CHOICES"),
    # The tree: RadixCache methods overridden or called, and their data.
    Internal("sglang.srt.mem_cache.radix_cache:RadixCache.evict", ("self", "params")),
    Internal("sglang.srt.mem_cache.radix_cache:RadixCache._delete_leaf", ("self", "node"),
             why="spilling each evicted leaf"),
    Internal("sglang.srt.mem_cache.radix_cache:RadixCache._update_leaf_status", ("self", "node")),
    Internal("sglang.srt.mem_cache.radix_cache:RadixCache.checkpoint", ("self", "req"),
             why="write-through and prefill timing"),
    Internal("sglang.srt.mem_cache.radix_cache:RadixCache.match_prefix", ("self", "params")),
    Internal("sglang.srt.mem_cache.radix_cache:RadixCache.supports_fast_match_prefix",
             ("self",)),
    Internal("sglang.srt.mem_cache.radix_cache:RadixCache.init_load_back", ("self", "params"),
             why="loading tier pages; None means 'keep the request waiting'"),
    Internal("sglang.srt.mem_cache.radix_cache:RadixCache.on_release", ("self", "req")),
    Internal("sglang.srt.mem_cache.radix_cache:RadixCache.release_aborted_request",
             ("self", "handle"), why="a waiting request dropped: its blend job and holds go"),
    Internal("sglang.srt.mem_cache.radix_cache:RadixCache.release_host_resources", ("self",)),
    Internal("sglang.srt.mem_cache.radix_cache:RadixCache.reset", ("self",)),
    Internal("sglang.srt.mem_cache.radix_cache:RadixCache.path_device_indices",
             ("self", "node")),
    Internal("sglang.srt.mem_cache.radix_cache:RadixCache.take_events", ("self",),
             why="tier events published with the device tree's (--kv-events-config)"),
    Internal("sglang.srt.disaggregation.kv_events:BlockStored",
             fields=("block_hashes", "parent_block_hash", "token_ids", "block_size", "lora_id",
                     "medium")),
    Internal("sglang.srt.disaggregation.kv_events:BlockRemoved",
             fields=("block_hashes", "medium")),
    Internal("sglang.srt.mem_cache.radix_cache:RadixCache.inc_lock_ref", ("self", "node")),
    Internal("sglang.srt.mem_cache.radix_cache:RadixCache.dec_lock_ref", ("self", "node")),
    Internal("sglang.srt.mem_cache.radix_cache:RadixCache",
             fields=("root_node", "page_size", "disable", "token_to_kv_pool_allocator",
                     "evictable_size_", "kv_events")),
    Internal("sglang.srt.mem_cache.radix_cache:RadixKey.raw_token_ids", ("self",)),
    Internal("sglang.srt.mem_cache.radix_cache:RadixKey.page_aligned", ("self", "page_size")),
    Internal("sglang.srt.mem_cache.radix_cache:RadixKey.child_key", ("self", "page_size")),
    Internal("sglang.srt.mem_cache.radix_cache:RadixKey.match", ("self", "other", "page_size"),
             why="the read-only device match of /kvext/lookup"),
    Internal("sglang.srt.mem_cache.radix_cache:RadixKey", fields=("extra_key", "cache_salt")),
    Internal("sglang.srt.mem_cache.radix_cache:TreeNode",
             fields=("key", "value", "parent", "children", "priority")),
    Internal("sglang.srt.mem_cache.base_prefix_cache:MatchResult",
             fields=("device_prefix_len", "last_device_node", "host_hit_length"),
             why="reporting a tier hit as host_hit_length"),
    Internal("sglang.srt.mem_cache.base_prefix_cache:InitLoadBackParams",
             fields=("best_match_node", "host_hit_length", "req")),
    Internal("sglang.srt.mem_cache.base_prefix_cache:MatchPrefixParams", fields=("key", "req")),
    Internal("sglang.srt.mem_cache.base_prefix_cache:EvictParams", fields=("num_tokens",)),
    Internal("sglang.srt.managers.schedule_batch:Req",
             fields=("rid", "extra_key", "origin_input_ids", "sampling_params", "prefix_len",
                     "last_node", "time_stats", "cache_request_handle", "customized_info"),
             why="per-request options, the blend report (customized_info -> meta_info)"),
    # Hooked scheduler / tokenizer-manager methods.
    Internal("sglang.srt.managers.scheduler:Scheduler._create_generation_req",
             ("self", "recv_req"), why="fragment options and the blend namespace per request"),
    Internal("sglang.srt.managers.scheduler:Scheduler.handle_dumper_control",
             ("self", "recv_req"), why="the /kvext routes' channel to the scheduler"),
    Internal("sglang.srt.managers.scheduler:Scheduler.run_batch", ("self", "batch"),
             why="timing forwards and the gaps between them (/kvext/scheduler)"),
    Internal("sglang.srt.managers.scheduler:Scheduler.ingest_requests", ("self",),
             why="the gap report's parts (/kvext/scheduler)"),
    Internal("sglang.srt.managers.scheduler:Scheduler.get_next_batch_to_run",
             ("self", "running_batch", "last_batch"),
             why="the gap report's parts (/kvext/scheduler)"),
    Internal("sglang.srt.managers.scheduler:Scheduler.process_batch_result",
             ("self", "batch", "result"), why="the gap report's parts (/kvext/scheduler)"),
    Internal("sglang.srt.managers.scheduler:Scheduler", fields=("_sched_idled", "tree_cache"),
             why="a gap after an idle loop is not a stall; the idle wait for a blend"),
    Internal("sglang.srt.managers.scheduler:Scheduler.on_idle", ("self",),
             why="a pass with nothing to run waits for the running blend (blend_jobs.py)"),
    Internal("sglang.srt.managers.tokenizer_manager:TokenizerManager._create_tokenized_object",
             ("self", "obj", "input_text", "input_ids"),
             why="HTTP 400 for bad fragment options; kvext_chunks become spans there"),
    Internal("sglang.srt.managers.tokenizer_manager:TokenizerManager.dumper_control",
             ("self", "obj")),
    Internal("sglang.srt.managers.tokenizer_manager:TokenizerManager", fields=("tokenizer",),
             why="pre-warm texts are tokenized there, never on the scheduler thread"),
    Internal("sglang.srt.managers.io_struct:DumperControlReqInput", fields=("method", "body")),
    Internal("sglang.srt.managers.io_struct:DumperControlReqOutput",
             fields=("success", "response", "error")),
    Internal("sglang.srt.entrypoints.http_server:app"),
    Internal("sglang.srt.utils.auth:auth_level", ("level",),
             why="the /kvext routes gated at SGLang's admin level"),
    Internal("sglang.srt.utils.auth:AuthLevel", fields=("ADMIN_OPTIONAL",)),
    Internal("sglang.srt.entrypoints.http_server:get_global_state"),
    # The CPU attention backend overrides these with the same 14 parameters.
    Internal("sglang.srt.layers.attention.torch_native_backend:"
             "TorchNativeAttnBackend._run_sdpa_forward_extend",
             (*_SDPA, "extend_prefix_lens", "extend_seq_lens", "encoder_lens", "scaling",
              "enable_gqa", "causal", "is_cross_attn", "sliding_window_size")),
    Internal("sglang.srt.layers.attention.torch_native_backend:"
             "TorchNativeAttnBackend._run_sdpa_forward_decode",
             (*_SDPA, "encoder_lens", "scaling", "enable_gqa", "causal", "is_cross_attn",
              "sliding_window_size")),
    # The KV pool the tiers copy from and into.
    Internal("sglang.srt.mem_cache.memory_pool:MHATokenToKVPool",
             fields=("k_buffer", "v_buffer", "store_dtype", "dtype")),
    # The Llama layout the blend drives layer by layer (model_ops.LlamaLayerOps).
    Internal("sglang.srt.models.llama:LlamaForCausalLM", fields=("model", "lm_head")),
    Internal("sglang.srt.models.llama:LlamaModel",
             fields=("layers", "embed_tokens", "norm", "start_layer", "end_layer")),
    Internal("sglang.srt.models.llama:LlamaDecoderLayer",
             fields=("self_attn", "mlp", "input_layernorm", "post_attention_layernorm")),
    Internal("sglang.srt.models.llama:LlamaAttention",
             fields=("qkv_proj", "o_proj", "rotary_emb", "num_heads", "num_kv_heads",
                     "head_dim", "scaling", "q_size", "kv_size")),
    # Loading the model in-process (the offline blend benchmark and tests).
    Internal("sglang.srt.server_args:ServerArgs", fields=("model_path", "device", "dtype",
                                                         "tp_size")),
    Internal("sglang.srt.runtime_context:publish", ("server_args",)),
    Internal("sglang.srt.runtime_context:SpawnRanks", fields=("world_rank", "gpu_id")),
    Internal("sglang.srt.distributed.bootstrap:init_parallel_runtime"),
    Internal("sglang.srt.distributed.bootstrap:init_layer_runtime"),
    Internal("sglang.srt.configs.model_config:ModelConfig.from_server_args", ("server_args",)),
    Internal("sglang.srt.configs.model_config:ModelConfig", fields=("context_len", "hf_config"),
             why="the longest pre-warm text; the model's RoPE"),
    Internal("sglang.srt.model_loader:get_model"),
    Internal("sglang.srt.configs.load_config:LoadConfig"),
    Internal("sglang.srt.configs.device_config:DeviceConfig"),
)


def find(path: str) -> Any:
    """The object at ``module:qualified.name`` (ImportError / AttributeError when absent)."""
    module, _, name = path.partition(":")
    obj: Any = importlib.import_module(module)
    for part in name.split(".") if name else ():
        obj = getattr(obj, part)
    return obj


def _has_field(cls: type, name: str) -> bool:
    if hasattr(cls, name) or name in getattr(cls, "__dataclass_fields__", {}) or \
            name in getattr(cls, "_fields", ()) or name in getattr(cls, "__annotations__", {}):
        return True
    for klass in cls.__mro__:
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        if re.search(rf"self\.{re.escape(name)}\s*[=:,]", source):
            return True
    return False


def _check(item: Internal) -> list[str]:
    try:
        obj = find(item.path)
    except (ImportError, AttributeError) as exc:
        return [f"{item.path}: missing ({exc})"]
    found = []
    if item.params:
        try:
            names = list(inspect.signature(obj).parameters)
        except (TypeError, ValueError):
            names = []
        if item.params[0] == "cls" and names[:1] != ["cls"]:
            names = ["cls", *names]           # a bound classmethod hides its first parameter
        if names[:len(item.params)] != list(item.params):
            found.append(f"{item.path}: parameters {names[:len(item.params) + 2]}, expected "
                         f"{list(item.params)}")
    missing = [f for f in item.fields if not _has_field(obj, f)] \
        if isinstance(obj, type) else []
    if missing:
        found.append(f"{item.path}: no {', '.join(missing)}")
    return found


def problems(internals: tuple[Internal, ...] = INTERNALS) -> list[str]:
    """One line per expectation the installed SGLang does not meet (empty: all met)."""
    return [line for item in internals for line in _check(item)]


# Lazy imports: the modules below are heavy or import-order sensitive in some processes.
def attention_registry() -> tuple[list[str], Any]:
    """(``ATTENTION_BACKEND_CHOICES``, ``register_attention_backend``)."""
    return (find("sglang.srt.arg_groups.choices:ATTENTION_BACKEND_CHOICES"),
            find("sglang.srt.layers.attention.attention_registry:register_attention_backend"))


def auth_level_admin() -> Any:
    """SGLang's ``@auth_level(AuthLevel.ADMIN_OPTIONAL)``: with ``--admin-api-key`` only that
    key opens the route, else ``--api-key`` does, else it is open (its control routes')."""
    level = find("sglang.srt.utils.auth:AuthLevel")
    return find("sglang.srt.utils.auth:auth_level")(level.ADMIN_OPTIONAL)


def control_messages() -> tuple[type, type]:
    """(``DumperControlReqInput``, ``DumperControlReqOutput``)."""
    return (find("sglang.srt.managers.io_struct:DumperControlReqInput"),
            find("sglang.srt.managers.io_struct:DumperControlReqOutput"))


def http_server() -> Any:
    """SGLang's HTTP server module (its ``app`` and ``get_global_state``)."""
    return importlib.import_module("sglang.srt.entrypoints.http_server")
