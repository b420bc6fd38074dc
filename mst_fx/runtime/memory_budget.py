"""The memory budget: each chunked site decides, per call, whether to keep its intermediates for
backward or to recompute them, and how many chunks it needs.

What the budget covers: the memory the chunked sites themselves hold, i.e. the intermediates a
site keeps from its forward to its backward, plus the working memory of the chunk being computed
(a chunk's N/M x I or N/M x V tensors). It does not cover the weights, their gradients, the
optimizer's state, or the activations outside the sites (attention, norms, the residual stream):
those are the same with and without mst. Attention blocks keep their own size rule (`chunk_plan`).

Per call, with `held` the bytes that sites have kept and not yet released (on this device, across
every site and every forward since their backward), a site of N tokens decides:

    keep      when  held + N·keep_row + max(N·work_row, reserve) <= budget
              one chunk, its intermediates kept for backward: no recompute (MLPs, routed experts
              and per-token heads; the LM head and row losses compute their gradients in forward
              and never recompute anyway)
    one chunk when  held + N·work_row <= budget
              (one chunk: N itself when a power of two, else N's binary pieces, 512 + 8 for 520,
              so that bodies compiled per power of two serve every length)
    chunks    of the most rows c (a power of two, at least MIN_ROWS) with held + c·work_row <= budget,
              recomputed in backward; when not even MIN_ROWS fit, the step is over the budget:
              it runs at MIN_ROWS and says so once, at WARNING, with the numbers

`reserve` is what makes a greedy choice safe across the sites of a step. Kept intermediates add up
until backward frees them, and the forward decides early layers before it sees late ones. A site
may keep only what leaves every other site of its group room for one chunk at today's lean rule
(`ChunkPolicy.rows_for`, the aspect-ratio rule) at the same length: `reserve` is the largest such
chunk. So keeping never pushes a later site finer than mst would chunk it without a budget, and
never over the budget: each later call checks `held + its chunk <= budget` against the `held` that
includes every earlier site's keep. The sites are known before the first call (the passes build
them at compile time), so a fixed budget plans the first step as every later one. Chosen over a
plan replayed from a recorded previous step because the rule needs no step boundary: several
forwards before one backward (gradient accumulation, chosen + rejected in DPO) just add to `held`.
("auto" does wait one step, but only to measure the memory outside the sites.)

Kept intermediates live in a stash behind a ticket, a small CPU tensor that the op returns and the
graph saves for backward. The backward op takes them by ticket and releases their bytes; if the
ticket dies first (no backward: an evaluation forward with grad on, a checkpointed region's first
forward), a finalizer releases them. A ticket without its stash (id 0, or already taken) means
recompute: the op is correct either way, only slower.

`"auto"` (the default) is the memory this process may still take, read again at every call, less
what the process holds apart from the sites' keeps at its most:

    budget = (1 - AUTO_MARGIN) x (free + in_use) - base

`free` is what the limits that apply to this process still allow (`device_memory.py`): on CPU the
smallest of the kernel's MemAvailable and every memory cgroup the process is in (a container's
limit); on CUDA the device's free memory and the allocator's per-process fraction. `in_use` is what
the process holds now (CUDA `memory_allocated`, CPU resident size), so `free + in_use` is all it may
have. `base` is the most the process has held apart from the sites' keeps: the weights, gradients,
optimizer state and activations outside the sites at their most. It is sampled when each site call
begins (`in_use - held`) and, from the device's peak mark (CUDA `max_memory_allocated`, CPU
VmHWM), between two calls: `held` changes only inside a site call, so a peak reached after one call
ended and before the next began (an attention backward, the optimizer's step) is the process's
own, at that `held`. The 10% margin is for the allocator's fragmentation and what the marks miss
(a peak that the process's own measuring reset).

Because `free` is read at every call, memory that other processes take (another job, a co-located
inference engine, data-loader workers) or that is taken outside PyTorch's allocator (NCCL's
buffers) shrinks the budget from the next call on, and a keep never takes more than is free at
that moment: `held + needs <= budget` implies `needs <= 0.9 x free`, since `base >= in_use - held`.

A call whose length is longer than any that a backward has followed runs lean: its step is the one
that measures `base` at that length. So the first step runs lean, as does the first step of a
longer sequence; a step that is short of memory finds a small or zero budget and runs as lean as
mst without one.

When a site's own allocation fails anyway (CUDA's `OutOfMemoryError`, or the CPU allocator's
"can't allocate memory" under an address-space limit), the site frees what the call took and runs
the call again at the lean rule (`retreat`), and the device's budget is capped at half of what that
call had reached (held + its needs), with one WARNING. The lean call needs less than the failed
one, so it runs where "off" runs. An allocation that fails outside a site (after the sites took
their share) can't be caught here: the margin and the peak marks are what keep that from
happening. A cgroup's kernel kills the process instead of failing an allocation, so on CPU inside a
container the reading of the limit is what protects the step.

Sites reserve room for each other within their **group**: the sites of one compiled graph, and the
sites made at run time for the logits it returns (`SiteGroup`). A group lives as long as its
compiled graph: the registry of sites and their compiled bodies holds them weakly, so what was
built for a graph goes with it (`torch._dynamo.reset()`, or Dynamo dropping the graph), and one
graph's sites never shrink another's keeps.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import itertools
import logging
import re
import weakref
from collections.abc import Callable

import torch
from torch import Tensor

from . import device_memory

log = logging.getLogger(__name__)

MIN_ROWS = 16  # the finest chunking a budget can ask for
AUTO = "auto"
OFF = "off"
AUTO_MARGIN = 0.1  # of what "auto" finds: fragmentation, and peaks the marks miss

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}  # fmt: skip


def parse_budget(value) -> int | str:
    """The option's value as bytes (an int), "auto" or "off"; ValueError naming the option otherwise."""
    allowed = "an int of bytes >= 0, a string such as '6GiB' or '512MB', 'auto' or 'off'"
    if isinstance(value, str):
        text = value.strip().lower()
        if text in (AUTO, OFF):
            return text
        match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([a-z]*)", text)
        if match and match.group(2) in _UNITS:
            return int(float(match.group(1)) * _UNITS[match.group(2)])
    elif isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    raise ValueError(f"mst option 'memory_budget' must be {allowed}, got {value!r}")


