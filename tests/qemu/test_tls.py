"""The extlock driver's TLS connection to the coordinator (tls-creds).

SPDX-License-Identifier: GPL-2.0-or-later
Copyright (c) 2026 The extlock authors

Real qemu-io / qemu-storage-daemon binaries with QEMU's tls-creds-x509 and
tls-creds-psk objects talk to a real extlockd whose TCP listener speaks TLS
(--tls-creds-dir).  The certificates and keys are made in the test with
certtool (gnutls-bin), in QEMU's credential directory layout.  The images
are local files: what is tested is the coordinator connection.
"""

import os
import secrets
import shutil
import socket
import subprocess

import pytest

from harness import procs as hp
from harness.coordinator import coordinator_status
from harness.faults import (NbdClient, TcpPartition, check_event, events_named,
                            node_info)
from harness.procs import extlock_node, run_qemu_io, wait_until

MiB = 1024 * 1024
RESTORED = "EXTENT_LOCK_COORDINATOR_RESTORED"
LOST = "EXTENT_LOCK_COORDINATOR_LOST"

# A CA (the real one and a rogue one), a certificate for the coordinator
# (127.0.0.1 and localhost), one for the client host-a, each directory laid
# out as QEMU's tls-creds-x509 expects it
PKI_SCRIPT = r"""
set -e
key() { certtool --generate-privkey --key-type=ecdsa --outfile "$1" 2>/dev/null; }
ca() {
  key $1-key.pem
  printf 'cn = %s\nca\ncert_signing_key\nexpiration_days = 2\n' "$1" > $1.info
  certtool --generate-self-signed --load-privkey $1-key.pem \
    --template $1.info --outfile $1-cert.pem 2>/dev/null
}
cert() { # CA NAME KIND DIR
  mkdir -p $4; cp $1-cert.pem $4/ca-cert.pem
  key $4/$3-key.pem
  if [ $3 = server ]; then
    printf 'cn = %s\nip_address = 127.0.0.1\ndns_name = localhost\ntls_www_server\nsigning_key\nexpiration_days = 2\n' $2 > $4.info
  else
    printf 'cn = %s\ntls_www_client\nsigning_key\nexpiration_days = 2\n' $2 > $4.info
  fi
  certtool --generate-certificate --load-ca-certificate $1-cert.pem \
    --load-ca-privkey $1-key.pem --load-privkey $4/$3-key.pem \
    --template $4.info --outfile $4/$3-cert.pem 2>/dev/null
}
ca ca; ca rogue
cert ca localhost server server
cert ca host-a client host-a
# An impostor coordinator: a certificate for the same name from another
# CA; it accepts the real CA's clients
cert rogue localhost server impostor
cp ca-cert.pem impostor/ca-cert.pem
"""


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    if shutil.which("certtool") is None:
        pytest.fail("certtool missing: apt-get install gnutls-bin", pytrace=False)
    base = tmp_path_factory.mktemp("pki")
    subprocess.run(["sh", "-c", PKI_SCRIPT], cwd=base, check=True, timeout=60)
    alice = secrets.token_hex(32)
    (base / "server" / "keys.psk").write_text(f"alice:{alice}\n")
    for name, key in (("psk", alice), ("psk-bad", secrets.token_hex(32))):
        (base / name).mkdir()
        (base / name / "keys.psk").write_text(f"alice:{key}\n")
    for f in base.rglob("*-key.pem"):
        os.chmod(f, 0o600)
    return base


@pytest.fixture
def tls_extlockd(procs, binaries, pki):
    """A coordinator with a TLS TCP listener (x509 and PSK)."""
    binaries("extlockd", "qemu-io", "qemu-storage-daemon")
    daemon = procs.extlockd(name="extlockd-tls", tcp=True,
                            tls_creds_dir=pki / "server")
    yield daemon
    if not daemon.killed:
        assert daemon.alive(), f"extlockd died during the test:\n{daemon.stderr()}"
        assert daemon.stop() == 0, daemon.stderr()


def x509_object(pki, name="host-a", id_="tls0", endpoint="client"):
    return f"tls-creds-x509,id={id_},dir={pki / name},endpoint={endpoint}"


def psk_object(pki, name="psk", id_="tls0"):
    return f"tls-creds-psk,id={id_},dir={pki / name},username=alice,endpoint=client"


def tls_node(image, daemon, lock_space, client_id, **extra):
    extra.setdefault("tls_creds", "tls0")
    return extlock_node(image.child, daemon.coordinator(inet=True), lock_space,
                        client_id=client_id, **extra)


def qemu_io_tls(node, commands, obj):
    return run_qemu_io(node, commands, extra_args=["--object", obj])


def space(daemon, lock_space):
    """(sessions, held locks) of one lock-space at the coordinator, without
    what changes with time (lease-remaining-ms, held-ms)."""
    st = coordinator_status(daemon.address)
    sessions = [{k: v for k, v in s.items() if k != "lease-remaining-ms"}
                for s in st["sessions"] if s["lock-space"] == lock_space]
    held = []
    for sp in st["lock-spaces"]:
        if sp["name"] == lock_space:
            held = sorted((h["session"], h["offset"], h["length"], h["mode"],
                           h["token"]) for h in sp["held"])
    return sessions, held


