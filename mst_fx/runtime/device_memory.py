"""What memory this process may still take on a device, what it holds, and its peak: read fresh at
every call, from the limits that really apply to the process.

On CPU the memory a process may still take is the smallest of:

    MemAvailable       /proc/meminfo: the machine's (or the VM's) memory free for new allocations
    each memory cgroup the process is in, and each of their ancestors that sets a limit:
        v2             memory.max - memory.current
        v1             memory.limit_in_bytes - memory.usage_in_bytes
    plus, for a cgroup, its inactive file cache (memory.stat), which the kernel reclaims before it
    kills for memory; it is what the kubelet's working set subtracts too.

Inside a container `MemAvailable` is the host's: only the cgroup says what the container may use
(`docker run --memory`, a Kubernetes pod's limit). The group is read from /proc/self/cgroup and
found under its mount in /proc/self/mountinfo, so v1, v2, hybrid layouts and cgroup namespaces
all resolve to the directory the kernel charges.

On CUDA it is the smaller of:

    the device          cudaMemGetInfo's free memory, plus what PyTorch's allocator has cached
                        and not allocated (it reuses those blocks before asking the device)
    the allocator's cap torch.cuda.set_per_process_memory_fraction(f): f x total, less what is allocated

Memory other processes take, or that is taken outside PyTorch's allocator (NCCL's buffers, a
co-located inference engine), shows in these figures the next time they are read.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import torch

UNLIMITED_V1 = 1 << 60  # cgroup v1 writes "no limit" as a page-rounded 2^63 - 1


@dataclasses.dataclass(frozen=True)
class Headroom:
    """Bytes this process may still take, and which limit says so."""

    free: int
    source: str  # e.g. "cgroup v1 memory.limit_in_bytes 3.00 GiB (/process_api/x)", "MemAvailable"


def headroom(device: torch.device, root: str = "/") -> Headroom:
    """The memory this process may still take on `device` now (see the module docstring).
    `root`: where /proc and the cgroup mounts are found (tests point it at a fake tree)."""
    if device.type == "cuda":
        return cuda_headroom(device)
    if device.type != "cpu":
        raise ValueError(f"mst: no memory reader for device type {device.type!r}")
    found = [Headroom(mem_available(root), "MemAvailable")] + cgroup_headrooms(root)
    return min(found, key=lambda h: h.free)


def in_use(device: torch.device) -> int:
    """What this process holds on `device` now: CUDA's allocated tensors, or the resident size."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak(device: torch.device) -> int:
    """The most this process has held on `device` (CUDA's peak allocated, or VmHWM). Whoever
    measures may reset it (`reset_peak_memory_stats`, `clear_refs`): the readers compare marks."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return _status_kb("VmHWM") * 1024


def describe(nbytes: int) -> str:
    return f"{nbytes / 2**30:.2f} GiB"


# ---------------------------------------------------------------- CPU


def mem_available(root: str = "/") -> int:
    try:
        for line in _read(root, "proc/meminfo").splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def cgroup_headrooms(root: str = "/") -> list[Headroom]:
    """One Headroom for each memory cgroup with a limit that this process is charged to."""
    try:
        membership = _read(root, "proc/self/cgroup")
    except OSError:
        return []
    found = []
    for version, directory, name in _memory_groups(root, membership):
        limit = _limit(version, directory)
        if limit is None:
            continue
        usage = _read_int(directory, "memory.current" if version == 2 else "memory.usage_in_bytes")
        reclaimable = _stat(directory, "inactive_file" if version == 2 else "total_inactive_file")
        if usage is None:
            continue
        limit_file = "memory.max" if version == 2 else "memory.limit_in_bytes"
        source = f"cgroup v{version} {limit_file} {describe(limit)} ({name})"
        found.append(Headroom(max(0, limit - usage + reclaimable), source))
    return found


def _limit(version: int, directory: str) -> int | None:
    if version == 2:
        try:
            text = _read(directory, "memory.max").strip()
        except OSError:
            return None
        return None if text == "max" else int(text)
    limit = _read_int(directory, "memory.limit_in_bytes")
    return None if limit is None or limit >= UNLIMITED_V1 else limit


@functools.lru_cache(maxsize=8)
def _memory_groups(root: str, membership: str) -> tuple[tuple[int, str, str], ...]:
    """(version, directory, cgroup path) of the process's memory cgroups and their ancestors, the
    innermost first. Cached by the text of /proc/self/cgroup: a process moved to another group
    reads again."""
    mounts = _cgroup_mounts(root)
    groups = []
    for line in membership.splitlines():
        hierarchy, controllers, path = line.split(":", 2)
        version = 2 if hierarchy == "0" and controllers == "" else 1
        if version == 1 and "memory" not in controllers.split(","):
            continue
        mount = mounts.get(version)
        if mount is None:
            continue
        mount_root, mount_point = mount
        relative = os.path.relpath(path, mount_root) if _is_under(path, mount_root) else "."
        parts = [] if relative == "." else relative.split("/")
        for depth in range(len(parts), -1, -1):  # the group, then each ancestor up to the mount
            directory = os.path.join(root, mount_point.lstrip("/"), *parts[:depth])
            name = "/" + "/".join([mount_root.strip("/"), *parts[:depth]]).strip("/")
            if os.path.isdir(directory):
                groups.append((version, directory, name))
    return tuple(groups)


def _cgroup_mounts(root: str) -> dict[int, tuple[str, str]]:
    """{1: (root, mount point) of the v1 memory hierarchy, 2: the same of the v2 hierarchy}."""
    mounts = {}
    try:
        text = _read(root, "proc/self/mountinfo")
    except OSError:
        return mounts
    for line in text.splitlines():
        fields = line.split()
        if "-" not in fields:
            continue
        dash = fields.index("-")
        fstype, options = fields[dash + 1], fields[dash + 3] if len(fields) > dash + 3 else ""
        if fstype == "cgroup2":
            mounts.setdefault(2, (fields[3], fields[4]))
        elif fstype == "cgroup" and "memory" in options.split(","):
            mounts.setdefault(1, (fields[3], fields[4]))
    return mounts


def _is_under(path: str, ancestor: str) -> bool:
    return ancestor == "/" or path == ancestor or path.startswith(ancestor.rstrip("/") + "/")


def _stat(directory: str, key: str) -> int:
    try:
        for line in _read(directory, "memory.stat").splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


def _read_int(directory: str, name: str) -> int | None:
    try:
        return int(_read(directory, name).strip())
    except (OSError, ValueError):
        return None


def _read(directory: str, name: str) -> str:
    with open(os.path.join(directory, name)) as f:
        return f.read()


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


# ---------------------------------------------------------------- CUDA


def cuda_headroom(device: torch.device) -> Headroom:
    free, total = torch.cuda.mem_get_info(device)
    allocated, reserved = torch.cuda.memory_allocated(device), torch.cuda.memory_reserved(device)
    on_device = Headroom(free + reserved - allocated, "CUDA free memory")
    fraction = torch.cuda.get_per_process_memory_fraction(device)
    if fraction >= 1:
        return on_device
    capped = Headroom(
        max(0, int(fraction * total) - allocated),
        f"CUDA per-process memory fraction {fraction:g} of {describe(total)}",
    )
    return min(on_device, capped, key=lambda h: h.free)
