"""The extlock driver against a hostile coordinator.

SPDX-License-Identifier: GPL-2.0-or-later
Copyright (c) 2026 The extlock authors

A coordinator is trusted with locks, not with the QEMU process: whatever
it answers must not make the driver touch anything but its own
connection.  The hostile coordinator here is a small TCP server in the
test that answers every "hello" like an HA follower, with a "not-leader"
error whose "leader" it chooses (docs/protocol.rst, "High
availability").  Real qemu-storage-daemon, real extlockd (for the leader
that may be followed), local image files.
"""

import json
import os
import socket
import threading

from harness.faults import NbdClient
from harness.procs import extlock_node

MiB = 1024 * 1024


class HostileFollower:
    """Answers each hello with {"code":"not-leader","leader": LEADER}."""

    def __init__(self, leader):
        self.leader = leader        # a string, or a function returning one
        self.named = []
        self.hellos = 0
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.stopping = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def coordinator(self):
        return {"type": "inet", "host": "127.0.0.1", "port": str(self.port)}

    def _serve(self):
        while not self.stopping:
            try:
                conn, _ = self.sock.accept()
            except (socket.timeout, OSError):
                continue
            with conn:
                conn.settimeout(5.0)
                buf = b""
                try:
                    while b"\n" not in buf and len(buf) < 65536:
                        data = conn.recv(4096)
                        if not data:
                            break
                        buf += data
                    req = json.loads(buf.split(b"\n")[0])
                except (OSError, ValueError):
                    continue
                self.hellos += 1
                leader = self.leader() if callable(self.leader) else self.leader
                self.named.append(leader)
                reply = {"type": "error", "id": req.get("id", 0),
                         "code": "not-leader", "message": "not the leader",
                         "leader": leader}
                try:
                    conn.sendall(json.dumps(reply).encode() + b"\n")
                    conn.recv(1)        # until the driver hangs up
                except OSError:
                    pass

    def close(self):
        self.stopping = True
        self.thread.join(10)
        self.sock.close()


def fd_of(pid, path):
    """The fd number of @pid that is open on @path (None if none is)."""
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") == str(path):
                return int(fd)
        except OSError:
            pass
    return None


def pid_with_socket(path):
    """The pid of the process whose command line names @path."""
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if str(path).encode() in f.read():
                    return int(pid)
        except OSError:
            pass
    return None


def test_not_leader_redirect_to_fd_is_not_followed(local_image, lock_space,
                                                   extlockd, procs, workdir,
                                                   binaries):
    """A follower that names "fd:N" as the leader, N being the fd on which
    the process has the image open at that moment.  Handing that to
    socket_connect() (outside a monitor command N is a plain fd number)
    makes QEMU close fd N since it is no socket: the next socket - the
    connection to the real coordinator, listed second - then gets that
    number, and the file node's I/O goes to the coordinator.  The driver
    must not follow such a leader (it traces
    extlock_client_leader_refused instead): the node opens through the second address, the image stays open, and
    data written through the node is in the image file."""
    binaries("qemu-storage-daemon")
    qmp_path = workdir / "qsd" / "qmp.sock"

    def image_fd_now():
        pid = pid_with_socket(qmp_path)
        fd = fd_of(pid, local_image.path) if pid else None
        return f"fd:{fd}"

    file_node = dict(local_image.child, **{"node-name": "img0"})
    hostile = HostileFollower(image_fd_now)
    try:
        node = extlock_node("img0", None, lock_space, node_name="xl0",
                            client_id="host-a/victim")
        del node["coordinator"]
        node["coordinators"] = [hostile.coordinator(),
                                extlockd.coordinator(inet=True)]
        qsd = procs.storage_daemon(
            name="qsd", blockdevs=[file_node, node],
            exports=[("disk", "xl0", True)])
    finally:
        hostile.close()
    assert hostile.hellos >= 1 and hostile.named[0] != "fd:None", \
        hostile.named
    image_fd = int(hostile.named[0][3:])
    assert fd_of(qsd.proc.pid, local_image.path) is not None, \
        f"the image (fd {image_fd} when the follower answered) is no " \
        f"longer open after a not-leader answer naming {hostile.named[0]}"
    with NbdClient(qsd.nbd_path, "disk") as n:
        n.write(0, b"\x5a" * 65536)
        assert n.read(0, 65536) == b"\x5a" * 65536
    with open(local_image.path, "rb") as f:
        assert f.read(65536) == b"\x5a" * 65536
    assert qsd.alive()


def test_not_leader_redirect_to_inet_leader_is_followed(local_image, lock_space,
                                                        extlockd, procs,
                                                        binaries):
    """The same kind of answer naming a real inet leader is followed: the
    node opens through the leader (what HA clients rely on)."""
    binaries("qemu-storage-daemon")
    hostile = HostileFollower(f"tcp:127.0.0.1:{extlockd.tcp_port}")
    try:
        node = extlock_node(local_image.child, hostile.coordinator(),
                            lock_space, node_name="xl0",
                            client_id="host-a/follow")
        qsd = procs.storage_daemon(name="qsd", blockdevs=[node])
        info = qsd.qmp.execute("query-named-block-nodes", flat=True)
        assert any(n["node-name"] == "xl0" for n in info), info
    finally:
        hostile.close()
    assert hostile.hellos >= 1
