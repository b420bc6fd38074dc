"""How Dynamo traces a model for mst, before any pass sees a graph: what it may take into a graph,
and what it left out.

    restored_attributes.py  inside an activation-checkpointed call, an attribute set and restored
                            before the call returns is no side effect (transformers >= 5.25 with
                            `kernels` sets one around every attention layer)
    graph_breaks.py         the graph breaks Dynamo met, where, and which code ran outside every graph
    ddp_split.py            under DDP, the whole graph goes to mst before Dynamo's DDP optimizer
                            splits it at gradient buckets, so that no bucket boundary cuts a site

This is a bottom layer, like `runtime/`: it imports torch, its own modules and (ddp_split.py, to
call a site by key) `runtime/`, nothing else of mst_fx.
"""
