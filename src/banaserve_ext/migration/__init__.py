# SPDX-License-Identifier: Apache-2.0
"""BanaServe's migrations, independent of any serving engine.

* :mod:`.attn_math` — partial attention with log-sum-exp and the exact merge of two partials
  (torch; imported lazily, so importing this package does not import torch);
* :mod:`.attn_peer` — the attention peer process that holds migrated KV slices and computes
  partial attention over them, and its client (they speak the length-prefixed msgpack frames of
  :mod:`banaserve_ext._framing`);
* :mod:`.layer_server` — the layer server that runs a migrated block of decoder layers, and the
  owner's side (ship weights and KV through the transfer engine, split steps, migrate back);
  :mod:`.layer_wire` its frames with raw tensor buffers, :mod:`.layer_layout` the pure
  index/offset arithmetic, :mod:`.llama_stack` the torch decoder stack it runs.

The SGLang glue lives in :mod:`banaserve_ext.adapters.sglang`.
"""
