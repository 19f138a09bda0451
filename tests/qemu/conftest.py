"""pytest fixtures for extlock's QEMU-level tests.

SPDX-License-Identifier: GPL-2.0-or-later
Copyright (c) 2026 The extlock authors

  nfs          (session) a loopback nfs-ganesha export, see harness/ganesha.py
  workdir      a short private directory (UNIX socket paths must stay below
               108 bytes); removed after a passing test, kept after a failure
  procs        ProcessGroup: every server started through it is stopped at
               teardown, whatever the test's outcome
  extlockd     a fresh coordinator (UNIX socket + TCP on 127.0.0.1)
  image        a 64 MiB raw image, parametrised: on the NFS export and local
  nfs_image / local_image   the same, one location only
  lock_space   a lock-space name unique to the test

Run from the repository root:  /usr/bin/python3 -m pytest -v tests/qemu
The builds must exist (build/ for extlockd, build/qemu-10.0 for QEMU, or
EXTLOCK_QEMU_BUILD=build/qemu for QEMU 7.2); see docs/testing.rst.
"""

import sys
import uuid
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import procs as procs_mod            # noqa: E402
from harness.pytest_common import (  # noqa: E402,F401
    install_sigterm_teardown, kept_workdir, pytest_runtest_makereport,
    started_nfs)

IMAGE_SIZE = 64 * 1024 * 1024


def pytest_configure(config):
    install_sigterm_teardown()


# The export's largest READ/WRITE (ganesha's MaxRead/MaxWrite; its default
# is 1 MiB).  libnfs splits larger requests into several RPCs that ganesha
# runs in parallel: with 256 KiB, every 1 MiB extent of the concurrency
# tests is four RPCs, so without extlock those writes can and do
# interleave (their controls assert it).
NFS_MAX_IO = 256 * 1024


@pytest.fixture(scope="session")
def nfs():
    """The loopback NFS export, started once per test session."""
    yield from started_nfs(max_io=NFS_MAX_IO)


@pytest.fixture
def workdir(request):
    yield from kept_workdir(request, "xlq-", "extlock tests")


@pytest.fixture
def procs(workdir):
    group = procs_mod.ProcessGroup(workdir)
    try:
        yield group
    finally:
        group.stop_all()


@pytest.fixture
def binaries():
    """Fail clearly (not skip) when a needed build is missing."""
    def need(*names):
        missing = None
        try:
            return [procs_mod.binary(n) for n in names]
        except procs_mod.MissingBinary as e:
            missing = str(e)
        pytest.fail(missing, pytrace=False)
    return need


@pytest.fixture
def extlockd(procs, binaries):
    """A fresh coordinator with --debug-checks (it aborts when an invariant
    of its lock table breaks).  After the test it must still be running -
    unless the test killed it - and exit cleanly on SIGTERM."""
    binaries("extlockd")
    daemon = procs.extlockd(tcp=True)
    yield daemon
    if daemon.killed:
        return
    assert daemon.alive(), f"extlockd died during the test:\n{daemon.stderr()}"
    status = daemon.stop()
    assert status == 0, f"extlockd exited with {status}:\n{daemon.stderr()}"
    assert "invariant broken" not in daemon.stderr(), daemon.stderr()


@pytest.fixture
def lock_space():
    return f"test-{uuid.uuid4().hex[:12]}"


class Image:
    """A raw image file; `child` are the blockdev options to open it."""

    def __init__(self, kind, local_path, child, url=None):
        self.kind = kind
        self.path = Path(local_path)
        self.child = child
        self.url = url

    def __repr__(self):
        return f"<Image {self.kind} {self.path}>"


def _make_raw(path, size=IMAGE_SIZE):
    with open(path, "wb") as f:
        f.truncate(size)


@pytest.fixture
def nfs_image(nfs):
    name = f"img-{uuid.uuid4().hex[:10]}.raw"
    path = nfs.export_dir / name
    _make_raw(path)
    yield Image("nfs", path, procs_mod.nfs_child(path), nfs.url(name))
    path.unlink(missing_ok=True)


@pytest.fixture
def local_image(workdir):
    path = workdir / "local.raw"
    _make_raw(path)
    return Image("local", path, procs_mod.file_child(path))


@pytest.fixture(params=["nfs", "local"])
def image(request):
    """The same test once on the NFS export and once on a local file."""
    return request.getfixturevalue(f"{request.param}_image")
