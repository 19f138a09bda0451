"""The extlock block driver in real QEMU binaries: data path and options.

SPDX-License-Identifier: GPL-2.0-or-later
Copyright (c) 2026 The extlock authors

Every test runs real qemu-io / qemu-storage-daemon binaries from the QEMU
build against a real extlockd; images live on the loopback NFS export
(QEMU's nfs driver) and on a local file (the file driver).
"""

import socket

import pytest

from harness import procs as hp
from harness.coordinator import CoordinatorClient, CoordinatorError, coordinator_status
from harness.procs import extlock_node, run_qemu_io, wait_until

MiB = 1024 * 1024


def sessions_of(extlockd, lock_space):
    return [s for s in coordinator_status(extlockd.address)["sessions"]
            if s["lock-space"] == lock_space]


# ---------------------------------------------------------------------------
# data path

@pytest.mark.parametrize("lock_cache", [False, True], ids=["nocache", "cache"])
def test_qemu_io_round_trip(lock_cache, image, extlockd, lock_space, binaries):
    """Pattern writes through extlock land in the image and read back."""
    binaries("qemu-io")
    node = extlock_node(image.child, extlockd.coordinator(), lock_space,
                        node_name="xl0", client_id="writer", lock_cache=lock_cache)
    r = run_qemu_io(node, [
        "write -P 0xab 0 64k",
        "write -P 0xcd 1M 3M",           # several granules
        "write -P 0x11 4095 10",         # unaligned, straddles two granules
        "write -z 8M 1M",                # write-zeroes
        "write -P 0x77 9M 1M",
        "discard 9M 1M",                 # must not fail (content unspecified)
        "flush",
    ])
    assert r.returncode == 0, r.stdout + r.stderr
    assert "error" not in (r.stdout + r.stderr).lower(), r.stdout + r.stderr

    # read back through a second extlock process
    node["client-id"] = "reader"
    r = run_qemu_io(node, [
        "read -P 0xab 0 4095",
        "read -P 0x11 4095 10",
        "read -P 0xab 4105 61431",
        "read -P 0 64k 960k",
        "read -P 0xcd 1M 3M",
        "read -P 0 8M 1M",
    ])
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Pattern verification failed" not in r.stdout

    # and directly from the file the NFS server exports
    data = image.path.read_bytes()
    assert data[0:4095] == b"\xab" * 4095
    assert data[4095:4105] == b"\x11" * 10
    assert data[1 * MiB:4 * MiB] == b"\xcd" * (3 * MiB)
    assert data[8 * MiB:9 * MiB] == bytes(MiB)


def test_qemu_io_wrong_pattern_is_detected(image, extlockd, lock_space, binaries):
    """Sanity check of the checker: a wrong expected pattern fails."""
    binaries("qemu-io")
    node = extlock_node(image.child, extlockd.coordinator(), lock_space)
    r = run_qemu_io(node, ["write -P 0x42 0 64k", "read -P 0x43 0 64k"])
    assert r.returncode != 0
    assert "Pattern verification failed" in r.stdout


def test_inet_coordinator(image, extlockd, lock_space, binaries):
    """coordinator.type=inet (TCP on 127.0.0.1) works like unix."""
    binaries("qemu-io")
    node = extlock_node(image.child, extlockd.coordinator(inet=True), lock_space)
    r = run_qemu_io(node, ["write -P 0x3c 2M 256k", "read -P 0x3c 2M 256k"])
    assert r.returncode == 0, r.stdout + r.stderr
    assert image.path.read_bytes()[2 * MiB:2 * MiB + 256 * 1024] == b"\x3c" * (256 * 1024)


