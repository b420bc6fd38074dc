"""mst-fx: the Mini-Sequence Transformer as a torch.compile backend.

    model = torch.compile(model, backend="mst")               # no import needed
    model = mst_fx.compile(model, chunk_size=2048)            # in place; knows train from eval mode
    model = torch.compile(model, backend=mst_fx.backend(chunks=8))
    report = mst_fx.explain(model, *example_inputs)           # what mst finds and rewrites, no training
    report = mst_fx.last_report()                             # the same, for the graphs compiled so far
"""

from mst_fx.dynamo_backend import (
    backend,
    clear_reports,
    compiled_reports,
    mst_backend,
    rewrite,
)
from mst_fx.compile_model import compile
from mst_fx.explain import ModelReport, explain, last_report
from mst_fx.options import MstOptions

__all__ = [
    "ModelReport", "MstOptions", "backend", "clear_reports", "compile", "compiled_reports", "explain", "last_report",
    "mst_backend", "rewrite",
]  # fmt: skip
__version__ = "0.1.0"
