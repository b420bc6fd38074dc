"""mst-fx: the Mini-Sequence Transformer as a torch.compile backend.

    model = torch.compile(model, backend="mst")               # no import needed
    model = mst_fx.compile(model, chunk_size=2048)            # in place; knows train from eval mode
    model = torch.compile(model, backend=mst_fx.backend(chunks=8))
    report = mst_fx.explain(model, *example_inputs)           # what mst finds and rewrites, no training
    report = mst_fx.last_report()                             # the same, for the graphs compiled so far

The modules here are the backend and what users call; below them, each folder one layer, and no
module imports one of a folder above its own:

    options.py        MstOptions: what the backend accepts, validated once
    dynamo_backend.py the `mst` backend: options -> passes -> hand-off to a compiler
    compile_model.py  mst_fx.compile(model)
    explain_model.py  mst_fx.explain(model) and `mst-inspect`
    passes/           the graph rewrites (shipped from the repository's `passes/`)
    runtime/          what a rewritten site runs
    tracing/          how Dynamo traces the model for mst: restored attributes, graph breaks
    inspect/          reports, memory estimates, the CLI
    models/           small built-in models for the demo, the benchmarks and the tests
"""

from mst_fx.compile_model import compile
from mst_fx.dynamo_backend import backend, mst_backend
from mst_fx.explain_model import explain
from mst_fx.inspect.compiled_reports import clear_reports, compiled_reports, last_report
from mst_fx.inspect.model_report import ModelReport
from mst_fx.options import MstOptions
from mst_fx.passes import rewrite

__all__ = [
    "ModelReport", "MstOptions", "backend", "clear_reports", "compile", "compiled_reports", "explain", "last_report",
    "mst_backend", "rewrite",
]  # fmt: skip
__version__ = "0.1.0"
