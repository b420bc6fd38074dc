"""The default memory budget under a memory limit the OS enforces: a child memory cgroup, as a
container's. The training step runs in a child process inside it (`limited_worker.py`); past the
limit the kernel kills it for memory.

The length and the limit are calibrated on this machine: the step is measured without a limit with
the budget off ("off": every site chunked and recomputed) and with a budget that keeps everything,
and the limit is set between the two. Then "off" must train, keeping everything must be killed, and
"auto" (the default) must train with the losses of "off". Skipped where no child cgroup can be made
(not root, no memory controller)."""

from __future__ import annotations

import json
import os
import sys

import pytest

TOOLS = os.path.join(os.path.dirname(__file__), "..", "tools")
sys.path.insert(0, TOOLS)
from memory_cgroup import MemoryCgroup  # noqa: E402

WORKER = os.path.join(os.path.dirname(__file__), "limited_worker.py")
MiB = 1 << 20
# A Llama shape whose LM head dominates: kept whole, its N x V logits are what no limit can hold.
SPEC = {"tokens": 4096, "hidden": 128, "intermediate": 512, "layers": 2, "vocab": 32000, "steps": 4}
KEEP_ALL = "100GB"  # a budget that keeps every MLP and runs the head as one chunk

pytestmark = pytest.mark.skipif(MemoryCgroup.unavailable() is not None, reason=str(MemoryCgroup.unavailable()))


def run(budget: str, limit: int | None, hog: dict | None = None) -> tuple[dict | None, object, int]:
    """(the worker's JSON or None if it failed, how it finished, the group's most used bytes)."""
    spec = {**SPEC, "options": {"memory_budget": budget, "compiler": "aot_eager"}, "hog": hog}
    with MemoryCgroup(limit) as group:
        done = group.run([sys.executable, WORKER, json.dumps(spec)], timeout=600)
        usage = group.max_usage()
    result = json.loads(done.stdout.splitlines()[-1]) if done.returncode == 0 else None
    return result, done, usage


@pytest.fixture(scope="module")
def unlimited():
    """The step without a limit: "off" and keeping everything, with the most each used."""
    off, done_off, off_usage = run("off", None)
    kept, done_kept, kept_usage = run(KEEP_ALL, None)
    assert off is not None, done_off.stderr[-3000:]
    assert kept is not None, done_kept.stderr[-3000:]
    assert kept_usage - off_usage > 512 * MiB, (off_usage, kept_usage)  # room for a limit between them
    return {"off": off, "off_usage": off_usage, "kept_usage": kept_usage}


def _budgets(result: dict, step: int) -> list[int]:
    return [d["budget"] for d in result["decisions"][step] if d["budget"] is not None]


def test_auto_trains_where_off_trains_and_keeping_everything_is_killed(unlimited):
    limit = (unlimited["off_usage"] + unlimited["kept_usage"]) // 2
    off, done, _ = run("off", limit)
    assert off is not None, done.stderr[-3000:]  # "off" fits the limit
    _, done, _ = run(KEEP_ALL, limit)
    assert done.killed_for_memory, (done.returncode, done.stderr[-2000:])  # a step that keeps all does not
    auto, done, usage = run("auto", limit)
    assert auto is not None, (done.returncode, done.killed_for_memory, done.stderr[-3000:])
    assert usage <= limit
    assert auto["losses"] == pytest.approx(unlimited["off"]["losses"], rel=1e-5)
    said = [line for line in auto["log"] if "memory_budget='auto'" in line]
    assert said and "cgroup v" in said[0], auto["log"]  # it read the container's limit, not MemAvailable
    kept = [d for step in auto["decisions"][1:] for d in step if d["keep"]]
    assert kept  # within the limit it still keeps what fits: faster than "off", not merely as lean


def test_auto_budget_shrinks_when_another_process_takes_memory(unlimited):
    """After step 1 a second process in the same group takes `hog` bytes and holds them. Keeping
    as much as before would pass the limit (shown by the keep-everything run); "auto" reads the
    group again at the next call, its budget falls by about what was taken, and the steps train."""
    limit, hog = unlimited["kept_usage"] + 512 * MiB, 768 * MiB
    _, done, _ = run(KEEP_ALL, limit, {"after_step": 1, "bytes": hog})
    assert done.killed_for_memory, (done.returncode, done.stderr[-2000:])
    auto, done, usage = run("auto", limit, {"after_step": 1, "bytes": hog})
    assert auto is not None, (done.returncode, done.killed_for_memory, done.stderr[-3000:])
    before, after = _budgets(auto, 1), _budgets(auto, 2)
    assert before and after and max(after) < min(before) - hog // 2, (before, after)
    assert auto["losses"] == pytest.approx(unlimited["off"]["losses"], rel=1e-5)
