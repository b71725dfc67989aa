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


def test_rss_parts_split_heap_from_mapped_files(tmp_path):
    import mmap

    before = rss_parts_mb()
    assert before["file"] > 0  # the interpreter's and torch's code at least
    x = torch.ones(64 * 2**20 // 4)  # 64 MiB of heap, touched
    heap = rss_parts_mb()
    assert heap["anon"] >= before["anon"] + 60 and heap["file"] < before["file"] + 30
    del x
    path = tmp_path / "blob"
    path.write_bytes(b"\1" * 64 * 2**20)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        assert sum(m[i] for i in range(0, len(m), 4096)) == len(m) // 4096  # every page read
        mapped = rss_parts_mb()
    assert mapped["file"] >= heap["file"] + 60


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
