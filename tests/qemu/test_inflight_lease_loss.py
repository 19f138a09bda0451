"""A write still in flight below the extlock node when the lease is lost.

SPDX-License-Identifier: GPL-2.0-or-later
Copyright (c) 2026 The extlock authors

The other lease tests stop or cut off a node only while it has no I/O in
flight.  Here the node has: host A (qemu-system-x86_64, HMP qemu-io on a
drive extlock -> raw -> blkdebug -> image) writes 0xaa to [0, 64 KiB), and
a blkdebug breakpoint holds that write below the extlock node - A holds the
exclusive lock, the write has not reached the image.  Then A's link to the
coordinator is cut (harness.faults.TcpPartition) for longer than its lease
plus the coordinator's fence margin.  The coordinator expires A's session
and host B (a plain protocol client) takes an exclusive lock on the range
and writes 0xbb there.  The link heals.

Safety: A's held write must never land after B's grant.  A node cannot
take back a request it has passed to its child, so the only safe way out
is the driver's `on-stuck-io=exit` (docs/qemu-driver.rst): when a request
forwarded to the child is still running shortly before the coordinator may
release the node's locks, the process exits (like sanlock's watchdog).
The test checks exactly that: A is gone before B's grant, and B's data is
still there after the heal and after the breakpoint would have released
the write.

The control runs the same scene with `on-stuck-io=report` (or, with a
driver that does not have the option yet, the driver as it is): A
survives, its next request on the range queues behind B (the coordinator
shows A waiting, blocked by B), and when the breakpoint releases the held
write, it lands on top of B's data while B holds the lock - which the same
check reports.
"""

import time

import pytest

from harness import procs as hp
from harness.coordinator import (CoordinatorClient, coordinator_status,
                                 release_after_fresh_renewal)
from harness.faults import TcpPartition, check_coordinator, node_info, start_coordinator
from harness.procs import extlock_node, wait_until

KiB = 1024
LEASE, FENCE = 2000, 1000
A_DATA, B_DATA = 0xaa, 0xbb


def driver_knows(option, value, coordinator, lock_space, image):
    """Whether the extlock driver accepts an option (probed with qemu-io)."""
    node = extlock_node(image.child, coordinator, lock_space,
                        client_id="probe", **{option: value})
    r = hp.run_qemu_io(node, ["read -q 0 512"], timeout=60)
    return r.returncode == 0


def waiting_behind(daemon, lock_space, client, holder):
    st = coordinator_status(daemon.address)
    for sp in st["lock-spaces"]:
        if sp["name"] == lock_space:
            return [w for w in sp["waiting"]
                    if w["client-id"] == client and holder in w["blocked-by"]]
    return []


@pytest.mark.parametrize("mode", ["exit", "report"], ids=["on-stuck-io-exit",
                                                         "control-report"])
def test_held_write_never_lands_after_regrant(mode, request, local_image, procs, lock_space,
                                              binaries):
    binaries("extlockd", "qemu-system-x86_64", "qemu-io")
    d = start_coordinator(procs, fence_margin_ms=FENCE)
    link = TcpPartition(d.tcp_port)
    try:
        supported = driver_knows("on_stuck_io", "report", d.coordinator(), lock_space,
                                 local_image)
        opts = {}
        if supported:
            opts["on_stuck_io"] = mode
        elif mode == "exit":
            request.node.add_marker(pytest.mark.xfail(
                strict=True, reason="fixed on h-driver: on-stuck-io=exit (the driver "
                "here has no bound on I/O in flight after a lease loss)"))
        drive = hp.dotted(extlock_node(hp.blkdebug_child(local_image.child),
                                       link.coordinator(), lock_space, node_name="xla",
                                       client_id="host-a", lease_time=LEASE,
                                       lock_cache=False, **opts))
        vm = procs.qemu_system(name="a", extra_args=["-drive", f"if=none,id=drva,{drive}"])

        def io(cmd):
            out = vm.qmp.hmp(f'qemu-io drva "{cmd}"')
            assert "error" not in out.lower() and "failed" not in out.lower(), out
            return out

        io("break write_aio hold")
        io(f"aio_write -P {A_DATA:#x} 0 64k")
        io("wait_break hold")
        held = node_info(vm.qmp, "xla")["held"]
        assert [(h["offset"], h["length"], h["mode"]) for h in held] == \
            [(0, 64 * KiB, "exclusive")], held

        # cut right after the coordinator renewed A's lease: no other
        # renewal is on its way, the coordinator's deadline for A is final
        release = release_after_fresh_renewal(d.address, "host-a", LEASE)
        link.cut()
        with CoordinatorClient(d.address, timeout=(LEASE + FENCE) / 1000 + 15) as b:
            b.hello("host-b", lock_space, lease_ms=60000)
            g = b.lock(0, 128 * KiB, "exclusive")         # waits for A's expiry
            t_grant = time.monotonic()
            a_gone_at_grant = not vm.alive()
            # B, holding the lock, writes the range
            with open(local_image.path, "r+b") as f:
                f.write(bytes([B_DATA]) * 128 * KiB)
                f.flush()
            # the coordinator's own deadline for A plus its fence margin
            # (B's reply comes after the grant)
            assert t_grant >= release, \
                f"B was granted {release - t_grant:.3f} s before A's lease + margin"
            link.heal()

            if mode == "exit":
                # fenced: A exited before the coordinator let B in
                assert a_gone_at_grant, (
                    "A was still running when B was granted the range its held "
                    "write is for:\n" + vm.stderr())
                assert vm.proc.returncode != 0
                assert local_image.path.read_bytes()[:128 * KiB] == \
                    bytes([B_DATA]) * 128 * KiB
                b.unlock(g["lock"])
                b.bye()
                return

            # the control: A survived; its next request in B's range (next
            # to the held write: a request overlapping it would wait for it
            # locally first) queues behind B
            assert vm.alive(), vm.stderr()
            wait_until(lambda: node_info(vm.qmp, "xla")["state"] == "active",
                       timeout=20, what="A to start a new session after the heal")
            io("aio_write -P 0xa2 64k 4k")
            wait_until(lambda: waiting_behind(d, lock_space, "host-a", "host-b"),
                       timeout=15, what="A's next write to queue behind B")
            # the held write is released: it lands although B holds the lock
            io("resume hold")
            wait_until(lambda: local_image.path.read_bytes()[:64 * KiB]
                       != bytes([B_DATA]) * 64 * KiB,
                       timeout=15, what="A's held write to land")
            data = local_image.path.read_bytes()[:128 * KiB]
            assert data[64 * KiB:] == bytes([B_DATA]) * 64 * KiB, \
                "A's queued write went through while B held the range"
            b.unlock(g["lock"])
            b.bye()
        # the check the protected run passes: B's data intact while B held the lock
        assert data[:64 * KiB] != bytes([B_DATA]) * 64 * KiB, \
            "the control should see B's data overwritten"
        assert data[:64 * KiB] == bytes([A_DATA]) * 64 * KiB
        wait_until(lambda: local_image.path.read_bytes()[64 * KiB:68 * KiB]
                   == b"\xa2" * 4 * KiB, timeout=15,
                   what="A's queued write to complete once B unlocked")
    finally:
        link.close()
        check_coordinator(d)