# ---------------------------------------------------------------------------
# working connections

def test_x509_round_trip(local_image, tls_extlockd, lock_space, procs, pki):
    """tls-creds-x509: writes and reads go through the node, and the
    coordinator saw the client certificate's identity."""
    node = tls_node(local_image, tls_extlockd, lock_space, "host-a/vm1",
                    lock_cache=True)
    io = procs.qemu_io(node, extra_args=["--object", x509_object(pki)])
    out = io.cmd("write -P 0x5a 1M 256k")
    assert "error" not in out.lower(), out
    out = io.cmd("read -P 0x5a 1M 256k")
    assert "Pattern verification failed" not in out and "error" not in out.lower(), out
    sessions, held = space(tls_extlockd, lock_space)
    assert [(s["client-id"], s["owner"]) for s in sessions] == \
        [("host-a/vm1", "x509:host-a")], sessions
    assert held, "the cached lock of the write is not listed"
    io.quit()
    assert local_image.path.read_bytes()[MiB:MiB + 256 * 1024] == b"\x5a" * (256 * 1024)


def test_psk_round_trip(local_image, tls_extlockd, lock_space, procs, pki):
    """tls-creds-psk with username=alice: the identity is psk:alice."""
    node = tls_node(local_image, tls_extlockd, lock_space, "alice/vm1")
    io = procs.qemu_io(node, extra_args=["--object", psk_object(pki)])
    out = io.cmd("write -P 0x3c 0 64k")
    assert "error" not in out.lower(), out
    out = io.cmd("read -P 0x3c 0 64k")
    assert "Pattern verification failed" not in out and "error" not in out.lower(), out
    sessions, _ = space(tls_extlockd, lock_space)
    assert [s["owner"] for s in sessions] == ["psk:alice"], sessions
    io.quit()
    assert local_image.path.read_bytes()[:64 * 1024] == b"\x3c" * (64 * 1024)


def test_many_requests_over_tls(local_image, tls_extlockd, lock_space, pki):
    """Over TLS the data path is as over plain TCP: a qemu-io run with many
    requests (each its own lock: lock-cache=off) through the TLS channel."""
    node = tls_node(local_image, tls_extlockd, lock_space, "host-a/many",
                    lock_cache=False)
    cmds = [f"write -P {i + 1} {i * 64}k 64k" for i in range(64)]
    cmds += [f"read -P {i + 1} {i * 64}k 64k" for i in range(64)]
    r = qemu_io_tls(node, cmds, x509_object(pki))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Pattern verification failed" not in r.stdout, r.stdout
    data = local_image.path.read_bytes()
    for i in range(64):
        assert data[i * 64 * 1024:(i + 1) * 64 * 1024] == bytes([i + 1]) * (64 * 1024)


# ---------------------------------------------------------------------------
# refusals

@pytest.mark.parametrize("case", ["wrong-ca", "wrong-hostname", "wrong-psk",
                                  "plain-to-tls", "tls-to-plain"])
def test_refused_at_open(case, local_image, tls_extlockd, extlockd, lock_space,
                         procs, pki):
    """A coordinator the node cannot authenticate (or that cannot
    authenticate the node) is a clear error at open, and nothing held at
    the coordinator changes: another node's cached lock stays as it was."""
    holder = procs.qemu_io(
        tls_node(local_image, tls_extlockd, lock_space, "host-a/holder",
                 lock_cache=True),
        name="holder", extra_args=["--object", x509_object(pki)])
    holder.cmd("write -P 0x11 0 64k")
    before = space(tls_extlockd, lock_space)
    assert len(before[0]) == 1 and before[1], before

    obj = x509_object(pki)
    node = tls_node(local_image, tls_extlockd, lock_space, "host-a/intruder")
    other = None
    if case == "wrong-ca":
        # the node must not talk to a coordinator its CA did not certify
        other = procs.extlockd(name="impostor", tcp=True,
                               tls_creds_dir=pki / "impostor")
        node["coordinator"] = other.coordinator(inet=True)
        expect = "The certificate hasn't got a known issuer"
    elif case == "wrong-hostname":
        node["tls-hostname"] = "coord.example.com"
        expect = "does not match the hostname coord.example.com"
    elif case == "wrong-psk":
        obj = psk_object(pki, "psk-bad")
        expect = "TLS handshake failed"
    elif case == "plain-to-tls":
        del node["tls-creds"]
        expect = "the coordinator speaks TLS; this node has no tls-creds"
    else:
        # the plain (--insecure) TCP listener of the conftest coordinator
        other = extlockd
        node["coordinator"] = other.coordinator(inet=True)
        expect = "TLS handshake failed"
    r = qemu_io_tls(node, ["write -P 0x66 0 64k"], obj)
    out = r.stdout + r.stderr
    print(f"{case}: {out}")
    assert r.returncode != 0, out
    assert "can't open" in out, out
    assert expect in out, out
    assert f"tcp:127.0.0.1:" in out, out           # names the coordinator
    assert space(tls_extlockd, lock_space) == before
    if other is not None:
        assert space(other, lock_space) == ([], [])
    # the holder's data was not overwritten
    assert local_image.path.read_bytes()[:64 * 1024] == b"\x11" * (64 * 1024)
    holder.quit()


