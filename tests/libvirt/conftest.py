"""pytest fixtures for extlock's libvirt tests (tests/libvirt).

SPDX-License-Identifier: GPL-2.0-or-later
Copyright (c) 2026 The extlock authors

  libvirtd   (module) a private libvirtd 9.0 with lock_manager="lockd" and
             virtlockd, see libvirt_harness.py; another libvirt with
             EXTLOCK_LIBVIRT_PREFIX=DIR (tests/libvirt/fetch-libvirt.sh)
  nfs        (module) the loopback NFS export (tests/qemu/harness/ganesha.py)
  guest      (session) the tiny test guest (contrib/guest/build-guest.sh)
  extlock_virt  the path of the extlock-virt binary

Run as root inside scripts/isolate.sh (the NFS server binds 127.0.0.1:2049):
  scripts/isolate.sh /usr/bin/python3 -m pytest -v tests/libvirt
test_extlock_virt.py alone needs neither root nor libvirtd.
"""

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO / "tests" / "qemu"))

from harness import procs as procs_mod                 # noqa: E402
from harness.pytest_common import (  # noqa: E402,F401
    install_sigterm_teardown, kept_workdir, pytest_runtest_makereport,
    started_nfs)
from libvirt_harness import Libvirtd, LibvirtError, LIBVIRTD, PREFIX  # noqa: E402


def pytest_configure(config):
    # fixture teardowns (libvirtd, NFS server) also on SIGTERM from timeout(1)
    install_sigterm_teardown()


@pytest.fixture(scope="session")
def extlock_virt():
    path = Path(os.environ.get("EXTLOCK_VIRT") or
                procs_mod.build_dir() / "contrib" / "extlock-virt" / "extlock-virt")
    if not os.access(path, os.X_OK):
        pytest.fail(f"extlock-virt not built: {path} (ninja -C build)",
                    pytrace=False)
    return str(path)


@pytest.fixture
def workdir(request):
    yield from kept_workdir(request, "xlv-", "extlock libvirt tests")


@pytest.fixture(scope="module")
def libvirtd():
    if os.geteuid() != 0:
        pytest.fail("the libvirt tests run libvirtd in system mode: run as root",
                    pytrace=False)
    if not os.access((PREFIX or "") + LIBVIRTD, os.X_OK):
        pytest.fail(f"{LIBVIRTD} missing: scripts/install-deps.sh installs "
                    "libvirt-daemon", pytrace=False)
    root = Path(tempfile.mkdtemp(prefix="xlv-libvirt-", dir="/tmp"))
    daemon = Libvirtd(root)
    try:
        daemon.start()
        print(f"\n[extlock libvirt tests] libvirtd {daemon.version()}"
              f"{' from ' + PREFIX if PREFIX else ''}", flush=True)
    except LibvirtError as e:
        daemon.stop()
        pytest.fail(f"cannot start libvirtd: {e}", pytrace=False)
    try:
        yield daemon
    finally:
        daemon.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def nfs():
    yield from started_nfs(max_io=64 * 1024)


@pytest.fixture(scope="session")
def guest():
    """(kernel, initrd) of the test guest, built once and cached."""
    res = subprocess.run(["bash", str(REPO / "contrib" / "guest" / "build-guest.sh"),
                          "--quiet"], capture_output=True, text=True,
                         stdin=subprocess.DEVNULL)
    if res.returncode != 0:
        pytest.fail(f"building the guest failed: {res.stderr}", pytrace=False)
    paths = dict(line.split("=", 1) for line in res.stdout.splitlines()
                 if "=" in line)
    return paths["KERNEL"], paths["INITRD"]


@pytest.fixture
def procs(workdir):
    group = procs_mod.ProcessGroup(workdir)
    try:
        yield group
    finally:
        group.stop_all()
