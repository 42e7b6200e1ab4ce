"""library.writeback: the writer queues its dirty pages for the disk as it goes, and the file is unchanged by it."""

import torch

import library.writeback as writeback
from library.safetensors_io import StreamingWriter, load_tensors


def test_writer_queues_writeback_every_so_many_bytes_and_the_file_is_the_same(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(writeback, "EVERY_BYTES", 4096)
    monkeypatch.setattr(writeback, "_sync_file_range", lambda fd, off, n, flags: calls.append((off, n, flags)) or 0)
    tensors = {f"layer.{i}.weight": torch.randn(32, 32) for i in range(6)}  # 4 KiB each in float32
    src = tmp_path / "src.safetensors"
    with StreamingWriter(src, {k: (v.dtype, v.shape) for k, v in tensors.items()}) as w:
        for k, v in tensors.items():
            w.write(k, v)
    assert len(calls) == 6 and all(c == (0, 0, 2) for c in calls)  # SYNC_FILE_RANGE_WRITE, whole file
    calls.clear()
    out = tmp_path / "out.safetensors"
    with StreamingWriter(out, {k: (v.dtype, v.shape) for k, v in tensors.items()}) as w:  # copied, chunked
        from library.safetensors_io import LazyReader

        with LazyReader(src) as r:
            keys = list(tensors)
            for k in keys[:3]:
                r.copy_into(w, k)
            for k in keys[3:]:
                flat = tensors[k].reshape(-1)
                w.write_flat(k, 0, flat[:512])
                w.write_flat(k, 512, flat[512:])
    assert len(calls) == 6
    got, _ = load_tensors(out)
    assert all(torch.equal(got[k], tensors[k]) for k in tensors)


def test_no_sync_file_range_means_plain_writes(tmp_path, monkeypatch):
    monkeypatch.setattr(writeback, "_sync_file_range", None)
    t = torch.arange(10, dtype=torch.float32)
    with StreamingWriter(tmp_path / "a.safetensors", {"x": (t.dtype, t.shape)}) as w:
        w.write("x", t)
    assert torch.equal(load_tensors(tmp_path / "a.safetensors")[0]["x"], t)


def test_the_real_call_is_found_on_linux():
    import sys

    if sys.platform.startswith("linux"):
        assert writeback._sync_file_range is not None

