"""How Dynamo traces a model for mst, before any pass sees a graph: what it may take into a graph,
and what it left out.

    restored_attributes.py  inside an activation-checkpointed call, an attribute set and restored
                            before the call returns is no side effect (transformers >= 5.25 with
                            `kernels` sets one around every attention layer)
    graph_breaks.py         the graph breaks Dynamo met, where, and which code ran outside every graph

This is a bottom layer, like `runtime/`: it imports torch and its own modules, nothing else of mst_fx.
"""
