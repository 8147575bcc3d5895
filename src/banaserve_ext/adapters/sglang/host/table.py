# SPDX-License-Identifier: Apache-2.0
"""Every SGLang internal the adapters use, grouped by the feature that needs it.

This is the list of what banaserve depends on inside SGLang (tested with 0.5.23). Feature code
reaches SGLang's modules, classes and functions only through :func:`..host.ns` (by the short
names below), hooks only the targets marked ``hook=True`` here, and reads or writes only the
instance attributes listed here. :mod:`.probe` checks each entry at plug-in load in every SGLang
process for the features that server selected; ``banaserve sglang probe`` prints the table.
"""

from __future__ import annotations

from .probe import MEMBER, MODULE, OBJECT, SOURCE, Internal

_S = "sglang.srt."
SCHED = _S + "managers.scheduler.Scheduler"
REQ = _S + "managers.schedule_batch.Req"
BATCH = _S + "managers.schedule_batch.ScheduleBatch"
ALLOC = _S + "mem_cache.allocator.base.BaseTokenToKVPoolAllocator"
PAGED = _S + "mem_cache.allocator.paged.PagedTokenToKVPoolAllocator"
POOL = _S + "mem_cache.memory_pool.MHATokenToKVPool"
REQ_POOL = _S + "mem_cache.memory_pool.ReqToTokenPool"
WORKER = _S + "managers.tp_worker.TpModelWorker"
RUNNER = _S + "model_executor.model_runner.ModelRunner"
FWD = _S + "model_executor.forward_batch_info."
COMMON = _S + "disaggregation.common.conn."
MGR = COMMON + "CommonKVManager"
KVARGS = _S + "disaggregation.base.conn.KVArgs"
LLAMA = _S + "models.llama."
KVINFO = _S + "managers.schedule_batch.ReqKvInfo"
HOST_POOL = _S + "mem_cache.pool_host.mha.MHATokenToKVPoolHost"
SLEEPER = _S + "managers.scheduler_components.idle_sleeper.IdleSleeper"


def O(path: str, *params: str, hook: bool = False, optional: bool = False,  # noqa: E743
      use: str = "") -> Internal:  # fmt: skip
    return Internal(path, OBJECT, params=params, hook=hook, optional=optional, use=use)


def M(cls: str, attr: str, use: str = "read", optional: bool = False) -> Internal:
    return Internal(cls, MEMBER, attr=attr, use=use, optional=optional)