def test_dotted_image_opts_string(nfs_image, extlockd, lock_space, binaries):
    """The documented command line form, written out by hand.  (QEMU 7.2's
    nfs driver does not parse an nfs:// URL given as file.filename with
    --image-opts, so the child is given as server + path.)"""
    binaries("qemu-io")
    opts = (f"driver=extlock,lock-space={lock_space},coordinator.type=unix,"
            f"coordinator.path={extlockd.socket_path},file.driver=nfs,"
            f"file.server.type=inet,file.server.host=127.0.0.1,"
            f"file.path={nfs_image.path}")
    r = run_qemu_io(opts, ["write -P 0x5e 0 128k", "read -P 0x5e 0 128k"])
    assert r.returncode == 0, r.stdout + r.stderr
    assert nfs_image.path.read_bytes()[:128 * 1024] == b"\x5e" * (128 * 1024)


def test_qemu_img_convert_into_and_compare(image, extlockd, lock_space, workdir,
                                           binaries):
    """qemu-img writes through an extlock target node (--target-image-opts)
    and reads through one (--image-opts) like through any other node."""
    binaries("qemu-img")
    src = workdir / "src.raw"
    with open(src, "wb") as f:
        f.truncate(64 * MiB)
        for i in range(0, 64, 3):
            f.seek(i * MiB + 1000)
            f.write(bytes([i + 1]) * (300 * 1024))
    node = extlock_node(image.child, extlockd.coordinator(), lock_space,
                        client_id="qemu-img")
    r = hp.run_qemu_img("convert", "-n", "-f", "raw", str(src),
                        "--target-image-opts", hp.dotted(node))
    assert r.returncode == 0, r.stdout + r.stderr
    assert image.path.read_bytes() == src.read_bytes()
    r = hp.run_qemu_img("compare", "--image-opts",
                        hp.dotted(dict(node, **{"client-id": "cmp"})),
                        f"driver=file,filename={src}")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Images are identical" in r.stdout
    r = hp.run_qemu_img("info", "--output=json", "--image-opts", hp.dotted(node))
    assert r.returncode == 0, r.stdout + r.stderr
    assert '"virtual-size": 67108864' in r.stdout


def test_storage_daemon_round_trip(image, extlockd, lock_space, procs, binaries):
    """qemu-storage-daemon with an extlock node exported over NBD: I/O of an
    NBD client goes through extlock; query-extent-locks reports the node."""
    binaries("qemu-storage-daemon", "qemu-io")
    qsd = procs.storage_daemon(
        blockdevs=[extlock_node(image.child, extlockd.coordinator(), lock_space,
                                node_name="xl0", client_id="qsd-a",
                                granularity=65536, lease_time=5000,
                                lock_cache=False)],
        exports=[("disk", "xl0", True)])
    nbd = qsd.nbd_opts("disk")
    r = run_qemu_io(nbd, ["write -P 0x21 0 1M", "write -P 0x22 100k 8k",
                          "read -P 0x21 0 100k", "read -P 0x22 100k 8k",
                          "read -P 0x21 108k 916k"])
    assert r.returncode == 0, r.stdout + r.stderr

    info = qsd.qmp.execute("query-extent-locks")
    assert len(info) == 1
    n = info[0]
    assert n["node-name"] == "xl0"
    assert n["lock-space"] == lock_space
    assert n["client-id"] == "qsd-a"
    assert n["coordinator"] == f"unix:{extlockd.socket_path}"
    assert n["connected"] is True
    assert n["state"] == "active"
    assert n["lock-cache"] is False
    assert isinstance(n["session"], str) and n["session"]
    assert n["granularity"] == 65536
    assert n["lease-time"] == 5000
    assert 0 < n["lease-remaining"] <= 5000
    assert n["held"] == [] and n["waiting"] == []   # nothing in flight
    c = n["counters"]
    assert c["requests"] >= 5
    assert c["grants"] == c["requests"]
    assert c["waits"] == 0 and c["errors"] == 0
    assert c["cache-hits"] == 0 and c["revocations"] == 0
    assert c["lease-losses"] == 0

    # the coordinator sees the same session
    sess = sessions_of(extlockd, lock_space)
    assert [s["client-id"] for s in sess] == ["qsd-a"]
    assert sess[0]["session"] == n["session"]
    assert sess[0]["state"] == "active"

    assert image.path.read_bytes()[:100 * 1024] == b"\x21" * (100 * 1024)

    # node-name filter and error cases
    only = qsd.qmp.execute("query-extent-locks", {"node-name": "xl0"})
    assert [x["node-name"] for x in only] == ["xl0"]
    e = qsd.qmp.execute_error("query-extent-locks", {"node-name": "nope"})
    assert "Cannot find node 'nope'" in e.desc
    file_node = [x["node-name"] for x in qsd.qmp.execute("query-named-block-nodes")
                 if x["drv"] in ("file", "nfs")][0]
    e = qsd.qmp.execute_error("query-extent-locks", {"node-name": file_node})
    assert "is not an extlock node" in e.desc


