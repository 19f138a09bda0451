# The lock cache's timer while the coordinator is unreachable.
#
# SPDX-License-Identifier: GPL-2.0-or-later
# Copyright (c) 2026 The extlock authors

import time

from harness import procs as hp
from harness.coordinator import coordinator_status


IDLE_MS = 1000


def held(daemon, lock_space):
    for sp in coordinator_status(daemon.address)["lock-spaces"]:
        if sp["name"] == lock_space:
            return [h["client-id"] for h in sp["held"]]
    return []


def session_active(daemon, client_id):
    return any(s["client-id"] == client_id and s["state"] == "active"
               for s in coordinator_status(daemon.address)["sessions"])


def test_idle_ageing_while_disconnected(extlockd, lock_space, procs,
                                        binaries):
    """A cached idle lock whose lock-cache-idle-time runs out while the
    connection is down cannot be given back then.  The cache timer must
    not re-arm itself in the past for it (timerlist_run_timers() then calls
    it again at once, for ever: the node's AioContext - here qemu-io's main
    loop - hangs at 100 % CPU and never reconnects), and once reconnected
    the lock must age out and be given back."""
    binaries("qemu-io", "extlockd")
    node = hp.extlock_node({"driver": "null-co", "size": 1 << 20},
                           extlockd.coordinator(), lock_space,
                           client_id="host-0", min_hold_time=0,
                           lock_cache_idle_time=IDLE_MS)
    qio = procs.qemu_io(node, name="qio")
    out = qio.cmd("write 0 4k")
    assert "wrote 4096/4096" in out, out
    parked = time.monotonic()
    extlockd.kill()                 # the lock stays cached, idle
    # Its idle time runs out while disconnected (the lease, extlockd's
    # default, lasts well beyond): the main loop must keep answering.
    while time.monotonic() < parked + 3 * IDLE_MS / 1000:
        qio.cmd("help", timeout=5)
    # Reconnected (same state file: the session resumes with the lock),
    # the lock, idle for long, goes back to the coordinator
    extlockd.start()
    hp.wait_until(lambda: session_active(extlockd, "host-0"),
                  timeout=20, what="the session resumed")
    hp.wait_until(lambda: held(extlockd, lock_space) == [],
                  timeout=IDLE_MS / 1000 + 10,
                  what="the aged idle lock given back after reconnecting")
    qio.cmd("help", timeout=5)