# ---------------------------------------------------------------- "auto"


class _Auto:
    """`"auto"` on one device (see the module docstring): what the limits still allow plus what the
    process holds, less a margin, less the most the process has held apart from the sites' keeps."""

    def __init__(self, device: torch.device):
        self.device = device
        self.base = device_memory.in_use(device)
        self.mark = device_memory.peak(device)  # the peak mark when the last site call ended
        self.measured = 0  # the longest call that a backward has followed: its step was measured
        self.unmeasured = 0  # the longest call since, run lean to be measured

    def call_begins(self, held: int) -> int:
        """Samples what the process holds apart from the keeps; returns what it holds now."""
        in_use = device_memory.in_use(self.device)
        self.base = max(self.base, in_use - held)
        mark = device_memory.peak(self.device)
        if mark != self.mark:  # a new peak between two calls (or a reset mark): the process's own
            self.base = max(self.base, mark - held)
        self.mark = mark
        return in_use

    def call_ends(self) -> None:
        self.mark = device_memory.peak(self.device)

    def budget(self, held: int, tokens: int) -> int | None:
        """Bytes, or None while a call of this length runs lean to be measured."""
        in_use = self.call_begins(held)
        if tokens > self.measured:
            self.unmeasured = max(self.unmeasured, tokens)
            return None
        capacity = device_memory.headroom(self.device).free + in_use
        return max(0, int(capacity * (1 - AUTO_MARGIN)) - self.base)

    def backward_begins(self, held: int) -> None:
        self.call_begins(held)
        self.measured = max(self.measured, self.unmeasured)


_AUTO: dict[str, _Auto] = {}


def auto(device: torch.device) -> _Auto:
    name = str(device)
    if name not in _AUTO:
        _AUTO[name] = _Auto(device)
        room = device_memory.headroom(device)
        log.info("mst: memory_budget='auto' on %s reads %s: %s free now", name, room.source, device_memory.describe(room.free))
    return _AUTO[name]


def preview(setting: int | str, device: torch.device) -> tuple[int | None, str]:
    """The budget a call would be given now, and what it was read from, for a report: "auto" as
    it would be once measured, from the memory in use at this moment (nothing is recorded)."""
    if setting == OFF:
        return None, "off"
    if setting != AUTO:
        return _capped(device, setting), "memory_budget"
    room, in_use = device_memory.headroom(device), device_memory.in_use(device)
    budget = max(0, int((room.free + in_use) * (1 - AUTO_MARGIN)) - in_use)
    return _capped(device, budget), f"auto: {room.source}"