def test_default_client_id(local_image, extlockd, lock_space, procs, binaries):
    """Without client-id the node calls itself <host name>/<node name>."""
    binaries("qemu-storage-daemon")
    qsd = procs.storage_daemon(blockdevs=[
        extlock_node(local_image.child, extlockd.coordinator(), lock_space,
                     node_name="shared0")])
    info = qsd.qmp.execute("query-extent-locks", {"node-name": "shared0"})
    assert info[0]["client-id"] == f"{socket.gethostname()}/shared0"
    assert info[0]["granularity"] == 4096
    assert [s["client-id"] for s in sessions_of(extlockd, lock_space)] == \
        [f"{socket.gethostname()}/shared0"]


# ---------------------------------------------------------------------------
# blockdev-add / blockdev-del

def node_names(qmp):
    return sorted(n["node-name"] for n in qmp.execute("query-named-block-nodes"))


def test_blockdev_add_del(image, extlockd, lock_space, procs, binaries):
    binaries("qemu-storage-daemon", "qemu-io")
    qsd = procs.storage_daemon()
    child = dict(image.child, **{"node-name": "img0"})
    qsd.qmp.execute("blockdev-add", child)
    assert node_names(qsd.qmp) == ["img0"]

    qsd.qmp.execute("blockdev-add", extlock_node(
        "img0", extlockd.coordinator(), lock_space, node_name="xl0",
        client_id="hot-added"))
    assert node_names(qsd.qmp) == ["img0", "xl0"]
    info = qsd.qmp.execute("query-extent-locks")
    assert [(n["node-name"], n["connected"]) for n in info] == [("xl0", True)]
    assert [s["client-id"] for s in sessions_of(extlockd, lock_space)] == ["hot-added"]

    # I/O through the hot-added node (NBD export added over QMP)
    nbd_path = qsd.workdir / "hot.sock"
    qsd.qmp.execute("nbd-server-start",
                    {"addr": {"type": "unix", "data": {"path": str(nbd_path)}}})
    qsd.qmp.execute("block-export-add", {"type": "nbd", "id": "e0",
                                         "node-name": "xl0", "writable": True})
    nbd = {"driver": "nbd", "export": "xl0",
           "server": {"type": "unix", "path": str(nbd_path)}}
    r = run_qemu_io(nbd, ["write -P 0x6b 512k 512k", "read -P 0x6b 512k 512k"])
    assert r.returncode == 0, r.stdout + r.stderr
    c = qsd.qmp.execute("query-extent-locks")[0]["counters"]
    assert c["grants"] >= 1 and c["requests"] + c["cache-hits"] >= 2, c
    qsd.qmp.execute("block-export-del", {"id": "e0"})
    ev = qsd.qmp.wait_event("BLOCK_EXPORT_DELETED", timeout=10)
    assert ev["data"]["id"] == "e0"
    assert qsd.qmp.execute("query-block-exports") == []

    qsd.qmp.execute("blockdev-del", {"node-name": "xl0"})
    assert node_names(qsd.qmp) == ["img0"]
    assert qsd.qmp.execute("query-extent-locks") == []
    # closing the node ends its coordinator session ("bye")
    wait_until(lambda: not sessions_of(extlockd, lock_space), 5,
               what="session end after blockdev-del")
    assert image.path.read_bytes()[512 * 1024:MiB] == b"\x6b" * (512 * 1024)

    # a second node can be added again with the same name afterwards
    qsd.qmp.execute("blockdev-add", extlock_node(
        "img0", extlockd.coordinator(), lock_space, node_name="xl0"))
    assert node_names(qsd.qmp) == ["img0", "xl0"]
    qsd.qmp.execute("blockdev-del", {"node-name": "xl0"})
    qsd.qmp.execute("blockdev-del", {"node-name": "img0"})
    assert node_names(qsd.qmp) == []


