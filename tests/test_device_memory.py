"""The readers of what this process may still take (`mst_fx.runtime.device_memory`), on fake /proc
and cgroup trees for cgroup v1 and v2, and on faked CUDA calls: the limit that binds is the one
read, and it says which it is."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mst_fx.runtime import device_memory
from mst_fx.runtime.device_memory import Headroom, cgroup_headrooms, headroom

GiB = 1 << 30
MEMINFO = "MemTotal:       24000000 kB\nMemFree:        20000000 kB\nMemAvailable:   {kb} kB\n"
V1_MOUNTS = (
    "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n"
    "35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory\n"
    "36 31 0:33 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu\n"
    "41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n"
)
V2_MOUNTS = "29 23 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate\n"


def _tree(root: Path, files: dict[str, str]) -> str:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return str(root)


def _meminfo(available: int) -> str:
    return MEMINFO.format(kb=available // 1024)


def test_v1_limit_binds_below_mem_available(tmp_path):
    """A 3 GiB container on a host with 20 GiB available: the container's limit is what is read."""
    group = "sys/fs/cgroup/memory/pod/job"
    root = _tree(tmp_path, {
        "proc/meminfo": _meminfo(20 * GiB),
        "proc/self/cgroup": "9:cpu:/\n4:memory:/pod/job\n0::/\n",
        "proc/self/mountinfo": V1_MOUNTS,
        f"{group}/memory.limit_in_bytes": str(3 * GiB),
        f"{group}/memory.usage_in_bytes": str(2 * GiB),
        f"{group}/memory.stat": "cache 100\ninactive_file 7\ntotal_inactive_file 256\n",
        "sys/fs/cgroup/memory/pod/memory.limit_in_bytes": "9223372036854771712",  # no limit: skipped
        "sys/fs/cgroup/memory/pod/memory.usage_in_bytes": str(5 * GiB),
    })  # fmt: skip
    room = headroom(torch.device("cpu"), root)
    assert room.free == GiB + 256  # limit - usage + the hierarchy's inactive file cache
    assert room.source == "cgroup v1 memory.limit_in_bytes 3.00 GiB (/pod/job)"


def test_v1_an_ancestor_limit_binds_when_tighter(tmp_path):
    root = _tree(tmp_path, {
        "proc/meminfo": _meminfo(20 * GiB),
        "proc/self/cgroup": "4:memory:/pod/job\n",
        "proc/self/mountinfo": V1_MOUNTS,
        "sys/fs/cgroup/memory/pod/job/memory.limit_in_bytes": str(8 * GiB),
        "sys/fs/cgroup/memory/pod/job/memory.usage_in_bytes": str(1 * GiB),
        "sys/fs/cgroup/memory/pod/memory.limit_in_bytes": str(4 * GiB),
        "sys/fs/cgroup/memory/pod/memory.usage_in_bytes": str(3 * GiB),  # a sibling job uses 2 GiB of it
    })  # fmt: skip
    assert [h.free for h in cgroup_headrooms(root)] == [7 * GiB, 1 * GiB]
    assert headroom(torch.device("cpu"), root) == Headroom(GiB, "cgroup v1 memory.limit_in_bytes 4.00 GiB (/pod)")


def test_v2_limit_and_max_means_none(tmp_path):
    root = _tree(tmp_path, {
        "proc/meminfo": _meminfo(20 * GiB),
        "proc/self/cgroup": "0::/kubepods/pod1/ctr\n",
        "proc/self/mountinfo": V2_MOUNTS,
        "sys/fs/cgroup/kubepods/pod1/ctr/memory.max": "max\n",
        "sys/fs/cgroup/kubepods/pod1/ctr/memory.current": str(GiB),
        "sys/fs/cgroup/kubepods/pod1/memory.max": f"{3 * GiB}\n",
        "sys/fs/cgroup/kubepods/pod1/memory.current": str(2 * GiB),
        "sys/fs/cgroup/kubepods/pod1/memory.stat": "anon 1\nfile 5\ninactive_file 4096\nactive_file 9\n",
    })  # fmt: skip
    room = headroom(torch.device("cpu"), root)
    assert room == Headroom(GiB + 4096, "cgroup v2 memory.max 3.00 GiB (/kubepods/pod1)")


