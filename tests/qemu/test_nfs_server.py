"""The loopback NFS server the QEMU tests run on (no extlock involved).

SPDX-License-Identifier: GPL-2.0-or-later
Copyright (c) 2026 The extlock authors

These check the test environment itself first, so that an NFS problem is
reported as such and not as a driver failure: nfs-ganesha serves the export
over NFSv3 on 127.0.0.1, data written on either side is visible on the
other, a second server is refused with a clear message, and QEMU's own nfs
driver (without extlock) can use an image on the export.
"""

import os
import subprocess

import pytest

from harness import procs as hp
from harness.ganesha import NfsServer, NfsServerError, find_processes


def test_local_file_readable_over_nfs(nfs):
    data = os.urandom(300000)
    path = nfs.export_dir / "local-written.bin"
    path.write_bytes(data)
    try:
        ls = nfs.ls()
        assert ls.returncode == 0, ls.stderr
        assert "local-written.bin" in ls.stdout
        cat = subprocess.run(["nfs-cat", nfs.url("local-written.bin")],
                             capture_output=True, timeout=30)
        assert cat.returncode == 0, cat.stderr
        assert cat.stdout == data
    finally:
        path.unlink(missing_ok=True)


def test_nfs_written_file_visible_locally(nfs, workdir):
    src = workdir / "src.bin"
    data = os.urandom(3 * 1024 * 1024 + 123)
    src.write_bytes(data)
    dst = nfs.export_dir / "nfs-written.bin"
    try:
        cp = subprocess.run(["nfs-cp", str(src), nfs.url("nfs-written.bin")],
                            capture_output=True, text=True, timeout=60)
        assert cp.returncode == 0, cp.stderr
        assert dst.read_bytes() == data
        st = dst.stat()
        assert st.st_uid == 0, "No_Root_Squash: files created by root stay root's"
    finally:
        dst.unlink(missing_ok=True)


def test_missing_path_is_an_error(nfs):
    ls = nfs.ls(f"nfs://127.0.0.1{nfs.nfs_path}-does-not-exist")
    assert ls.returncode != 0


def test_second_server_refused(nfs):
    """Only one ganesha can serve 127.0.0.1:2049: a second start fails
    clearly, and the running one is not disturbed."""
    other = NfsServer()
    try:
        with pytest.raises(NfsServerError, match="already running"):
            other.start()
    finally:
        other.cleanup()
    assert nfs.running()
    assert find_processes("ganesha.nfsd") == [nfs._ganesha.pid]
    assert nfs.ls().returncode == 0


def test_qemu_img_and_io_plain_nfs(nfs, binaries):
    """QEMU's nfs driver alone (no extlock) works against the export."""
    binaries("qemu-img", "qemu-io")
    name = "plain-qemu.raw"
    path = nfs.export_dir / name
    try:
        r = hp.run_qemu_img("create", "-f", "raw", nfs.url(name), "16M")
        assert r.returncode == 0, r.stderr
        assert path.stat().st_size == 16 * 1024 * 1024
        r = hp.run_qemu_img("info", "--output=json", nfs.url(name))
        assert r.returncode == 0, r.stderr
        assert '"virtual-size": 16777216' in r.stdout
        child = hp.nfs_child(path)
        r = hp.run_qemu_io(child, ["write -P 0x5a 1M 2M", "read -P 0x5a 1M 2M",
                                      "read -P 0 0 1M"])
        assert r.returncode == 0, r.stdout + r.stderr
        data = path.read_bytes()
        assert data[:1 << 20] == bytes(1 << 20)
        assert data[1 << 20:3 << 20] == b"\x5a" * (2 << 20)
    finally:
        path.unlink(missing_ok=True)