# ---------------------------------------------------------------------------
# bad options: every one rejected with its message, no node left behind

BAD_OPTIONS = [
    # (id, change to the options, expected message)
    ("no-lock-space", {"lock-space": None}, "Parameter 'lock-space' is missing"),
    ("empty-lock-space", {"lock-space": ""}, "lock-space must not be empty"),
    ("long-lock-space", {"lock-space": "x" * 257},
     "lock-space must be at most 256 bytes long"),
    ("empty-client-id", {"client-id": ""}, "client-id must not be empty"),
    ("granularity-not-pow2", {"granularity": 1000},
     "granularity must be a power of two between 512 and 1073741824"),
    ("granularity-small", {"granularity": 256},
     "granularity must be a power of two between 512 and 1073741824"),
    ("granularity-zero", {"granularity": 0},
     "granularity must be a power of two between 512 and 1073741824"),
    ("granularity-2G", {"granularity": 2 * 1024 * MiB},
     "granularity must be a power of two between 512 and 1073741824"),
    ("lease-small", {"lease-time": 99}, "lease-time must be between 100 and 3600000"),
    ("lease-zero", {"lease-time": 0}, "lease-time must be between 100 and 3600000"),
    ("lease-big", {"lease-time": 3600001},
     "lease-time must be between 100 and 3600000"),
    ("no-coordinator", {"coordinator": None},
     "Either 'coordinator' or 'coordinators' is required"),
    # the list form (HA coordinators): exclusive with the single one,
    # not empty (qemu-io's dotted options cannot say an empty list: it is
    # no list at all there), each address checked and named
    ("coordinator-and-list", {"coordinators": ["valid"]},
     "'coordinator' and 'coordinators' are mutually exclusive"),
    ("coordinators-empty", {"coordinator": None, "coordinators": []},
     ("Either 'coordinator' or 'coordinators' is required",
      "'coordinators' must not be empty")),
    ("coordinators-bad-member",
     {"coordinator": None, "coordinators": ["valid", {"type": "carrier-pigeon"}]},
     ("Invalid coordinators[1] address: Parameter 'type' does not accept value "
      "'carrier-pigeon'", "does not accept value 'carrier-pigeon'")),
    ("coordinators-all-unreachable",
     {"coordinator": None, "coordinators": ["missing-socket", "closed-port"]},
     "Failed to connect to extlock coordinator"),
    ("coordinator-no-socket", {"coordinator": "missing-socket"},
     "Failed to connect to extlock coordinator"),
    ("coordinator-closed-port", {"coordinator": "closed-port"},
     "Failed to connect to extlock coordinator"),
    ("cache-size-zero", {"lock-cache-size": 0},
     "lock-cache-size must be between 1 and 1000000"),
    ("cache-size-big", {"lock-cache-size": 1000001},
     "lock-cache-size must be between 1 and 1000000"),
    ("cache-idle-zero", {"lock-cache-idle-time": 0},
     "lock-cache-idle-time must be between 1 and"),
    ("min-hold-big", {"min-hold-time": 10000001},
     "min-hold-time must be at most 10000000 us"),
    # the schema's own checks: the same message from qemu-io (the driver
    # parses its options with a QAPI visitor) and from blockdev-add
    ("on-lease-loss-bogus", {"on-lease-loss": "bogus"},
     "Parameter 'on-lease-loss' does not accept value 'bogus'"),
    ("on-stuck-io-bogus", {"on-stuck-io": "bogus"},
     "Parameter 'on-stuck-io' does not accept value 'bogus'"),
    # (qemu-io's options are strings, QMP's are typed: the messages differ)
    ("granularity-not-a-size", {"granularity": "big"},
     ("Parameter 'granularity' expects size",
      "Parameter 'granularity' expects uint64")),
    ("lease-not-a-number", {"lease-time": "soon"},
     ("Parameter 'lease-time' expects integer",
      "Parameter 'lease-time' expects uint64")),
    ("lock-cache-not-bool", {"lock-cache": "maybe"},
     ("Parameter 'lock-cache' expects 'on' or 'off'",
      "Invalid parameter type for 'lock-cache', expected: boolean")),
    ("lock-cache-contended-not-bool", {"lock-cache-contended": "maybe"},
     ("Parameter 'lock-cache-contended' expects 'on' or 'off'",
      "Invalid parameter type for 'lock-cache-contended', expected: boolean")),
    ("unknown-option", {"lock-spaces": "typo"},
     "Parameter 'lock-spaces' is unexpected"),
    # (QMP checks the address before the driver sees it, and names the
    # member without its path)
    ("coordinator-bad-type", {"coordinator": {"type": "carrier-pigeon"}},
     ("Invalid coordinator address: Parameter 'type' does not accept value "
      "'carrier-pigeon'", "Parameter 'type' does not accept value 'carrier-pigeon'")),
    ("tls-hostname-alone", {"tls-hostname": "coord.example"},
     "'tls-hostname' needs 'tls-creds'"),
]


