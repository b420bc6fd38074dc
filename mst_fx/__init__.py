"""mst-fx: the Mini-Sequence Transformer as a torch.compile backend.

    model = torch.compile(model, backend="mst")               # no import needed
    model = torch.compile(model, backend=mst_fx.backend(chunks=8))
"""

from mst_fx.dynamo_backend import (
    backend,
    clear_reports,
    compiled_reports,
    mst_backend,
    rewrite,
)
from mst_fx.options import MstOptions

__all__ = ["MstOptions", "backend", "clear_reports", "compiled_reports", "mst_backend", "rewrite"]
__version__ = "0.1.0"
