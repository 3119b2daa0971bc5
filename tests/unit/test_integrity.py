"""Checkpoint checksums computed while DCP writes equal those of the file read back, whatever the
sizes of the pieces written (chunk boundaries crossed inside a write, many tiny writes)."""

import os
import random

import pytest

from lathe.checkpoint import integrity


@pytest.mark.parametrize("max_piece", [1, 700, 2500, 50_000])
@pytest.mark.parametrize("background", [False, True], ids=["inline", "background"])
def test_streamed_checksums_equal_read_back(tmp_path, monkeypatch, max_piece, background):
    monkeypatch.setattr(integrity, "CHUNK", 1000)  # small chunks: many boundaries
    if background:  # pieces from 2,000 bytes up go to the checksum thread, smaller ones queue behind
        monkeypatch.setattr(integrity._ChecksummingStream, "BACKGROUND", 2000)
    fs = integrity.ChecksummingFileSystem()
    data = os.urandom(12_345)
    rng = random.Random(max_piece)
    with fs.create_stream(tmp_path / "x.distcp", "wb") as stream:
        i = 0
        while i < len(data):
            k = rng.randint(1, max_piece)
            stream.write(memoryview(data[i:i + k]) if k % 2 else data[i:i + k])
            i += k
    entry = fs.entries["x.distcp"]
    assert entry == integrity.file_entry(tmp_path / "x.distcp")
    assert entry["size"] == len(data) and len(entry["crc32"]) == 13