def note_backward(setting: int | str, device: torch.device) -> None:
    """A site's backward begins: "auto" samples, and has now seen a step's forward whole."""
    if setting == AUTO:
        auto(device).backward_begins(ledger(device).held)


def resolve(setting: int | str, device: torch.device, held: int = 0, tokens: int = 0) -> int | None:
    """The budget in bytes; None when off, or while "auto" measures a call of this length."""
    if setting == OFF:
        return None
    budget = auto(device).budget(held, tokens) if setting == AUTO else setting
    return None if budget is None else _capped(device, budget)


def _capped(device: torch.device, budget: int) -> int:
    ceiling = ledger(device).ceiling
    return budget if ceiling is None else min(budget, ceiling)


@contextlib.contextmanager
def site_call(setting: int | str, device: torch.device):
    """Around a site op's work: under "auto", the peak mark is read when it ends, so that the
    call's own chunks are never taken for the process's memory outside the sites."""
    try:
        yield
    finally:
        if setting == AUTO and str(device) in _AUTO:
            _AUTO[str(device)].call_ends()


# ---------------------------------------------------------------- the decision


@dataclasses.dataclass(frozen=True)
class Decision:
    keep: bool  # one chunk, intermediates kept for backward
    rows: int  # tokens per chunk (at least all of them: one chunk)
    budget: int | None  # bytes; None: no budget (the lean rule)
    held: int = 0  # bytes kept by sites when the decision was made
    needs: int = 0  # bytes this call adds on top of `held` at its largest
    fits: bool = True

    def describe(self, tokens: int, recomputes: bool) -> str:
        """For a report; `recomputes`: the site recomputes its chunks in backward (all but the LM head)."""
        if self.keep:
            return "kept, no recompute"
        if self.rows >= tokens:
            return "one chunk"
        chunks = -(-tokens // max(1, self.rows))
        return f"{chunks} chunks of {self.rows}" + (", recomputed" if recomputes else "")


def choose(
    tokens: int, budget: int, held: int, reserve: int, keep_row: int, work_row: int, can_keep: bool
) -> Decision:
    """The decision of the module docstring, as a pure function of its numbers."""
    whole = 1 << max(0, tokens - 1).bit_length()  # rows that take all tokens: N's binary pieces
    if can_keep:
        needs = tokens * keep_row + max(tokens * work_row, reserve)
        if held + needs <= budget:
            return Decision(True, whole, budget, held, needs)
    room = budget - held
    if tokens * work_row <= room:
        return Decision(False, whole, budget, held, tokens * work_row)
    rows = MIN_ROWS
    if work_row > 0 and room // work_row >= MIN_ROWS:
        rows = 1 << (int(room // work_row).bit_length() - 1)
    return Decision(False, rows, budget, held, rows * work_row, fits=rows * work_row <= room)


# ---------------------------------------------------------------- what sites expect of each other


class SiteGroup:
    """The sites of one compiled graph, and those made at run time for the logits it returns.

    A site reserves room for the lean chunk of every other site of its group (the module docstring).
    The group holds its graph's sites weakly (the compiled graph holds them) and the sites made for
    it at run time strongly, by description (`made`): they go when the graph's sites do.

    Which group a call belongs to: a graph's ops name their site by a key that hashes its
    description only (so that compile caches hit across processes), and two graphs may hold sites
    of one key; the compiled graph says which group runs (`running`) while it runs. Sites made at
    run time get keys of their own group (`making`)."""

    def __init__(self) -> None:
        self._sites: weakref.WeakSet = weakref.WeakSet()
        self._made: dict[tuple, object] = {}

    def add(self, site) -> None:
        """`site`: has `key`, `budget` and `lean_chunk_bytes(tokens, device_type)`."""
        self._sites.add(site)

    def made(self, description: tuple, make: Callable[[], object]):
        """The site made at run time for `description`, made once per group."""
        if description not in self._made:
            token = _MAKING.set(self)
            try:
                self._made[description] = make()
            finally:
                _MAKING.reset(token)
        return self._made[description]

    def __reduce__(self):
        """Compile caches pickle the graph, sites included, for their keys: a group is no part of
        what a graph computes, and pickles as an empty one (its sets hold cycles)."""
        return SiteGroup, ()

    def reserve(self, setting: int | str, tokens: int, device_type: str, excluding: str) -> int:
        """The largest lean chunk of any other site of the group under the same budget setting."""
        others = [s for s in list(self._sites) if s.key != excluding and s.budget == setting]
        return max((s.lean_chunk_bytes(tokens, device_type) for s in others), default=0)


_RUNNING: contextvars.ContextVar[SiteGroup | None] = contextvars.ContextVar("mst_running_group", default=None)
_MAKING: contextvars.ContextVar[SiteGroup | None] = contextvars.ContextVar("mst_making_group", default=None)


@contextlib.contextmanager
def running(group: SiteGroup):
    """While a compiled graph runs: its sites' calls reserve room within `group`."""
    token = _RUNNING.set(group)
    try:
        yield
    finally:
        _RUNNING.reset(token)


def making() -> SiteGroup | None:
    """The group a site is being made for at run time (`SiteGroup.made`), or None."""
    return _MAKING.get()


# ---------------------------------------------------------------- kept intermediates


class _Ledger:
    """The bytes sites keep on one device, the kept tensors behind their tickets, and the ceiling
    a failed allocation put on the budget (`retreat`)."""

    def __init__(self) -> None:
        self.held = 0
        self.ceiling: int | None = None
        self._kept: dict[int, tuple[object, int]] = {}

    def keep(self, kept: object, nbytes: int) -> Tensor:
        """A ticket for `kept` (tensors of `nbytes` bytes), charged to `held` until it is taken."""
        ticket_id = next(_TICKET_IDS)
        self._kept[ticket_id] = (kept, nbytes)
        self.held += nbytes
        ticket = torch.tensor(ticket_id, dtype=torch.int64)
        weakref.finalize(ticket, self._release, ticket_id)
        return ticket

    def take(self, ticket: Tensor) -> object | None:
        return self._release(int(ticket))

    def _release(self, ticket_id: int) -> object | None:
        entry = self._kept.pop(ticket_id, None)
        if entry is None:
            return None
        self.held -= entry[1]
        return entry[0]


_TICKET_IDS = itertools.count(1)
_LEDGERS: dict[str, _Ledger] = {}


def ledger(device: torch.device) -> _Ledger:
    return _LEDGERS.setdefault(str(device), _Ledger())


def no_ticket() -> Tensor:
    """The ticket of a call that kept nothing: its backward recomputes."""
    return torch.zeros((), dtype=torch.int64)


# ---------------------------------------------------------------- a site's call


_warned_over_budget: set = set()


def decide(
    setting: int | str, group: SiteGroup, key: str, x: Tensor, keep_row: int, work_row: int, lean_rows: int,
    can_keep: bool,
) -> Decision:  # fmt: skip
    """The decision for one call of site `key` on the rows `x` (N x d)."""
    held = ledger(x.device).held
    tokens = x.shape[0]
    budget = resolve(setting, x.device, held, tokens)
    if budget is None:
        return Decision(False, lean_rows, None)
    reserve = (_RUNNING.get() or group).reserve(setting, tokens, x.device.type, key)
    decision = choose(tokens, budget, held, reserve, keep_row, work_row, can_keep)
    if not decision.fits and setting not in _warned_over_budget:
        _warned_over_budget.add(setting)
        log.warning(
            "mst: the step does not fit memory_budget=%d bytes even at the finest chunking: a site of %d "
            "tokens needs %d bytes for a chunk of %d rows on top of %d bytes kept by other sites "
            "(short by %d bytes); running it at %d rows",
            budget, tokens, decision.needs, decision.rows, held, held + decision.needs - budget, decision.rows,
        )  # fmt: skip
    return decision


def out_of_memory(error: BaseException) -> bool:
    """The allocator could not give what a call asked for: CUDA's OutOfMemoryError, or the CPU
    allocator's failure (an address-space limit, overcommit off)."""
    return isinstance(error, torch.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and "can't allocate memory" in str(error)
    )


_warned_retreat: set[str] = set()


def retreat(device: torch.device, decision: Decision, key: str, error: BaseException) -> None:
    """A call that ran under `decision` failed to allocate: cap the device's budget at half of
    what the call had reached, and say so once. The caller frees what the call took and runs it
    again at the lean rule."""
    book = ledger(device)
    reached = decision.held + decision.needs
    book.ceiling = reached // 2 if book.ceiling is None else min(book.ceiling, reached // 2)
    if str(device) not in _warned_retreat:
        _warned_retreat.add(str(device))
        log.warning(
            "mst: %s ran out of memory on %s under memory_budget (%s: %s); it ran that call at the lean "
            "rule instead, and the budget on %s is capped at %d bytes from now on",
            key.split("-")[0], device, type(error).__name__, str(error).splitlines()[0][:200], device, book.ceiling,
        )  # fmt: skip
