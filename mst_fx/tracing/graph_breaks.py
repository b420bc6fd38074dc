"""The graph breaks Dynamo met, where they were, and which code ran outside every graph.

mst sees only what Dynamo puts in a graph. At a graph break Dynamo runs the instruction it could
not trace in plain Python and compiles the rest as new frames; so a break costs nothing when the
code under it is compiled in frames of its own, and costs every site in it when it is not:

- a call Dynamo could not take into a higher-order op (a checkpointed layer whose body breaks)
  runs the whole call outside, because checkpointing turns Dynamo off inside it;
- a `torch.compiler.disable`d function runs outside, by request;
- a frame Dynamo gave up on as a whole ("graph break in loop": a break inside a layer while the
  model loops over its layers) runs its own code outside: the user functions it calls are compiled
  as frames of their own, but not the torch ops it runs itself (an `nn.Linear` head and its loss
  after the loop). Which ones it ran can't be read from Dynamo's record, so such a frame counts as
  outside unless the break that made Dynamo give up lies in torch's own code (FSDP's, DDP's hooks)
  or the frame is a comprehension (transformers' output capturing builds a dict in one).

`GraphBreakMonitor` reads Dynamo's own records (`torch._dynamo.utils.graph_break_reasons` for the
breaks, the compilation metrics for the frames it skipped) and decides for each break whether the
code below it ran in some graph mst was handed: it did when any line of the called function is in
the stack trace of a node of such a graph (the frames under a break are compiled after it, so the
break that cuts the graph being compiled is decided at the next look). The breaks whose code ran
outside are logged once at WARNING, the others at INFO.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import logging
import os
import re
import sysconfig
import weakref
from collections.abc import Iterable
from typing import Any

import torch

log = logging.getLogger(__name__)

_STACK_LINE = re.compile(r'File "([^"]+)", line (\d+)')


@dataclasses.dataclass
class GraphBreak:
    where: str  # the user code at which Dynamo cut its graph: "modeling_llama.py:299 in forward"
    cause: str  # the innermost user code Dynamo could not trace, or the frame it skipped
    reason: str  # Dynamo's reason, its first line: "HOP: Unsafe side effect"
    explanation: str  # Dynamo's explanation of it
    outside: bool  # the code below `where` ran in no graph mst was handed
    count: int = 1  # how often Dynamo met it (every frame that inlines the same call meets it again)
    whole_frame: bool = False  # Dynamo gave up on the frame at `where` as a whole

    @property
    def key(self) -> tuple[str, str]:
        return self.where, self.cause

    def describe(self) -> str:
        said = f"{self.reason}, at {self.cause}" if self.cause != self.where else self.reason
        if not self.outside:
            return f"graph break at {self.where} ({said}); the code under it was compiled in graphs of its own"
        what = f"the whole frame {self.where}" if self.whole_frame else f"the call at {self.where}"
        return f"{what} ({said})"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GraphBreak:
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data})


class GraphBreakMonitor:
    """Dynamo's graph breaks from the moment this is made, decided against the graphs noted here."""

    def __init__(self) -> None:
        self._seen: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
        self._pending: list[tuple[GraphBreak, list]] = []  # (break, user frames below `where`)
        self._breaks: dict[tuple[str, str], GraphBreak] = {}
        self._traced_lines: dict[str, set[int]] = {}
        self._announced: set[tuple[str, str]] = set()  # logged once per monitor (the backend keeps one)
        self._unseen(_dynamo_records())  # what happened before is not ours

    def graph_compiled(self, gm: torch.fx.GraphModule) -> None:
        """Note the user code behind `gm`'s nodes (code that ran in a graph of ours), then decide the
        breaks Dynamo met since the last look."""
        for module in gm.modules():
            if isinstance(module, torch.fx.GraphModule):  # checkpoint bodies too
                for node in module.graph.nodes:
                    for filename, line in _STACK_LINE.findall(node.meta.get("stack_trace") or ""):
                        self._traced_lines.setdefault(filename, set()).add(int(line))
        self._poll(cutting=getattr(gm, "compile_subgraph_reason", None))

    def breaks(self) -> list[GraphBreak]:
        """Every break so far, each decided."""
        self._poll(cutting=None)
        return list(self._breaks.values())

    def _poll(self, cutting) -> None:
        # The break that cut the graph being compiled now has not run its call yet: the frames
        # below it are compiled after this graph, so it is decided at the next look.
        decided = [self._decide(brk, below) for brk, below in self._pending]
        self._pending = []
        for record in self._unseen(_dynamo_records()):
            if _is_ddp_split(record):
                continue
            brk, below = _read(record)
            if record is cutting:
                self._pending.append((brk, below))
            else:
                decided.append(self._decide(brk, below))
        self._announce(decided)

    def _unseen(self, records: Iterable[Any]) -> list[Any]:
        new = [r for r in records if self._seen.get(id(r)) is not r]
        for record in new:
            self._seen[id(record)] = record
        return new

    def _decide(self, brk: GraphBreak, below: list) -> GraphBreak:
        if brk.key in self._breaks:
            self._breaks[brk.key].count += 1
            return self._breaks[brk.key]
        if below:  # a call: did the function it called run in a graph of ours?
            brk.outside = not self._ran_in_a_graph(below[0])
        self._breaks[brk.key] = brk
        return brk

    def _announce(self, breaks: list[GraphBreak]) -> None:
        """Log each break once: those whose code ran outside in one WARNING, the others at INFO."""
        new = []
        for brk in breaks:
            if brk.key not in self._announced:
                self._announced.add(brk.key)
                new.append(brk)
        outside = [b.describe() for b in new if b.outside]
        if outside:
            log.warning(
                "mst: Dynamo ran code outside every graph: any MLP, LM head or attention mask in it was not seen "
                "by mst and keeps its full N x I, N x V or N x N memory (mst_fx.last_report() lists every graph "
                "break):\n  %s",
                "\n  ".join(outside),
            )
        for brk in new:
            if not brk.outside:
                log.info("mst: %s", brk.describe())

    def _ran_in_a_graph(self, frame) -> bool:
        span = _function_span(frame.filename, frame.lineno)
        lines = self._traced_lines.get(frame.filename, ())
        return span is not None and any(span[0] <= line <= span[1] for line in lines)


