"""Writing under hostile conditions: outputs that are inputs (shards, hard links, symlinks, reports), full
disks, size limits, read-only folders, signals mid-write, two runs racing for one file, the umask."""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

import resize_lora
from library import destination
from library.destination import AtomicFile, Destination, write_text
from library.errors import LoraToolsError
from library.safetensors_io import StreamingWriter, check_output_path, load_tensors, save_tensors
from tests.helpers import ROOT, fingerprints, kohya_lora, safetensors_bytes, temp_files


def sharded(tmp_path):
    folder = tmp_path / "transformer"
    folder.mkdir()
    for i in (1, 2):
        (folder / f"m-0000{i}-of-00002.safetensors").write_bytes(safetensors_bytes({f"w{i}": torch.ones(2)}))
    index = {"weight_map": {"w1": "m-00001-of-00002.safetensors", "w2": "m-00002-of-00002.safetensors"}}
    (folder / "m.safetensors.index.json").write_text(json.dumps(index))
    return folder


# ---- which paths are refused ----------------------------------------------------------------------------

@pytest.mark.parametrize("given_as", ["folder", "index"])
def test_shard_of_a_sharded_input_is_refused_even_with_overwrite(tmp_path, given_as):
    folder = sharded(tmp_path)
    source = folder if given_as == "folder" else folder / "m.safetensors.index.json"
    for victim in ("m-00002-of-00002.safetensors", "m.safetensors.index.json"):
        with pytest.raises(LoraToolsError, match="one of the inputs"):
            check_output_path(folder / victim, [source], overwrite=True)
    assert check_output_path(folder / "new.safetensors", [source])  # a new file beside the shards is fine


def test_hard_link_and_symlinked_folder_of_an_input_are_refused(tmp_path):
    src = tmp_path / "a.safetensors"
    src.write_bytes(safetensors_bytes(kohya_lora()))
    os.link(src, tmp_path / "hard.safetensors")
    (tmp_path / "alias").symlink_to(tmp_path, target_is_directory=True)
    for out in (tmp_path / "hard.safetensors", tmp_path / "alias" / "a.safetensors"):
        with pytest.raises(LoraToolsError, match="one of the inputs"):
            check_output_path(out, [src], overwrite=True)


def test_other_outputs_and_special_files(tmp_path):
    with pytest.raises(LoraToolsError, match="also the --save_to output"):
        Destination(tmp_path / "x.json", flag="--report", other_outputs={"--save_to": tmp_path / "x.json"}).check()
    with pytest.raises(LoraToolsError, match="not a regular file"):
        Destination("/dev/null", overwrite=True).check()


def test_report_paths_fail_before_any_work(tmp_path, capsys, monkeypatch):
    src = tmp_path / "lora.safetensors"
    src.write_bytes(safetensors_bytes(kohya_lora(rank=4)))
    out = tmp_path / "out.safetensors"
    monkeypatch.setattr("library.formats.read_lora", lambda *a, **k: pytest.fail("work started before the checks"))
    before = fingerprints(tmp_path)
    cases = {str(src): "one of the inputs", str(out): "also the --save_to output",
             str(tmp_path / "missing" / "r.json"): "output folder does not exist"}
    for report, needle in cases.items():
        with pytest.raises(SystemExit) as info:
            resize_lora.run_cli(resize_lora.setup_parser, resize_lora.main,
                                ["--model", str(src), "--new_rank", "2", "--save_to", str(out), "--report", report,
                                 "--overwrite", "--device", "cpu"])
        lines = capsys.readouterr().err.strip().splitlines()
        assert info.value.code == 2 and len(lines) == 1 and needle in lines[0] and "--report" in lines[0], lines
    assert fingerprints(tmp_path) == before and not out.exists()