def test_v2_inside_a_cgroup_namespace(tmp_path):
    """In a container with its own cgroup namespace the process sees itself at "/", and the
    container's group is the mount itself."""
    root = _tree(tmp_path, {
        "proc/meminfo": _meminfo(20 * GiB),
        "proc/self/cgroup": "0::/\n",
        "proc/self/mountinfo": V2_MOUNTS,
        "sys/fs/cgroup/memory.max": str(2 * GiB),
        "sys/fs/cgroup/memory.current": str(GiB // 2),
    })  # fmt: skip
    assert headroom(torch.device("cpu"), root) == Headroom(GiB + GiB // 2, "cgroup v2 memory.max 2.00 GiB (/)")


def test_a_bind_mounted_group_resolves_to_the_mount(tmp_path):
    """Docker's v1 layout: /proc/self/cgroup names the host's path, the mount's root is that path."""
    mounts = "35 31 0:32 /docker/abc /sys/fs/cgroup/memory ro,nosuid - cgroup cgroup rw,memory\n"
    root = _tree(tmp_path, {
        "proc/meminfo": _meminfo(20 * GiB),
        "proc/self/cgroup": "4:memory:/docker/abc\n",
        "proc/self/mountinfo": mounts,
        "sys/fs/cgroup/memory/memory.limit_in_bytes": str(3 * GiB),
        "sys/fs/cgroup/memory/memory.usage_in_bytes": str(GiB),
    })  # fmt: skip
    assert headroom(torch.device("cpu"), root) == Headroom(2 * GiB, "cgroup v1 memory.limit_in_bytes 3.00 GiB (/docker/abc)")


def test_mem_available_binds_without_a_limit(tmp_path):
    root = _tree(tmp_path, {
        "proc/meminfo": _meminfo(5 * GiB),
        "proc/self/cgroup": "4:memory:/pod\n0::/\n",
        "proc/self/mountinfo": V1_MOUNTS,
        "sys/fs/cgroup/memory/pod/memory.limit_in_bytes": str(16 * GiB),
        "sys/fs/cgroup/memory/pod/memory.usage_in_bytes": str(GiB),
    })  # fmt: skip
    assert headroom(torch.device("cpu"), root) == Headroom(5 * GiB, "MemAvailable")


def test_no_cgroup_files_at_all(tmp_path):
    root = _tree(tmp_path, {"proc/meminfo": _meminfo(3 * GiB)})
    assert cgroup_headrooms(root) == []
    assert headroom(torch.device("cpu"), root) == Headroom(3 * GiB, "MemAvailable")


def test_this_machine_reads_something_true():
    """On the machine the tests run on: a figure no larger than MemAvailable, from a named source."""
    room = headroom(torch.device("cpu"))
    assert 0 <= room.free <= device_memory.mem_available()
    assert room.source == "MemAvailable" or room.source.startswith("cgroup v")


# ---------------------------------------------------------------- CUDA, its calls faked


@pytest.fixture
def fake_cuda(monkeypatch):
    def on(free: int, total: int, allocated: int, reserved: int, fraction: float):
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, total))
        monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: allocated)
        monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: reserved)
        monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda device=None: fraction)

    return on


def test_cuda_free_memory_counts_the_allocator_cache(fake_cuda):
    fake_cuda(free=10 * GiB, total=80 * GiB, allocated=30 * GiB, reserved=34 * GiB, fraction=1.0)
    assert headroom(torch.device("cuda", 0)) == Headroom(14 * GiB, "CUDA free memory")


def test_cuda_per_process_fraction_binds(fake_cuda):
    """`set_per_process_memory_fraction(0.5)` on an 80 GiB device with 60 GiB free: the allocator
    refuses past 40 GiB, so 30 GiB allocated leaves 10 GiB, not the device's 60 + its cache."""
    fake_cuda(free=60 * GiB, total=80 * GiB, allocated=30 * GiB, reserved=32 * GiB, fraction=0.5)
    assert headroom(torch.device("cuda", 0)) == Headroom(10 * GiB, "CUDA per-process memory fraction 0.5 of 80.00 GiB")


def test_cuda_device_binds_below_a_loose_fraction(fake_cuda):
    """Another process took most of the device: its free memory binds, not the fraction."""
    fake_cuda(free=2 * GiB, total=80 * GiB, allocated=10 * GiB, reserved=10 * GiB, fraction=0.9)
    assert headroom(torch.device("cuda", 0)) == Headroom(2 * GiB, "CUDA free memory")
