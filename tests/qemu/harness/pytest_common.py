"""What the pytest suites of extlock (tests/qemu, tests/libvirt, tests/ha)
share in their conftest.py files.

SPDX-License-Identifier: GPL-2.0-or-later
Copyright (c) 2026 The extlock authors

A conftest imports the hook and calls the helpers from its fixtures:

  from harness.pytest_common import pytest_runtest_makereport  # noqa: F401
  install_sigterm_teardown()        # in pytest_configure
  yield from kept_workdir(request, "xlq-", "extlock tests")
  yield from started_nfs(max_io=...)
"""

import shutil
import signal
import tempfile
from pathlib import Path

import pytest

from .ganesha import NfsServer, NfsServerError


def _terminate_gracefully(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def install_sigterm_teardown():
    """pytest runs fixture teardowns on Ctrl-C (KeyboardInterrupt) but not
    on SIGTERM (e.g. from `timeout`): treat SIGTERM like Ctrl-C so that the
    NFS server and every other process a test started are still stopped."""
    signal.signal(signal.SIGTERM, _terminate_gracefully)


@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Remember each phase's report on the item (for workdir cleanup)."""
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)


def call_failed(request):
    """True if the test of this fixture request failed in its call phase."""
    rep = getattr(request.node, "rep_call", None)
    return rep is not None and rep.failed


def kept_workdir(request, prefix, label):
    """A fresh short directory in /tmp (UNIX socket paths must stay below
    108 bytes), removed after a passing test, kept and named after a
    failure."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    yield path
    if call_failed(request):
        print(f"\n[{label}] logs kept in {path}")
    else:
        shutil.rmtree(path, ignore_errors=True)


def started_nfs(**kw):
    """The loopback NFS export (NfsServer(**kw)), stopped at teardown; a
    server that does not start fails the test with its reason."""
    srv = NfsServer(**kw)
    try:
        srv.start()
    except NfsServerError as e:
        srv.cleanup()
        pytest.fail(f"cannot start the loopback NFS server: {e}", pytrace=False)
    try:
        yield srv
    finally:
        srv.cleanup()
