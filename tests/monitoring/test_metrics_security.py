# The metrics endpoint against a client that hoards connections.
# SPDX-License-Identifier: GPL-2.0-or-later
# Copyright (c) 2026 The extlock authors
#
# Real extlockd with --metrics-listen on 127.0.0.1.  The attacker and the
# monitoring system connect from different loopback addresses (127.0.0.2,
# 127.0.0.3), like two hosts.
import select
import socket
import time

TOTAL_LIMIT = 32        # HTTP_CONN_LIMIT in contrib/extlockd/metrics-http.c
PER_ADDR_LIMIT = 8      # HTTP_CONN_LIMIT_PER_ADDR


def connect_from(source, port):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind((source, 0))
    s.settimeout(10)
    s.connect(("127.0.0.1", port))
    return s


def closed_by_peer(s):
    """Has the daemon closed @s (EOF or reset)?  Does not block."""
    r, _, _ = select.select([s], [], [], 0)
    if not r:
        return False
    try:
        return s.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        return True


def scrape_from(source, port, hoard):
    """GET /metrics from @source; the raw answer (b"" if none came within
    8 s).  Meanwhile the attacker sends a byte on each of its @hoard
    connections every 0.5 s (a slowloris), so that they never reach the
    endpoint's idle timeout."""
    with connect_from(source, port) as s:
        s.sendall(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        out = b""
        deadline = time.monotonic() + 8
        trickle = 0.0
        while time.monotonic() < deadline:
            if time.monotonic() >= trickle:
                for h in hoard:
                    try:
                        h.send(b"r")
                    except OSError:
                        pass
                trickle = time.monotonic() + 0.5
            r, _, _ = select.select([s], [], [], 0.1)
            if not r:
                continue
            try:
                chunk = s.recv(65536)
            except OSError:
                break
            if not chunk:
                break
            out += chunk
        return out


def test_one_address_cannot_take_every_connection(extlockd):
    """An attacker opens as many connections as the endpoint serves in
    all and keeps them half-sent ("GET /met", then a byte every 0.5 s: a
    slowloris, never idle long enough to time out): only
    PER_ADDR_LIMIT of them are kept, the rest are closed, and a scrape
    from another address is answered.  Without the per-address limit the
    attacker holds all TOTAL_LIMIT slots and the scrape is never
    accepted."""
    d = extlockd("METRICS")
    port = d.metrics_port
    hoard = []
    try:
        for _ in range(TOTAL_LIMIT):
            s = connect_from("127.0.0.2", port)
            s.sendall(b"GET /met")
            hoard.append(s)
        # The daemon accepts them in order; those beyond the per-address
        # limit are closed (bounded: the idle timeout is 10 s, and the
        # check is done well before it)
        deadline = time.monotonic() + 5
        while (sum(closed_by_peer(s) for s in hoard) <
               TOTAL_LIMIT - PER_ADDR_LIMIT and time.monotonic() < deadline):
            time.sleep(0.05)
        answer = scrape_from("127.0.0.3", port, hoard)
        assert answer.startswith(b"HTTP/1.") and b" 200 " in \
            answer.split(b"\r\n")[0], \
            f"scrape from another address while one address holds " \
            f"{TOTAL_LIMIT} connections: {answer[:200]!r}"
        assert b"extlock_grants_total" in answer
        kept = sum(not closed_by_peer(s) for s in hoard)
        assert kept <= PER_ADDR_LIMIT, kept
    finally:
        for s in hoard:
            s.close()
    assert d.alive(), d.log.read_text()
