"""Memory accounting helpers against hand counts."""
import torch
from torch import nn

from lqlr.util.memory import (
    module_memory_mb,
    peak_rss_mb,
    reset_peak_rss,
    rss_mb,
    rss_parts_mb,
)


def test_module_memory_counts_trainable_frozen_and_tied_once():
    emb = nn.Embedding(100, 8)  # 800 fp32 = 3200 bytes
    head = nn.Linear(8, 100, bias=False)
    head.weight = emb.weight  # tied: counted once
    lora = nn.Linear(8, 4, bias=False)  # 32 fp32 trainable = 128 bytes
    model = nn.ModuleDict({"emb": emb, "head": head, "lora": lora})
    model.register_buffer("codes", torch.zeros(1000, dtype=torch.uint8))  # 1000 bytes
    emb.weight.requires_grad_(False)
    mem = module_memory_mb(model)
    assert mem["frozen"] * 2**20 == 3200 + 1000
    assert mem["trainable"] * 2**20 == 128


def test_peak_rss_sees_a_large_allocation_after_reset():
    reset_peak_rss()
    base = rss_mb()
    x = torch.ones(64 * 2**20 // 4)  # 64 MiB touched
    assert peak_rss_mb() >= base + 60
    del x


def _mapping_rss_mb(path) -> float:
    """Resident MiB of this process's mappings of ``path``, from /proc/self/smaps (exact: a page-table walk)."""
    import os

    name, total, mine = os.path.realpath(path), 0, False
    for line in open("/proc/self/smaps"):
        head = line.split(maxsplit=5)
        if "-" in head[0]:  # a mapping's first line: address range, perms, offset, device, inode, path
            mine = len(head) == 6 and head[5].rstrip("\n") == name
        elif mine and head[0] == "Rss:":
            total += int(head[1])
    return total / 1024


def test_rss_parts_split_heap_from_mapped_files(tmp_path):
    """64 MiB of touched tensor memory shows in ``anon`` (not ``file``), 64 MiB of touched mmapped file pages
    in ``file``. The process-wide counters also move with what the rest of the process does, so each
    comparison is between two samples with nothing else in between: heap blocks that earlier tests freed are
    handed back first (else the tensor reuses their resident pages and RssAnon does not grow), the garbage
    collector is held off (it could unmap an earlier test's mmapped weights mid-test), and the file pages are
    counted as the difference across the munmap that drops exactly them."""
    import gc
    import mmap

    path = tmp_path / "blob"
    path.write_bytes(b"\1" * 64 * 2**20)
    reset_peak_rss()  # gc.collect() and malloc_trim(0): freed heap pages go back to the OS
    gc.disable()
    try:
        before = rss_parts_mb()
        x = torch.ones(64 * 2**20 // 4)  # 64 MiB of heap, touched
        heap = rss_parts_mb()
        del x
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            for _ in range(3):  # memory pressure may reclaim some of the page cache: touch again
                assert sum(m[i] for i in range(0, len(m), 4096)) == len(m) // 4096  # every page read
                resident = _mapping_rss_mb(path)
                mapped = rss_parts_mb()
                if resident >= 63:
                    break
        unmapped = rss_parts_mb()  # just after the munmap
    finally:
        gc.enable()
    assert before["file"] > 0  # the interpreter's and torch's code at least
    assert heap["anon"] >= before["anon"] + 60 and heap["file"] < before["file"] + 30, (before, heap)
    assert resident >= 63, f"only {resident:.1f} of the 64 MiB mapped stayed resident"
    assert mapped["file"] >= unmapped["file"] + 60, (mapped, unmapped, resident)
    assert abs(mapped["anon"] - unmapped["anon"]) < 30, (mapped, unmapped)  # not counted as heap


def test_mmap_threshold_returns_freed_blocks_to_the_os():
    import subprocess
    import sys

    # in a child process: the setting is process-wide and would slow the rest of the suite
    code = """
import ctypes, torch
from lqlr.util.memory import rss_mb, set_mmap_threshold
try:
    ctypes.CDLL("libc.so.6").mallopt
except (OSError, AttributeError):
    raise SystemExit(0)  # not glibc: nothing to set
assert set_mmap_threshold(128)
base = rss_mb()
for _ in range(8):
    x = torch.ones(32 * 2**20 // 4)  # 32 MiB, touched, then freed
    del x
grew = rss_mb() - base
assert grew < 16, grew  # each freed block went back to the OS (an mmapped block is unmapped on free)
"""
    subprocess.run([sys.executable, "-c", code], check=True)