def _is_ddp_split(record) -> bool:
    """DDP's graph optimizer records its cuts at gradient buckets as breaks: no code leaves a graph
    there, and mst rewrites the graph before the cut (`ddp_split.py`)."""
    return (getattr(record, "reason", None) or "").startswith("DDPOptimizer intentional graph-break")


def _dynamo_records() -> list[Any]:
    """Dynamo's graph-break reasons, then the frames it skipped as a whole."""
    from torch._dynamo import utils

    skipped = [m for m in utils.get_compilation_metrics() if m.fail_type and m.fail_reason and m.co_filename]
    return list(getattr(utils, "graph_break_reasons", [])) + skipped


def _read(record) -> tuple[GraphBreak, list]:
    if hasattr(record, "user_stack"):  # a GraphCompileReason: a frame cut at user_stack[0]
        stack = list(record.user_stack) or [None]
        reason, explanation = _headline(record.reason)
        # A break whose cause is torch's own code (DDP's, FSDP's hooks) is glue: no layer is written
        # there, and the user frames on the way to it are judged by their own records.
        glue = stack[-1] is None or _library_code(stack[-1].filename)
        outside = _skips_the_call(reason) and not glue
        brk = GraphBreak(_frame_text(stack[0]), _frame_text(stack[-1]), reason, explanation, outside)
        return brk, [] if glue else stack[1:]
    # Compilation metrics of a frame Dynamo gave up on: it ran as plain Python, so the torch ops it
    # runs itself ran outside every graph, while the user functions it calls are compiled as frames
    # of their own. Where the break that made Dynamo give up is in torch's own code (FSDP's and
    # DDP's hooks), the frame is only glue around those calls.
    reason, explanation = _headline(record.fail_reason)
    where = f"{_short(record.co_filename)}:{record.co_firstlineno} in {record.co_name}"
    failed_in = record.fail_user_frame_filename or record.co_filename
    cause = f"{_short(failed_in)}:{record.fail_user_frame_lineno}" if record.fail_user_frame_filename else where
    glue = _library_code(failed_in) or record.co_name.startswith("<")  # <dictcomp>, <genexpr>: no layer
    return GraphBreak(where, cause, reason, explanation, not glue, whole_frame=True), []


def _skips_the_call(reason: str) -> bool:
    """The call at the break was run outside as a whole: a disabled or skipped function."""
    return "disable()" in reason or "marked as skipped" in reason


@functools.lru_cache(maxsize=1)
def _library_roots() -> tuple[str, ...]:
    return os.path.dirname(torch.__file__) + os.sep, sysconfig.get_paths()["stdlib"] + os.sep


def _library_code(filename: str) -> bool:
    """torch's own code or Python's (DDP's bookkeeping, contextlib): no model's layers are written
    there, so a break in it hides none. Installed packages are not: model code lives in them."""
    torch_root, stdlib_root = _library_roots()
    in_stdlib = filename.startswith(stdlib_root) and "site-packages" not in filename.removeprefix(stdlib_root)
    return filename.startswith(torch_root) or in_stdlib


_ANOTHER_BREAK = "another graph break occurred"


def _headline(text: str | None) -> tuple[str, str]:
    """Dynamo's reason (its first line, and the last of the breaks it met while handling it, such as
    "graph break in loop", which is why a frame was given up) and its first explanation."""
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    explanation = next((line.removeprefix("Explanation: ") for line in lines if line.startswith("Explanation:")), "")
    reason = lines[0] if lines else "unknown"
    chained = [lines[i + 1] for i, line in enumerate(lines[:-1]) if _ANOTHER_BREAK in line]
    if chained:
        reason += f"; then: {chained[-1]}"
    return reason, explanation


def _frame_text(frame) -> str:
    if frame is None:
        return "?"
    return f"{_short(frame.filename)}:{frame.lineno} in {frame.name}"


def _short(filename: str) -> str:
    """A path as users know it: from the package down when installed, else the file's name."""
    return filename.rpartition("site-packages/")[2] if "site-packages/" in filename else filename.rpartition("/")[2]


@functools.lru_cache(maxsize=256)
def _functions_of(filename: str) -> tuple[tuple[int, int], ...]:
    try:
        with open(filename, encoding="utf-8") as source:
            tree = ast.parse(source.read())
    except (OSError, SyntaxError, ValueError):
        return ()
    kinds = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)
    return tuple((n.lineno, n.end_lineno) for n in ast.walk(tree) if isinstance(n, kinds))


def _function_span(filename: str, line: int) -> tuple[int, int] | None:
    """First and last line of the innermost function holding `line`."""
    spans = [s for s in _functions_of(filename) if s[0] <= line <= s[1]]
    return min(spans, key=lambda s: s[1] - s[0]) if spans else None
