"""A memory limit the kernel enforces, for a child process: a child memory cgroup of this process's
own, as `docker run --memory` or a Kubernetes pod's limit sets one. Past its limit the kernel
reclaims what it can and then kills the process for memory (SIGKILL), as it would in a container.

    with MemoryCgroup(3 << 30) as group:
        done = group.run([sys.executable, "step.py"])   # the child and its children are in the group
        done.killed_for_memory, group.max_usage()

Made under the group this process is in (cgroup v1's memory hierarchy, or v2), so it needs write
access there: root in most containers. `MemoryCgroup.unavailable()` says why one can't be made
here, for a test to skip with. The limit applies to every process in the group together, and to
the page cache they fault in, as in a container.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import uuid

UNLIMITED = None


@dataclasses.dataclass
class Finished:
    returncode: int
    stdout: str
    stderr: str
    killed_for_memory: bool  # the kernel's OOM killer ended it (SIGKILL, and the group counted an oom_kill)


class MemoryCgroup:
    """A child memory cgroup with `limit` bytes (None: no limit, only counted)."""

    def __init__(self, limit: int | None, root: str = "/sys/fs/cgroup"):
        self.limit, self.root = limit, root
        self.version, self.parent = _own_memory_group(root)
        self.path = os.path.join(self.parent, f"mst-{uuid.uuid4().hex[:8]}")

    @staticmethod
    def unavailable(root: str = "/sys/fs/cgroup") -> str | None:
        """Why no child memory cgroup can be made here, or None."""
        try:
            with MemoryCgroup(64 << 20, root) as group:
                group.max_usage(), group.oom_kills()  # the counters the tests and benchmarks read
                return None
        except (OSError, RuntimeError, ValueError) as error:
            return f"no child memory cgroup can be made here ({type(error).__name__}: {error})"

    def __enter__(self) -> MemoryCgroup:
        if self.version == 2:
            _write(self.parent, "cgroup.subtree_control", "+memory")  # no-op where already enabled
        os.mkdir(self.path)
        try:
            if self.limit is not None:
                _write(self.path, "memory.max" if self.version == 2 else "memory.limit_in_bytes", str(self.limit))
            if self.version == 2:
                _write(self.path, "memory.swap.max", "0", missing_ok=True)
            else:
                _write(self.path, "memory.swappiness", "0", missing_ok=True)
        except OSError:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        for _ in range(50):  # a killed child may take a moment to leave the group
            try:
                os.rmdir(self.path)
                return
            except FileNotFoundError:
                return
            except OSError:
                import time

                time.sleep(0.1)

    def run(self, command: list[str], timeout: float | None = None, env: dict | None = None) -> Finished:
        """`command` in this group from its first instruction (it joins before it execs)."""
        procs = os.path.join(self.path, "cgroup.procs")

        def join() -> None:
            with open(procs, "w") as f:
                f.write(str(os.getpid()))

        done = subprocess.run(command, preexec_fn=join, capture_output=True, text=True, timeout=timeout, env=env)
        killed = done.returncode == -signal.SIGKILL and self.oom_kills() > 0
        return Finished(done.returncode, done.stdout, done.stderr, killed)

    def max_usage(self) -> int:
        """The most the group has used (v1 memory.max_usage_in_bytes, v2 memory.peak)."""
        name = "memory.peak" if self.version == 2 else "memory.max_usage_in_bytes"
        return int(_read(self.path, name))

    def oom_kills(self) -> int:
        name = "memory.events" if self.version == 2 else "memory.oom_control"
        for line in _read(self.path, name).splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        return 0


def _own_memory_group(root: str) -> tuple[int, str]:
    """(version, directory) of the memory cgroup this process is in."""
    with open("/proc/self/cgroup") as f:
        lines = f.read().splitlines()
    for line in lines:
        hierarchy, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            directory = os.path.join(root, "memory", path.lstrip("/"))
            if os.path.isdir(directory):
                return 1, directory
    for line in lines:
        hierarchy, controllers, path = line.split(":", 2)
        if hierarchy == "0":
            for base in (root, os.path.join(root, "unified")):
                directory = os.path.join(base, path.lstrip("/"))
                if os.path.exists(os.path.join(base, "cgroup.controllers")) and "memory" in _read(base, "cgroup.controllers"):
                    return 2, directory
    raise RuntimeError("this process is in no memory cgroup that can be found under " + root)


def _read(directory: str, name: str) -> str:
    with open(os.path.join(directory, name)) as f:
        return f.read()


def _write(directory: str, name: str, text: str, missing_ok: bool = False) -> None:
    try:
        with open(os.path.join(directory, name), "w") as f:
            f.write(text)
    except FileNotFoundError:
        if not missing_ok:
            raise