def expected(message, interface):
    """The message for "qemu-io" or "qmp" (a pair where they differ)."""
    if isinstance(message, tuple):
        return message[0] if interface == "qemu-io" else message[1]
    return message


def _bad_node(image, extlockd, lock_space, change, workdir):
    node = extlock_node(image.child, extlockd.coordinator(), lock_space,
                        node_name="bad0")
    def address(value):
        if value == "missing-socket":
            return hp.unix_coordinator(workdir / "no-such.sock")
        if value == "closed-port":
            return hp.inet_coordinator(hp.free_tcp_port())
        if value == "valid":
            return extlockd.coordinator()
        return value

    for key, value in change.items():
        if key == "coordinator":
            value = address(value)
        elif key == "coordinators":
            value = [address(v) for v in value]
        if value is None:
            node.pop(key)
        else:
            node[key] = value
    return node


@pytest.mark.parametrize("change,message", [b[1:] for b in BAD_OPTIONS],
                         ids=[b[0] for b in BAD_OPTIONS])
def test_bad_options_qemu_io(change, message, local_image, extlockd, lock_space,
                             workdir, binaries):
    binaries("qemu-io")
    node = _bad_node(local_image, extlockd, lock_space, change, workdir)
    r = run_qemu_io(node, ["read 0 4k"])
    assert r.returncode == 1, r.stdout + r.stderr
    assert expected(message, "qemu-io") in r.stderr, r.stderr
    assert "read 4096/4096" not in r.stdout
    assert not sessions_of(extlockd, lock_space)


@pytest.mark.parametrize("change,message", [b[1:] for b in BAD_OPTIONS],
                         ids=[b[0] for b in BAD_OPTIONS])
def test_bad_options_blockdev_add(change, message, local_image, extlockd,
                                  lock_space, workdir, procs, binaries):
    binaries("qemu-storage-daemon")
    qsd = procs.storage_daemon()
    qsd.qmp.execute("blockdev-add", dict(local_image.child, **{"node-name": "img0"}))
    before = node_names(qsd.qmp)
    node = _bad_node(local_image, extlockd, lock_space, change, workdir)
    node["file"] = "img0"
    message = expected(message, "qmp")
    e = qsd.qmp.execute_error("blockdev-add", node)
    assert message in e.desc, e.desc
    assert node_names(qsd.qmp) == before
    assert qsd.qmp.execute("query-extent-locks") == []
    assert not sessions_of(extlockd, lock_space)
    # with an inline child, the child node must not survive either
    node["file"] = dict(local_image.child, **{"node-name": "inline0"})
    e = qsd.qmp.execute_error("blockdev-add", node)
    assert message in e.desc, e.desc
    assert node_names(qsd.qmp) == before