#: feature -> {short name: internal}. Short names are what feature code asks :func:`ns` for.
INTERNALS: dict[str, dict[str, Internal]] = {
    # -- the plug-in machinery itself (needed by every feature that hooks) ----------------------
    "plugin": {
        "HookRegistry": O(_S + "plugins.hook_registry.HookRegistry", use="register hooks"),
        "HookRegistry.register": O(
            _S + "plugins.hook_registry.HookRegistry.register", "target", "hook", "hook_type"
        ),  # fmt: skip
        "HookType": O(_S + "plugins.hook_registry.HookType"),
        "HookType.AROUND": O(_S + "plugins.hook_registry.HookType.AROUND"),
        "HookType.BEFORE": O(_S + "plugins.hook_registry.HookType.BEFORE"),
        "ServerArgs": O(_S + "server_args.ServerArgs", use="read the server's arguments"),
    },
    # -- --disaggregation-transfer-backend banaserve (conn.py, plugin.py) ------------------------
    "pd": {
        "choices": O(_S + "arg_groups.choices.DISAGG_TRANSFER_BACKEND_CHOICES", use="read"),
        "add_choices": O(
            _S + "arg_groups.choices.add_disagg_transfer_backend_choices",
            use="add 'banaserve' to the CLI choices",
        ),  # fmt: skip
        "TransferBackend": O(
            _S + "disaggregation.utils.TransferBackend", use="add the BANASERVE member"
        ),  # fmt: skip
        "KVClassType": O(_S + "disaggregation.utils.KVClassType"),
        "KVClassType.MANAGER": O(_S + "disaggregation.utils.KVClassType.MANAGER"),
        "KVClassType.SENDER": O(_S + "disaggregation.utils.KVClassType.SENDER"),
        "KVClassType.RECEIVER": O(_S + "disaggregation.utils.KVClassType.RECEIVER"),
        "KVClassType.BOOTSTRAP_SERVER": O(_S + "disaggregation.utils.KVClassType.BOOTSTRAP_SERVER"),
        "KVClassType.KVARGS": O(_S + "disaggregation.utils.KVClassType.KVARGS"),
        "get_kv_class": O(
            _S + "disaggregation.utils.get_kv_class", "transfer_backend", "class_type", hook=True
        ),  # fmt: skip
        "DisaggregationMode": O(_S + "disaggregation.utils.DisaggregationMode"),
        "DisaggregationMode.PREFILL": O(_S + "disaggregation.utils.DisaggregationMode.PREFILL"),
        "DisaggregationMode.DECODE": O(_S + "disaggregation.utils.DisaggregationMode.DECODE"),
        "KVArgs": O(KVARGS),
        "KVPoll": O(_S + "disaggregation.base.conn.KVPoll"),
        "KVPoll.Failed": O(_S + "disaggregation.base.conn.KVPoll.Failed"),
        "KVPoll.Success": O(_S + "disaggregation.base.conn.KVPoll.Success"),
        "KVPoll.WaitingForInput": O(_S + "disaggregation.base.conn.KVPoll.WaitingForInput"),
        "ABORT_TAG": O(COMMON + "ABORT_TAG"),
        "ABORT_ACK_TAG": O(COMMON + "ABORT_ACK_TAG"),
        "AbortNotification": O(COMMON + "AbortNotification"),
        "AbortNotification.from_zmq": O(COMMON + "AbortNotification.from_zmq"),
        "CommonKVManager": O(
            MGR, "args", "disaggregation_mode", "server_args", "is_mla_backend", use="subclassed"
        ),  # fmt: skip
        "CommonKVSender": O(COMMON + "CommonKVSender", use="subclassed"),
        "CommonKVReceiver": O(COMMON + "CommonKVReceiver", use="subclassed"),
        "CommonKVBootstrapServer": O(COMMON + "CommonKVBootstrapServer", use="subclassed"),
        "prefill.supports_host_tensor_indices": Internal(
            _S + "disaggregation.prefill",
            SOURCE,
            attr="supports_host_tensor_indices",
            use="set False on our sender",
        ),  # fmt: skip
        "kv_status_msg_tag": O(MGR + ".kv_status_msg_tag", use="overridden"),
        "kv_status_msg_carries_reason": O(
            MGR + ".kv_status_msg_carries_reason", use="overridden"
        ),  # fmt: skip
        "reports_transfer_latency": O(MGR + ".reports_transfer_latency", use="overridden"),
        "sender_trace_module": O(MGR + ".sender_trace_module", use="overridden"),
        "build_receiver_registration_message": O(
            MGR + ".build_receiver_registration_message", use="overridden"
        ),  # fmt: skip
        "build_receiver_metadata_message": O(
            MGR + ".build_receiver_metadata_message",
            "bootstrap_room",
            "required_dst_info_num",
            "kv_indices",
            "aux_index",
            "state_indices",
            "decode_prefix_len",
            "is_dummy",
            use="overridden",
        ),  # fmt: skip
        "add_transfer_request": Internal(
            COMMON + "CommonKVSender",
            SOURCE,
            attr="add_transfer_request",
            use="ours; SGLang's sender calls it",
        ),  # fmt: skip
        "teardown": O(MGR + ".teardown", use="overridden"),
        "supports_role_switch": O(
            _S + "disaggregation.base.conn.BaseKVManager.supports_role_switch",
            use="overridden: True (SGLang's runtime P<->D role switch)",
        ),  # fmt: skip
        "Scheduler.process_decode_queue": O(SCHED + ".process_decode_queue", hook=True),
        "sched.enable_hierarchical_cache": M(SCHED, "enable_hierarchical_cache"),
        "sched.enable_decode_hicache": M(SCHED, "enable_decode_hicache"),
        "sched.tree_cache": M(SCHED, "tree_cache"),
        "check_hicache_events": O(
            _S + "mem_cache.base_prefix_cache.BasePrefixCache.check_hicache_events", use="called"
        ),  # fmt: skip
        "mgr._heartbeat_shutdown": M(MGR, "_heartbeat_shutdown", "set at teardown (decode side)"),
        "mgr._socket_cache": M(MGR, "_socket_cache", "closed at teardown"),
        "mgr._socket_lock": M(MGR, "_socket_lock", "held at teardown"),
        "mgr._zmq_ctx": M(MGR, "_zmq_ctx", "destroyed at teardown"),
        "_make_worker_recv": O(MGR + "._make_worker_recv", use="called"),
        "handle_abort_ack_message": O(MGR + ".handle_abort_ack_message", use="called"),
        "parse_kv_status_message": O(MGR + ".parse_kv_status_message", use="called"),
        "apply_prefill_status": O(
            MGR + ".apply_prefill_status",
            "bootstrap_room",
            "status",
            "prefill_rank",
            "failure_reason",
            use="called",
        ),  # fmt: skip
        "update_status": O(MGR + ".update_status", use="called"),
        "check_status": O(MGR + ".check_status", use="called"),
        "record_failure": O(MGR + ".record_failure", use="called"),
        "conclude_transfer": O(
            MGR + ".conclude_transfer", "bootstrap_room", "status", use="called"
        ),  # fmt: skip
        "conclude_failure": O(
            MGR + ".conclude_failure", "bootstrap_room", "failure_reason", use="called"
        ),  # fmt: skip
        "check_peer_aux_buffer_count": O(MGR + ".check_peer_aux_buffer_count", use="called"),
        "_send_multipart_locked": O(MGR + "._send_multipart_locked", use="called"),
        "_start_heartbeat_checker_thread": O(
            MGR + "._start_heartbeat_checker_thread", use="called"
        ),  # fmt: skip
        "mgr.local_ip": M(MGR, "local_ip"),
        "mgr.rank_port": M(MGR, "rank_port"),
        "mgr.server_socket": M(MGR, "server_socket"),
        "mgr.transfer_infos": M(MGR, "transfer_infos", "read, write"),
        "mgr.request_status": M(MGR, "request_status"),
        "mgr.req_to_decode_prefix_len": M(MGR, "req_to_decode_prefix_len", "write"),
        "mgr.attn_tp_size": M(MGR, "attn_tp_size"),
        "mgr.kv_args": M(MGR, "kv_args"),
        "mgr.disaggregation_mode": M(MGR, "disaggregation_mode"),
        "KVArgs.kv_data_ptrs": M(KVARGS, "kv_data_ptrs"),
        "KVArgs.kv_data_lens": M(KVARGS, "kv_data_lens"),
        "KVArgs.kv_item_lens": M(KVARGS, "kv_item_lens"),
        "KVArgs.aux_data_ptrs": M(KVARGS, "aux_data_ptrs"),
        "KVArgs.aux_data_lens": M(KVARGS, "aux_data_lens"),
        "KVArgs.aux_item_lens": M(KVARGS, "aux_item_lens"),
        "KVArgs.engine_rank": M(KVARGS, "engine_rank"),
        "KVArgs.page_size": M(KVARGS, "page_size"),
    },
    # -- layer-wise KV overlap inside the prefill forward (layerwise.py) -------------------------
    "layerwise": {
        "Scheduler.run_batch": O(SCHED + ".run_batch", "batch", hook=True),
        "RadixAttention": O(
            _S + "layers.radix_attention.RadixAttention", use="forward hooks on its modules"
        ),  # fmt: skip
        "RadixAttention.layer_id": M(_S + "layers.radix_attention.RadixAttention", "layer_id"),
        "sched.tp_worker": M(SCHED, "tp_worker"),
        "sched.token_to_kv_pool_allocator": M(SCHED, "token_to_kv_pool_allocator"),
        "sched.req_to_token_pool": M(SCHED, "req_to_token_pool"),
        "sched.disaggregation_mode": M(SCHED, "disaggregation_mode"),
        "worker.model_runner": M(WORKER, "model_runner"),
        "runner.model": M(RUNNER, "model"),
        "runner.token_to_kv_pool": M(RUNNER, "token_to_kv_pool"),
        "pool.k_buffer": M(POOL, "k_buffer"),
        "pool.v_buffer": M(POOL, "v_buffer"),
        "pool.start_layer": M(POOL, "start_layer"),
        "alloc.page_size": M(ALLOC, "page_size"),
        "alloc.translate_kv_indices_for_transfer": Internal(
            ALLOC + ".translate_kv_indices_for_transfer", OBJECT, optional=True, use="called"
        ),
        "req_pool.req_to_token": M(REQ_POOL, "req_to_token"),
        "batch.reqs": M(BATCH, "reqs"),
        "batch.forward_mode": M(BATCH, "forward_mode"),
        "ForwardMode.is_extend": O(FWD + "ForwardMode.is_extend"),
        "ForwardMode.is_prebuilt": O(FWD + "ForwardMode.is_prebuilt"),
        "req.disagg_kv_sender": M(REQ, "disagg_kv_sender"),
        "req.pending_bootstrap": M(REQ, "pending_bootstrap"),
        "req.extend_end": M(REQ, "extend_end"),
        "req.prefix_len": M(REQ, "prefix_len"),
        "req.origin_input_ids": M(REQ, "origin_input_ids"),
        "req.kv": M(REQ, "kv"),
        "req.bootstrap_room": M(REQ, "bootstrap_room"),
        "req.disagg_decode_prefix_len": M(REQ, "disagg_decode_prefix_len"),
        "sender.kv_mgr": M(COMMON + "CommonKVSender", "kv_mgr"),
        "req.kv.req_pool_idx": M(KVINFO, "req_pool_idx"),
    },
    # -- POST /banaserve/migrate and its scheduler-side channel (admin.py) -----------------------
    "admin": {
        "Scheduler.ingest_requests": O(SCHED + ".ingest_requests", hook=True),
        "http_server.app": Internal(
            _S + "entrypoints.http_server.app", OBJECT, where="launcher", use="add a route"
        ),  # fmt: skip
        "sched.server_args": M(SCHED, "server_args"),
        "ServerArgs.port": M(_S + "server_args.ServerArgs", "port"),
        "sched.enable_overlap": M(SCHED, "enable_overlap"),
        "sched.tp_size": M(SCHED, "tp_size"),
        # --sleep-on-idle: an admin job wakes the idle scheduler (without them: within 1 s)
        "sched.idle_sleeper": M(SCHED, "idle_sleeper", optional=True),
        "IdleSleeper.poller": M(SLEEPER, "poller", "register a wake-up pipe", optional=True),
        "sched.running_batch": M(SCHED, "running_batch"),
        "sched.last_batch": M(SCHED, "last_batch"),
        "sched.chunked_req": M(SCHED, "chunked_req"),
        "sched.token_to_kv_pool_allocator": M(SCHED, "token_to_kv_pool_allocator"),
        "sched.max_total_num_tokens": M(SCHED, "max_total_num_tokens"),
        "alloc.available_size": O(ALLOC + ".available_size"),
        "batch.reqs": M(BATCH, "reqs"),
        "Req.finished": O(REQ + ".finished"),
        "req.rid": M(REQ, "rid"),
        "req.kv": M(REQ, "kv"),
        "req.origin_input_ids": M(REQ, "origin_input_ids"),
        "req.output_ids": M(REQ, "output_ids"),
        "req.kv.req_pool_idx": M(KVINFO, "req_pool_idx"),
        "req.kv.kv_committed_len": M(KVINFO, "kv_committed_len"),
    },
    # -- scheduler load signals for the live controller (signals.py) -----------------------------
    "signals": {
        "Scheduler.run_batch": O(SCHED + ".run_batch", "batch", hook=True),
        "Scheduler.process_batch_result": O(
            SCHED + ".process_batch_result", "batch", "result", hook=True
        ),  # fmt: skip
        "RadixAttention.forward": O(
            _S + "layers.radix_attention.RadixAttention.forward", "forward_batch", hook=True
        ),  # fmt: skip
        "ScheduleBatch.retract_decode": O(BATCH + ".retract_decode", hook=True),
        "batch.forward_mode": M(BATCH, "forward_mode"),
        "batch.reqs": M(BATCH, "reqs"),
        "batch.extend_num_tokens": M(BATCH, "extend_num_tokens"),
        "req.inflight_middle_chunks": M(REQ, "inflight_middle_chunks"),
        "sched.waiting_queue": M(SCHED, "waiting_queue"),
        "sched.running_batch": M(SCHED, "running_batch"),
        "sched.token_to_kv_pool_allocator": M(SCHED, "token_to_kv_pool_allocator"),
        "alloc.available_size": O(ALLOC + ".available_size"),
        "sched.max_total_num_tokens": M(SCHED, "max_total_num_tokens"),
        "sched.tree_cache": M(SCHED, "tree_cache"),
        "sched.is_fully_idle": O(SCHED + ".is_fully_idle", use="called"),
        "sched.disaggregation_mode": M(SCHED, "disaggregation_mode"),
        "sched.disagg_prefill_bootstrap_queue": M(SCHED, "disagg_prefill_bootstrap_queue"),
        "sched.disagg_prefill_inflight_queue": M(SCHED, "disagg_prefill_inflight_queue"),
        "sched.disagg_decode_prealloc_queue": M(SCHED, "disagg_decode_prealloc_queue"),
        "sched.disagg_decode_transfer_queue": M(SCHED, "disagg_decode_transfer_queue"),
        "prealloc.retracted_queue": M(
            _S + "disaggregation.decode.DecodePreallocQueue", "retracted_queue"
        ),  # fmt: skip
    },
    # -- attention-level KV migration (kv_migration.py) -------------------------------------------
    "kv_migration": {
        "TorchNativeAttnBackend.forward_decode": O(
            _S + "layers.attention.torch_native_backend.TorchNativeAttnBackend.forward_decode",
            "q",
            "k",
            "v",
            "layer",
            "forward_batch",
            hook=True,
        ),  # fmt: skip
        "BasePrefixCache.free_kv_row": O(
            _S + "mem_cache.base_prefix_cache.BasePrefixCache.free_kv_row", hook=True
        ),
        "release_kv_cache": O(
            _S + "mem_cache.common.release_kv_cache", "req", "tree_cache", "checkpoint", hook=True
        ),  # fmt: skip
        "Scheduler.process_batch_result": O(
            SCHED + ".process_batch_result", "batch", hook=True
        ),  # fmt: skip
        # retraction of a split request on a PD decode server: its backup is completed from the
        # peer (``KvMigration.around_backup_kv_cache``) or, failing that, dropped (SGLang aborts)
        "backup_kv_cache": O(
            _S + "mem_cache.common.backup_kv_cache",
            "req",
            "tree_cache",
            "req_to_token_pool",
            "token_to_kv_pool_allocator",
            "backend",
            hook=True,
        ),  # fmt: skip
        "ScheduleBatch.retract_decode": O(BATCH + ".retract_decode", hook=True),
        "discard_kv_cache_backup": O(
            _S + "mem_cache.common.discard_kv_cache_backup",
            "req",
            "tree_cache",
            "backend",
            use="called",
        ),  # fmt: skip
        "req.kv.retraction_backup": M(KVINFO, "retraction_backup"),
        "RetractionBackup.cpu_tensors": O(_S + "mem_cache.common.RetractionBackup.cpu_tensors"),
        "RetractionBackup.host_indices": O(_S + "mem_cache.common.RetractionBackup.host_indices"),
        "pool.cpu_offloading_chunk_size": M(POOL, "cpu_offloading_chunk_size"),
        "tree.cache_controller": M(
            _S + "mem_cache.unified_radix_cache.UnifiedRadixCache", "cache_controller"
        ),  # fmt: skip
        "ctrl.storage_host_pool": M(
            _S + "mem_cache.hybrid_cache.hybrid_cache_controller.HybridCacheController",
            "storage_host_pool",
        ),  # fmt: skip
        "host_pool.set_from_flat_data_page": O(
            HOST_POOL + ".set_from_flat_data_page", "index", "data_page", use="called"
        ),  # fmt: skip
        "host_pool.layer_num": M(HOST_POOL, "layer_num"),
        "host_pool.page_size": M(HOST_POOL, "page_size"),
        "sched.server_args": M(SCHED, "server_args"),
        "sched.token_to_kv_pool_allocator": M(SCHED, "token_to_kv_pool_allocator"),
        "sched.req_to_token_pool": M(SCHED, "req_to_token_pool"),
        "batch.reqs": M(BATCH, "reqs"),
        "Req.finished": O(REQ + ".finished"),
        "req.kv": M(REQ, "kv"),
        "req.kv.req_pool_idx": M(KVINFO, "req_pool_idx"),
        "req.kv.kv_committed_len": M(KVINFO, "kv_committed_len"),
        "FINISH_ABORT": O(
            _S + "managers.schedule_batch.FINISH_ABORT", "message", "status_code", "err_type"
        ),  # fmt: skip
        "ServerArgs.attention_backend": M(_S + "server_args.ServerArgs", "attention_backend"),
        "ServerArgs.disable_radix_cache": M(_S + "server_args.ServerArgs", "disable_radix_cache"),
        "ServerArgs.enable_mixed_chunk": M(_S + "server_args.ServerArgs", "enable_mixed_chunk"),
        "ServerArgs.speculative_algorithm": M(
            _S + "server_args.ServerArgs", "speculative_algorithm"
        ),  # fmt: skip
        "alloc.page_size": M(ALLOC, "page_size"),
        "alloc.get_kvcache": O(ALLOC + ".get_kvcache"),
        "alloc.available_size": O(ALLOC + ".available_size"),
        "alloc.alloc": O(ALLOC + ".alloc"),
        "alloc.free": O(ALLOC + ".free"),
        "pool.layer_num": M(POOL, "layer_num"),
        "pool.start_layer": M(POOL, "start_layer"),
        "pool.get_key_buffer": O(POOL + ".get_key_buffer"),
        "pool.get_value_buffer": O(POOL + ".get_value_buffer"),
        "req_pool.req_to_token": M(REQ_POOL, "req_to_token"),
        "req.to_finish": M(REQ, "to_finish", "write"),
        "req.kv.cache_protected_len": M(KVINFO, "cache_protected_len"),
        "fb.req_pool_indices": M(FWD + "ForwardBatch", "req_pool_indices"),
        "fb.seq_lens": M(FWD + "ForwardBatch", "seq_lens"),
        "backend.token_to_kv_pool": M(
            _S + "layers.attention.torch_native_backend.TorchNativeAttnBackend", "token_to_kv_pool"
        ),  # fmt: skip
        "backend.req_to_token_pool": M(
            _S + "layers.attention.torch_native_backend.TorchNativeAttnBackend", "req_to_token_pool"
        ),  # fmt: skip
        "layer.tp_q_head_num": M(_S + "layers.radix_attention.RadixAttention", "tp_q_head_num"),
        "layer.qk_head_dim": M(_S + "layers.radix_attention.RadixAttention", "qk_head_dim"),
        "layer.v_head_dim": M(_S + "layers.radix_attention.RadixAttention", "v_head_dim"),
        "layer.layer_id": M(_S + "layers.radix_attention.RadixAttention", "layer_id"),
        "layer.scaling": M(_S + "layers.radix_attention.RadixAttention", "scaling"),
    },
    # -- layer-level weight migration (layer_migration.py) ---------------------------------------
    "layer_migration": {
        "LlamaModel": O(LLAMA + "LlamaModel"),
        "LlamaForCausalLM.model": M(LLAMA + "LlamaForCausalLM", "model"),
        "LlamaModel.forward": O(
            LLAMA + "LlamaModel.forward",
            "input_ids",
            "positions",
            "forward_batch",
            "input_embeds",
            hook=True,
        ),  # fmt: skip
        "Scheduler.run_batch": O(SCHED + ".run_batch", "batch", hook=True),
        "residual.access.final_norm_pair": O(
            _S + "layers.layer_boundary.residual.access.final_norm_pair"
        ),
        "residual.batch.start": O(_S + "layers.layer_boundary.residual.batch.start"),
        "residual.batch.to_pp": O(_S + "layers.layer_boundary.residual.batch.to_pp"),
        "PPProxyTensors": O(FWD + "PPProxyTensors"),
        "llama.layers": M(LLAMA + "LlamaModel", "layers"),
        "llama.start_layer": M(LLAMA + "LlamaModel", "start_layer"),
        "llama.end_layer": M(LLAMA + "LlamaModel", "end_layer"),
        "llama.embed_tokens": M(LLAMA + "LlamaModel", "embed_tokens"),
        "llama.norm": M(LLAMA + "LlamaModel", "norm"),
        "decoder.self_attn": M(LLAMA + "LlamaDecoderLayer", "self_attn"),
        "decoder.input_layernorm": M(LLAMA + "LlamaDecoderLayer", "input_layernorm"),
        "decoder.attn_boundary": M(LLAMA + "LlamaDecoderLayer", "attn_boundary"),
        "attn.num_heads": M(LLAMA + "LlamaAttention", "num_heads"),
        "attn.num_kv_heads": M(LLAMA + "LlamaAttention", "num_kv_heads"),
        "attn.head_dim": M(LLAMA + "LlamaAttention", "head_dim"),
        "attn.rotary_emb": M(LLAMA + "LlamaAttention", "rotary_emb"),
        "rope.rotary_dim": M(_S + "layers.rotary_embedding.RotaryEmbedding", "rotary_dim"),
        "rope.is_neox_style": M(_S + "layers.rotary_embedding.RotaryEmbedding", "is_neox_style"),
        "rope.cos_sin_cache": M(_S + "layers.rotary_embedding.RotaryEmbedding", "cos_sin_cache"),
        "rmsnorm.variance_epsilon": M(_S + "layers.layernorm.RMSNorm", "variance_epsilon"),
        "sched.tp_worker": M(SCHED, "tp_worker"),
        "sched.token_to_kv_pool_allocator": M(SCHED, "token_to_kv_pool_allocator"),
        "worker.model_runner": M(WORKER, "model_runner"),
        "runner.model": M(RUNNER, "model"),
        "runner.token_to_kv_pool": M(RUNNER, "token_to_kv_pool"),
        "runner.req_to_token_pool": M(RUNNER, "req_to_token_pool"),
        "pool.k_buffer": M(POOL, "k_buffer", "read, replace"),
        "pool.v_buffer": M(POOL, "v_buffer", "read, replace"),
        "pool._init_data_ptrs_and_strides": Internal(
            POOL + "._init_data_ptrs_and_strides", OBJECT, optional=True, use="called"
        ),
        "paged.free_pages": M(PAGED, "free_pages"),
        "paged.release_pages": M(PAGED, "release_pages"),
        "alloc.page_size": M(ALLOC, "page_size"),
        "req_pool.req_to_token": M(REQ_POOL, "req_to_token"),
        "batch.reqs": M(BATCH, "reqs"),
        "Req.finished": O(REQ + ".finished"),
        "Req.set_finish_with_abort": O(
            REQ + ".set_finish_with_abort", "status_code", "err_type"
        ),  # fmt: skip
        "LlamaDecoderLayer.forward": O(
            LLAMA + "LlamaDecoderLayer.forward", "positions", "hidden_states", "forward_batch"
        ),  # fmt: skip
        "fb.forward_mode": M(FWD + "ForwardBatch", "forward_mode"),
        # refusals (layer_migration.py: blocked, keep_local)
        "sched.server_args": M(SCHED, "server_args"),
        "ServerArgs.enable_hierarchical_cache": M(
            _S + "server_args.ServerArgs", "enable_hierarchical_cache"
        ),
        "sched.disaggregation_mode": M(SCHED, "disaggregation_mode"),
        "fb.extend_prefix_lens": M(FWD + "ForwardBatch", "extend_prefix_lens"),
        "fb.seq_lens": M(FWD + "ForwardBatch", "seq_lens"),
        "fb.out_cache_loc": M(FWD + "ForwardBatch", "out_cache_loc"),
        "fb.req_pool_indices": M(FWD + "ForwardBatch", "req_pool_indices"),
        "ForwardMode.is_decode": O(FWD + "ForwardMode.is_decode"),
        "ForwardMode.is_extend": O(FWD + "ForwardMode.is_extend"),
    },
    # -- HiCache L3 storage backend over the KV pool (hicache.py) --------------------------------
    "hicache": {
        "HiCacheStorage": O(_S + "mem_cache.hicache_storage.HiCacheStorage", use="subclassed"),
        "HiCacheStorage.batch_get_v1": O(
            _S + "mem_cache.hicache_storage.HiCacheStorage.batch_get_v1", "keys", "host_indices"
        ),  # fmt: skip
        "HiCacheStorage.batch_set_v1": O(
            _S + "mem_cache.hicache_storage.HiCacheStorage.batch_set_v1", "keys", "host_indices"
        ),  # fmt: skip
        "HiCacheStorage.register_mem_pool_host": O(
            _S + "mem_cache.hicache_storage.HiCacheStorage.register_mem_pool_host"
        ),
        "config.extra_config": M(
            _S + "mem_cache.hicache_storage.HiCacheStorageConfig", "extra_config"
        ),  # fmt: skip
        "config.model_name": M(
            _S + "mem_cache.hicache_storage.HiCacheStorageConfig", "model_name"
        ),  # fmt: skip
        "config.is_mla_model": M(
            _S + "mem_cache.hicache_storage.HiCacheStorageConfig", "is_mla_model"
        ),  # fmt: skip
        "config.tp_rank": M(_S + "mem_cache.hicache_storage.HiCacheStorageConfig", "tp_rank"),
        "config.tp_size": M(_S + "mem_cache.hicache_storage.HiCacheStorageConfig", "tp_size"),
        "config.pp_rank": M(_S + "mem_cache.hicache_storage.HiCacheStorageConfig", "pp_rank"),
        "config.pp_size": M(_S + "mem_cache.hicache_storage.HiCacheStorageConfig", "pp_size"),
        "config.attn_cp_rank": M(
            _S + "mem_cache.hicache_storage.HiCacheStorageConfig", "attn_cp_rank"
        ),  # fmt: skip
        "config.attn_cp_size": M(
            _S + "mem_cache.hicache_storage.HiCacheStorageConfig", "attn_cp_size"
        ),  # fmt: skip
        "config.is_storage_writer": M(
            _S + "mem_cache.hicache_storage.HiCacheStorageConfig", "is_storage_writer"
        ),  # fmt: skip
        "host.layout": M(HOST_POOL, "layout"),
        "host.kv_buffer": M(HOST_POOL, "kv_buffer"),
        "host.layer_num": M(HOST_POOL, "layer_num"),
        "host.size": M(HOST_POOL, "size"),
        "host.page_size": M(HOST_POOL, "page_size"),
        "host.get_page_buffer_meta": O(HOST_POOL + ".get_page_buffer_meta"),
    },
    # -- HiCache host tier on a CPU-only host, CPU launcher only (hicache_cpu.py) ----------------
    "hicache_cpu": {
        "pool_host.common._cuda_host_register": O(
            _S + "mem_cache.pool_host.common._cuda_host_register", use="replaced"
        ),
        "pool_host.mha.transfer_kv_direct": Internal(
            _S + "mem_cache.pool_host.mha",
            SOURCE,
            attr="transfer_kv_direct",
            use="module global set",
        ),  # fmt: skip
        "memory_pool_host.transfer_kv_direct": Internal(
            _S + "mem_cache.memory_pool_host",
            SOURCE,
            attr="transfer_kv_direct",
            optional=True,
            use="module global set",
        ),  # fmt: skip
    },
    # -- processes started through the CPU launcher (cpu_compat.py, serve_cpu.py) -----------------
    "cpu_launcher": {
        "launch_server.run_server": O("sglang.launch_server.run_server", use="called"),
        "sglang_router.launch_router": Internal(
            "sglang_router.launch_router", MODULE, optional=True, use="run by router_cpu"
        ),  # fmt: skip
        "load_plugins": O(_S + "plugins.load_plugins", use="called"),
        "prepare_server_args": O(_S + "server_args.prepare_server_args", "argv", use="called"),
        "kill_process_tree": O(_S + "utils.kill_process_tree", use="called"),
        "http_server": Internal(
            _S + "entrypoints.http_server",
            MODULE,
            where="launcher",
            use="module global _freeze_gc_after_server_warmup replaced",
        ),  # fmt: skip
        "http_server._freeze_gc_after_server_warmup": Internal(
            _S + "entrypoints.http_server._freeze_gc_after_server_warmup",
            OBJECT,
            params=("server_args",),
            where="launcher",
            use="wrapped: waits until the port listens",
        ),  # fmt: skip
        "MooncakeKVSender.supports_host_tensor_indices": Internal(
            _S + "disaggregation.mooncake.conn.MooncakeKVSender.supports_host_tensor_indices",
            OBJECT,
            optional=True,
            use="set False",
        ),  # fmt: skip
    },
}

#: modules the features import directly (listed for the probe; no attribute of theirs is used)
MODULES = {
    "plugin": [Internal(_S + "plugins", MODULE)],
}
