"""training.cpu_allocator: what glibc malloc does with freed tensor memory (lathe/host_memory.py).

Measured on the real C library in fresh processes (the setting is process-wide and cannot be
undone): a training step frees and reallocates the same large buffers, and each page of a buffer
that went back to the kernel faults again on its first write."""

import json
import platform
import subprocess
import sys

import pytest

from lathe import host_memory

# allocate, fill and free a 64 MiB tensor (above glibc's largest mmap threshold) over and over, as a
# training step does with its activations; report the minor page faults of the last rounds. With
# memory retained, the first rounds still grow the heap (PyTorch asks for 64-byte-aligned blocks,
# which a freed block of exactly the old size cannot serve until free neighbours merge with it), then
# it settles (measured: faults in rounds 0 and 2-4, none from round 9 on; 8 blocks in all).
PROBE = """
import json, resource, sys, torch
from lathe import host_memory
host_memory.configure(sys.argv[1], sys.argv[2])
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for i in range(16):
    if i == 12:
        start = faults()
    t = torch.empty(16 * 2**20)  # float32: 64 MiB
    t.fill_(1.0)
    del t
print(json.dumps({"faults": faults() - start}))
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the setting acts on glibc's malloc only")
def test_retain_stops_page_faults_on_recycled_tensor_memory():
    cases = {("retain", "cpu"), ("system", "cpu"), ("retain", "cuda")}
    procs = {case: subprocess.Popen([sys.executable, "-c", PROBE, *case], stdout=subprocess.PIPE, text=True)
             for case in cases}
    faults = {}
    for case, proc in procs.items():
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, case
        faults[case] = json.loads(out.strip().splitlines()[-1])["faults"]
    # four rounds of 64 MiB: 65,536 pages of 4 KiB, each faulted again unless the memory was kept
    assert faults[("system", "cpu")] > 10_000, faults
    assert faults[("retain", "cuda")] > 10_000, faults  # only CPU runs change malloc
    assert faults[("retain", "cpu")] < 100, faults


def test_retain_says_why_where_the_c_library_is_not_glibc(monkeypatch, caplog):
    monkeypatch.setattr(platform, "libc_ver", lambda *a, **k: ("", ""))
    with caplog.at_level("INFO", logger="lathe"):
        host_memory.configure("retain", "cpu")
    assert "malloc left as it is: the C library here is not glibc" in caplog.text
    assert "training.cpu_allocator" in caplog.text