def test_bad_options_storage_daemon_command_line(local_image, extlockd, lock_space,
                                                 procs, binaries):
    """A bad --blockdev makes qemu-storage-daemon exit with the message."""
    binaries("qemu-storage-daemon")
    node = extlock_node(local_image.child, extlockd.coordinator(), lock_space,
                        node_name="xl0", granularity=3000)
    qsd = procs.add(hp.StorageDaemon(procs.workdir / "bad", blockdevs=[node],
                                     expect_failure=True)).start()
    assert qsd.wait_exit() == 1
    assert "granularity must be a power of two between 512 and 1073741824" in qsd.stderr()


def test_coordinator_refuses_hello(local_image, extlockd, procs, binaries):
    """A hello the coordinator refuses (a lock-space name with a control
    character) fails the open with the coordinator's own message."""
    binaries("qemu-storage-daemon")
    bad_space = "bad\x01space"
    # what does the coordinator itself say to such a hello?
    with CoordinatorClient(extlockd.address) as c:
        with pytest.raises(CoordinatorError) as refused:
            c.hello("probe", bad_space)
    assert refused.value.message
    qsd = procs.storage_daemon()
    e = qsd.qmp.execute_error("blockdev-add", extlock_node(
        local_image.child, extlockd.coordinator(), bad_space, node_name="xl0"))
    assert "coordinator refused the session" in e.desc, e.desc
    assert refused.value.message in e.desc, e.desc
    assert node_names(qsd.qmp) == []


def test_wrong_server_as_coordinator(local_image, procs, lock_space, binaries):
    """Pointing coordinator at a socket that is not extlockd (here: a QMP
    monitor, which greets with a JSON object of its own) fails clearly."""
    binaries("qemu-storage-daemon", "qemu-io")
    other_mon = procs.workdir / "other-qmp.sock"
    qsd = procs.storage_daemon(extra_args=[
        "--chardev", f"socket,id=mon2,path={other_mon},server=on,wait=off",
        "--monitor", "chardev=mon2"])
    assert qsd.alive()
    node = extlock_node(local_image.child, hp.unix_coordinator(other_mon), lock_space)
    r = run_qemu_io(node, ["read 0 4k"], timeout=120)
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"extlock coordinator at unix:{other_mon}: " in r.stderr, r.stderr
    # QMP's greeting is JSON but no extlock message
    assert ("bad message from coordinator" in r.stderr or
            "unexpected answer to hello from coordinator" in r.stderr), r.stderr


def test_options_table_matches_schema():
    """docs/qemu-driver.rst's options table is what
    scripts/driver-options-doc.py generates from the QAPI schema and the
    driver's reopen list, and every option has its own entry."""
    import subprocess
    import sys
    from pathlib import Path
    script = Path(__file__).resolve().parents[2] / "scripts" / "driver-options-doc.py"
    r = subprocess.run([sys.executable, str(script), "--check"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_granularity_is_a_size(local_image, extlockd, lock_space, binaries):
    """granularity is a QAPI 'size': a suffix works on the command line,
    and the lock of an unaligned write is rounded out to it."""
    binaries("qemu-io")
    node = extlock_node(local_image.child, extlockd.coordinator(), lock_space,
                        node_name="xl0", granularity="64K", lock_cache=False)
    r = run_qemu_io(node, ["write -P 0x2a 70000 1000"],
                    extra_args=["-T", "extlock_open", "-T", "extlock_request"])
    assert r.returncode == 0, r.stdout + r.stderr
    assert "granularity 65536" in r.stderr, r.stderr
    assert "lock [65536, +65536)" in r.stderr, r.stderr