def test_report_is_written_atomically_beside_the_output(tmp_path, capsys):
    src = tmp_path / "lora.safetensors"
    src.write_bytes(safetensors_bytes(kohya_lora(rank=4)))
    out, report = tmp_path / "out.safetensors", tmp_path / "r.json"
    resize_lora.run_cli(resize_lora.setup_parser, resize_lora.main,
                        ["--model", str(src), "--new_rank", "2", "--save_to", str(out), "--report", str(report),
                         "--device", "cpu", "--family", "sd1"])
    data = json.loads(report.read_text())
    assert data["output"] == str(out) and data["layers"][0]["rank_out"] == 2
    assert temp_files(tmp_path) == []


# ---- disks that say no ------------------------------------------------------------------------------------

def _specs(n_bytes: int):
    return {"w": (torch.float32, (n_bytes // 4,))}


def test_enospc_mid_write_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    out = tmp_path / "out.safetensors"

    def full(*_args):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(LoraToolsError) as info:
        with StreamingWriter(out, _specs(4096)) as writer:
            monkeypatch.setattr(writer._file, "write", full)
            # close() must not fail again in the cleanup (a buffered flush hits the full disk too)
            monkeypatch.setattr(writer._file, "close", full)
            writer.write("w", torch.ones(1024))
    msg = str(info.value)
    assert "no space left" in msg and f"{writer.size:,} bytes" in msg and str(out) in msg and "\n" not in msg
    assert os.listdir(tmp_path) == []


def test_free_space_is_checked_before_writing(tmp_path, monkeypatch):
    class Tiny:
        f_bavail = f_bfree = 3
        f_frsize = 4096

    monkeypatch.setattr(destination.os, "statvfs", lambda _folder: Tiny())
    with pytest.raises(LoraToolsError, match=r"needs 40,\d{3} bytes but .* has 12,288 bytes free"):
        save_tensors(tmp_path / "big.safetensors", {"w": torch.zeros(10_000)})
    assert os.listdir(tmp_path) == []


class _ReservedBlocks:
    """A file system whose reserved blocks make f_bfree (157 GB) far larger than what may be written (f_bavail)."""
    f_bfree = 157 * 10**9 // 4096
    f_bavail = 3
    f_frsize = 4096


@pytest.mark.parametrize("euid", [0, 1000])
def test_free_space_is_f_bavail_even_for_root(tmp_path, monkeypatch, euid):
    # ENOSPC was seen as root with f_bfree 157 GB and f_bavail 14 GB: f_bavail is the honest figure for everyone
    monkeypatch.setattr(destination.os, "statvfs", lambda _folder: _ReservedBlocks())
    monkeypatch.setattr(destination.os, "geteuid", lambda: euid, raising=False)
    assert destination.free_bytes(str(tmp_path)) == 3 * 4096
    with pytest.raises(LoraToolsError, match=r"needs 40,\d{3} bytes but .* has 12,288 bytes free"):
        save_tensors(tmp_path / "big.safetensors", {"w": torch.zeros(10_000)})
    full = Destination(tmp_path / "x.safetensors").os_error(OSError(errno.ENOSPC, "No space left on device"), 5000)
    assert "12,288 bytes free now" in str(full)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("code,needle", [(errno.EROFS, "read-only file system"), (errno.EACCES, "permission denied")])
def test_read_only_folder(tmp_path, monkeypatch, code, needle):
    def refuse(*_args, **_kwargs):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(destination.tempfile, "mkstemp", refuse)
    with pytest.raises(LoraToolsError, match=needle):
        save_tensors(tmp_path / "a.safetensors", {"w": torch.ones(2)})
    monkeypatch.undo()
    monkeypatch.setattr(destination.os, "replace", refuse)
    with pytest.raises(LoraToolsError, match=needle):
        save_tensors(tmp_path / "a.safetensors", {"w": torch.ones(2)}, overwrite=True)
    assert os.listdir(tmp_path) == []


def test_not_writable_folder_is_refused_at_check_time(tmp_path, monkeypatch):
    monkeypatch.setattr(destination.os, "access", lambda _path, _mode: False)  # root bypasses chmod; EROFS does not
    with pytest.raises(LoraToolsError, match="cannot create files in the output folder"):
        check_output_path(tmp_path / "x.safetensors")


_LIMITED_WRITE = """
import resource, signal, sys, torch
sys.path.insert(0, {root!r})
from library.cli import run_cli
from library.safetensors_io import save_tensors
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # so the write gets EFBIG instead of the process dying
resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
run_cli(lambda: __import__("argparse").ArgumentParser(prog="w"),
        lambda args: save_tensors({out!r}, {{"w": torch.zeros(100_000)}}), [])
"""


def test_file_size_limit_in_a_real_process(tmp_path):
    out = tmp_path / "out.safetensors"
    proc = subprocess.run([sys.executable, "-c", _LIMITED_WRITE.format(root=ROOT, out=str(out))],
                          capture_output=True, text=True, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "file-size limit" in lines[0] and re.search(r"needs 400,\d{3} bytes", lines[0]) and str(out) in lines[0]
    assert os.listdir(tmp_path) == []


# ---- signals ----------------------------------------------------------------------------------------------

_SLOW_WRITE = """
import sys, time, torch
sys.path.insert(0, {root!r})
from library.cli import run_cli
from library.safetensors_io import StreamingWriter

def main(args):
    specs = {{f"w{{i}}": (torch.float32, (1 << 18,)) for i in range(64)}}  # 64 MiB
    with StreamingWriter({out!r}, specs) as w:
        for key in specs:
            w.write(key, torch.ones(1 << 18))
            print("wrote", key, flush=True)
            time.sleep(0.05)

if {cli}:
    run_cli(lambda: __import__("argparse").ArgumentParser(prog="slow"), main, [])
else:
    main(None)  # as from a notebook: no handler installed by us
"""


def test_signals_mid_write_remove_the_temp_file(tmp_path):
    """SIGTERM, SIGHUP and SIGINT through run_cli, and SIGTERM with no runner (a notebook): each run is
    stopped with its full-size temporary file on disk, and leaves neither it nor an output. The processes
    run side by side to keep the suite fast (each one imports torch)."""
    cases = [(signal.SIGTERM, True, 143), (signal.SIGHUP, True, 129), (signal.SIGINT, True, 130),
             (signal.SIGTERM, False, -signal.SIGTERM)]  # no runner: the signal keeps its default effect
    runs = []
    for i, (signum, cli, status) in enumerate(cases):
        folder = tmp_path / f"run{i}"
        folder.mkdir()
        out = folder / "out.safetensors"
        proc = subprocess.Popen([sys.executable, "-c", _SLOW_WRITE.format(root=ROOT, out=str(out), cli=cli)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        runs.append((proc, folder, out, signum, cli, status))
    for proc, folder, _out, signum, _cli, _status in runs:
        for _ in range(3):
            assert proc.stdout.readline().startswith("wrote")
        assert len(temp_files(folder)) == 1  # mid-write: the full-size temporary file exists
        proc.send_signal(signum)
    for proc, folder, out, signum, cli, status in runs:
        _stdout, err = proc.communicate(timeout=120)
        lines = err.strip().splitlines()
        assert proc.returncode == status, (signum, cli, err)
        if cli:
            assert len(lines) == 1 and "no output was written" in lines[0], err
        assert not out.exists() and temp_files(folder) == [], (signum, cli)


def test_keyboard_interrupt_in_a_notebook_removes_the_temp_file(tmp_path):
    out = tmp_path / "out.safetensors"
    with pytest.raises(KeyboardInterrupt):
        with StreamingWriter(out, _specs(64)) as w:
            w.write("w", torch.ones(16))
            raise KeyboardInterrupt
    assert os.listdir(tmp_path) == []


def test_stale_temp_files_are_named(tmp_path, capsys):
    stale = tmp_path / ".tmp-out.safetensors-abc123"
    stale.write_bytes(b"\0" * 16)
    save_tensors(tmp_path / "out.safetensors", {"w": torch.ones(2)})
    err = capsys.readouterr().err
    assert str(stale) in err and "earlier run" in err
    assert stale.exists()  # named, not deleted: another run may still be writing it


# ---- races and modes --------------------------------------------------------------------------------------

@pytest.mark.parametrize("mover", ["renameat2", "link", "rename"])
def test_two_writers_cannot_both_win(tmp_path, monkeypatch, mover):
    if mover != "renameat2":
        monkeypatch.setattr(destination, "_renameat2", None)
    if mover == "rename":
        def no_links(*_args):
            raise OSError(errno.EPERM, "Operation not permitted")
        monkeypatch.setattr(destination.os, "link", no_links)
    out = tmp_path / "out.safetensors"
    both_written = threading.Barrier(2)
    results: dict[int, object] = {}

    def run(value: int):
        try:
            with StreamingWriter(out, _specs(4096)) as w:  # both pass the check: out does not exist yet
                w.write("w", torch.full((1024,), float(value)))
                both_written.wait(timeout=30)
                if mover == "rename" and value == 1:
                    time.sleep(0.2)  # without links the check-then-rename has a window; keep the runs apart
            results[value] = "wrote"
        except LoraToolsError as exc:
            results[value] = exc

    threads = [threading.Thread(target=run, args=(v,)) for v in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    winners = [v for v, r in results.items() if r == "wrote"]
    losers = [r for r in results.values() if isinstance(r, LoraToolsError)]
    assert len(winners) == 1 and len(losers) == 1 and "appeared while this run was writing" in str(losers[0])
    assert float(load_tensors(out)[0]["w"][0]) == winners[0]  # the winner's file, not a mix or a replacement
    assert temp_files(tmp_path) == []


def test_output_gets_the_umask_not_0600(tmp_path):
    old = os.umask(0o027)
    try:
        save_tensors(tmp_path / "a.safetensors", {"w": torch.ones(2)})
        write_text(tmp_path / "r.json", "{}")
    finally:
        os.umask(old)
    assert os.stat(tmp_path / "a.safetensors").st_mode & 0o777 == 0o640
    assert os.stat(tmp_path / "r.json").st_mode & 0o777 == 0o640


def test_atomic_text_writer_refuses_like_the_tensor_writer(tmp_path):
    src = tmp_path / "in.safetensors"
    src.write_bytes(b"x")
    with pytest.raises(LoraToolsError, match="one of the inputs"):
        write_text(src, "{}", inputs=[src], overwrite=True, flag="--report")
    assert src.read_bytes() == b"x"
    with pytest.raises(LoraToolsError, match="output exists"):
        write_text(src, "{}")
    with AtomicFile(Destination(tmp_path / "t.txt"), size=3) as f:
        f.write(b"abc")
    assert (tmp_path / "t.txt").read_bytes() == b"abc" and temp_files(tmp_path) == []



def test_a_write_after_another_threads_disk_error_repeats_that_error(tmp_path):
    """Workers write side by side: once one hit a full disk (and the temp is gone), every later write on any
    thread gets the same one-line error, never "I/O operation on closed file"."""
    class FullDisk:
        def __init__(self, real):
            self.real = real

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.real, name)

    t = torch.zeros(8)
    with pytest.raises(LoraToolsError) as first:
        with StreamingWriter(tmp_path / "o.safetensors", {"a": (t.dtype, t.shape), "b": (t.dtype, t.shape)}) as w:
            w._file = FullDisk(w._file)
            with pytest.raises(LoraToolsError) as worker:
                w.write("a", t)
            assert "no space left" in str(worker.value)
            w.write("b", t)  # the other thread, a moment later
    assert first.value is worker.value
    assert os.listdir(tmp_path) == []