def test_silent_coordinator_handshake_is_bounded(local_image, lock_space, pki,
                                                binaries):
    """A TCP listener that never answers (the kernel accepts the connection,
    nobody reads): the TLS handshake gives up after the 10 s answer timeout
    with a clear message instead of blocking open for ever."""
    binaries("qemu-io")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)
        node = extlock_node(local_image.child,
                            {"type": "inet", "host": "127.0.0.1",
                             "port": str(silent.getsockname()[1])},
                            lock_space, client_id="host-a/silent", tls_creds="tls0")
        r = run_qemu_io(node, ["read 0 4k"], timeout=60,
                        extra_args=["--object", x509_object(pki)])
    out = r.stdout + r.stderr
    assert r.returncode != 0 and "can't open" in out, out
    assert "coordinator did not complete the TLS handshake within 10000 ms" in out, out


@pytest.mark.parametrize("case", ["unknown-id", "not-creds", "server-endpoint",
                                  "hostname-without-creds", "unix-x509-no-hostname"])
def test_bad_tls_options(case, local_image, tls_extlockd, lock_space, pki):
    """Bad tls-creds / tls-hostname options are refused before connecting."""
    node = tls_node(local_image, tls_extlockd, lock_space, "host-a/bad")
    extra = ["--object", x509_object(pki)]
    if case == "unknown-id":
        node["tls-creds"] = "nosuch"
        expect = "No TLS credentials with id 'nosuch'"
    elif case == "not-creds":
        extra = ["--object", "secret,id=tls0,data=x"]
        expect = "Object with id 'tls0' is not TLS credentials"
    elif case == "server-endpoint":
        extra = ["--object", x509_object(pki, "server", endpoint="server")]
        expect = "TLS credentials 'tls0': "
    elif case == "hostname-without-creds":
        del node["tls-creds"]
        node["tls-hostname"] = "localhost"
        expect = "'tls-hostname' needs 'tls-creds'"
    else:
        node["coordinator"] = tls_extlockd.coordinator()
        expect = "x509 credentials need 'tls-hostname' with a coordinator that is not inet"
    r = run_qemu_io(node, ["read 0 4k"], extra_args=extra)
    out = r.stdout + r.stderr
    assert r.returncode != 0 and "can't open" in out and expect in out, out
    assert space(tls_extlockd, lock_space) == ([], [])


# ---------------------------------------------------------------------------
# reconnection

class DroppingRelay(TcpPartition):
    """The fault relay, plus: drop() resets every relayed connection (as a
    router restart would); new connections go through again."""

    def drop(self):
        with self._lock:
            socks, self._socks = self._socks, []
        for s in socks:
            try:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                             b"\x01\x00\x00\x00\x00\x00\x00\x00")
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()


def test_tls_reconnect_resumes_session(local_image, tls_extlockd, lock_space,
                                       procs, pki):
    """The TLS connection is cut (relay resets it): the node reconnects
    with a new TLS handshake and resumes its session (same session id,
    cached lock kept, resumed=true), and I/O goes on."""
    relay = DroppingRelay(tls_extlockd.tcp_port)
    try:
        node = extlock_node(local_image.child, relay.coordinator(), lock_space,
                            node_name="xl0", client_id="host-a/qsd",
                            lock_cache=True, tls_creds="tls0")
        qsd = procs.storage_daemon(
            name="qsd", blockdevs=[node], exports=[("disk", "xl0", True)],
            objects=[x509_object(pki)])
        with NbdClient(qsd.nbd_path, "disk") as n:
            n.write(0, b"\x21" * 65536)
        sessions, held = space(tls_extlockd, lock_space)
        assert len(sessions) == 1 and sessions[0]["owner"] == "x509:host-a", sessions
        assert held, "no cached lock after the write"
        session = sessions[0]["session"]
        events_named(qsd.qmp, RESTORED)

        relay.drop()
        lost = wait_until(lambda: events_named(qsd.qmp, LOST, 0.2), timeout=10,
                          what="COORDINATOR_LOST")
        restored = wait_until(lambda: events_named(qsd.qmp, RESTORED, 0.2),
                              timeout=15, what="COORDINATOR_RESTORED")
        check_event(restored[0], RESTORED, resumed=True, session=session, lost=0)
        assert lost

        sessions2, held2 = space(tls_extlockd, lock_space)
        assert [s["session"] for s in sessions2] == [session], sessions2
        assert sessions2[0]["state"] == "active"
        assert held2 == held
        assert node_info(qsd.qmp)["counters"]["reconnects"] >= 1
        with NbdClient(qsd.nbd_path, "disk") as n:
            n.write(64 * 1024, b"\x22" * 65536)
            assert n.read(0, 131072) == b"\x21" * 65536 + b"\x22" * 65536
        assert relay.connections >= 2
    finally:
        relay.close()
