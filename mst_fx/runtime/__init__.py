"""What a rewritten site runs: the chunk loop, its bodies, the chunk plan, the attention op, and
the logits placeholders the caller gets when the loss is computed outside the graph.

    chunked_ops.py        the `mst::*` custom ops: one opaque call per MLP or LM-head site
    chunked_token_ops.py  the per-token head (`mst::linear_rows_*`): values kept per token
    chunk_bodies.py       one chunk's forward and backward, compiled once per site
    chunk_plan.py         how many tokens each chunk takes
    memory_budget.py      per call: keep the intermediates or recompute, and how many chunks fit
    kept_graphs.py        a call kept as an autograd graph (routed experts, per-token heads)
    device_memory.py      what the limits on this process still allow: MemAvailable, cgroups, CUDA
    mask_expressions.py   an attention mask as an expression of its indices, evaluated by blocks
    masked_attention.py   the `mst::masked_attention` op: attention by blocks of queries, no N x N mask
    deferred_logits.py    `DeferredLogits`: returned logits the loss outside chunks on use
    deferred_rows.py      row-wise ops and per-token reductions on deferred logits
    per_token_loss.py     unreduced cross-entropy on deferred logits
    dropped_logits.py     the empty logits returned in training, and what reading them says
    site_options.py       what a site reads of the backend's options

This is the bottom layer: it imports torch and its own modules, nothing else of mst_fx.
"""
