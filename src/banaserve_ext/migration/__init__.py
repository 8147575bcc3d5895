# SPDX-License-Identifier: Apache-2.0
"""BanaServe's migrations, independent of any serving engine.

* :mod:`.attn_math` — partial attention with log-sum-exp and the exact merge of two partials
  (torch; imported lazily, so importing this package does not import torch);
* :mod:`.attn_peer` — the attention peer process that holds migrated KV slices and computes
  partial attention over them, and its client;
* :mod:`.frames` — the length-prefixed msgpack frames both speak.

The SGLang glue lives in :mod:`banaserve_ext.adapters.sglang`.
"""
