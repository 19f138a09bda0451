"""HA coordinator: 3 extlockd replicas on a real 3-member etcd cluster.

SPDX-License-Identifier: GPL-2.0-or-later
Copyright (c) 2026 The extlock authors

Timing: etcd lease TTL T = HA_TTL_MS (2 s unless EXTLOCK_HA_TTL_MS says
otherwise; the leader proves it alive until the send time of its last
keep-alive + 0.9 T), client leases 2 s, fence margin 200 ms.
Every wait is bounded and derived from these; see docs/design.rst "High
availability" for the argument and docs/testing.rst for the list.
"""
import base64
import json
import subprocess
import time

import pytest

from conftest import (BUILD, EXTLOCKD, EXTLOCKCTL, HA_TTL_MS, etcd_post,
                      wait_for)
from haclient import HaClient, Worker, overlaps

TTL_S = HA_TTL_MS / 1000
LEASE_MS = 2000


def grants(replica):
    return [e for e in replica.events() if e["event"] in ("grant",)]


def run_workers(addresses, space, n=3, lease_ms=LEASE_MS, **kw):
    ws = [Worker(addresses, "host%d" % i, space, lease_ms=lease_ms, seed=i,
                 **kw) for i in range(n)]
    for w in ws:
        w.start()
    return ws


def wait_progress(ws, timeout, after_ns=None):
    """Every worker got a grant (after after_ns, if given)."""
    def ok():
        return all(any(g[0] > (after_ns or 0) for g in w.grants) for w in ws)
    wait_for(ok, timeout, "lock traffic from every client")


def stop_all(ws):
    for w in ws:
        w.stop()
    for w in ws:
        assert not w.errors, w.errors


def check_safe(ws):
    bad = overlaps(ws)
    assert not bad, "conflicting holds overlapped: %s" % bad[:3]
    for w in ws:
        toks = [g[1] for g in w.grants]
        assert toks == sorted(toks) and len(set(toks)) == len(toks), \
            "tokens of %s not increasing" % w.c.client_id


def test_election_and_not_leader(ha):
    leader = ha.start(3)
    followers = [r for r in ha.replicas if r is not leader]
    roles = sorted(r.role() for r in ha.replicas)
    assert roles == ["follower", "follower", "leader"]
    # a follower answers hello with not-leader naming the leader
    c = HaClient([followers[0].address], "probe", "ls", follow=False)
    with pytest.raises(TimeoutError):
        c.connect(timeout=0.5)
    sent, r = c._hello(followers[0].address)
    assert r["type"] == "error" and r["code"] == "not-leader", r
    assert r["leader"] == leader.address, r
    c.close()
    # a client given only the followers' addresses follows it
    c = HaClient([f.address for f in followers], "probe", "ls")
    assert c.connect(timeout=5) == leader.address
    h = c.lock(0, 4096, "exclusive")
    assert h["token"] >> 40 == c.epoch
    c.bye()
    # extlockctl cluster through a follower shows the cluster; each member
    # is listed once its own membership key reached etcd, which under
    # load can come after the roles above were settled
    def cluster_out():
        out = subprocess.run([str(EXTLOCKCTL), "-c", followers[1].address,
                              "cluster"], capture_output=True, text=True,
                             timeout=10)
        assert out.returncode == 0, out.stderr
        return out if all(r.name in out.stdout for r in ha.replicas) else None
    out = wait_for(cluster_out, 2 * TTL_S + 5, "every member in the list")
    assert "Leader       %s at %s" % (leader.name, leader.address) in out.stdout
    st = json.loads(subprocess.run(
        [str(EXTLOCKCTL), "-c", followers[1].address, "--json", "cluster"],
        capture_output=True, text=True, timeout=10).stdout)
    assert st["role"] == "follower" and st["leader"] == leader.name
    wait_for(lambda: followers[0].status()["cluster"].get("cluster-epoch")
             == leader.status()["epoch"], 5, "the epoch in a follower's view")
    # with a list, extlockctl shows the leader's view
    st = json.loads(subprocess.run(
        [str(EXTLOCKCTL), "-c", ",".join(f.address for f in followers),
         "--json", "cluster"], capture_output=True, text=True,
        timeout=10).stdout)
    assert st["role"] == "leader" and st["member-id"] == leader.name
    wait_for(lambda: leader.status()["cluster"].get("quorum") is True and
             len(leader.status()["cluster"]["members"]) == 3, 5,
             "etcd health and members in the leader's status (refreshed "
             "every second)")
    st = leader.status()["cluster"]
    assert st["role"] == "leader" and st["epoch"] >= 1
    assert len(st["endpoints"]) == 3 and all(e["healthy"]
                                             for e in st["endpoints"])
    assert sorted(m["member-id"] for m in st["members"]) == \
        sorted(r.name for r in ha.replicas)


def test_kill9_leader_under_traffic(ha):
    leader = ha.start(3)
    ws = run_workers(ha.addresses(), "ls", n=3)
    wait_progress(ws, 10)
    epoch0 = leader.status()["epoch"]
    killed = leader.kill9()
    new = ha.wait_leader(timeout=10, not_=leader)
    # every client is served by the new leader, after a pause
    wait_progress(ws, 20, after_ns=killed)
    time.sleep(0.5)
    stop_all(ws)
    check_safe(ws)
    assert new.status()["epoch"] > epoch0
    first = min(e["ts"] for e in grants(new))
    # the new leader grants only after the old lease could have lapsed
    assert first - killed > 0
    for w in ws:
        assert w.c.sessions_started == 1, "a client lost its session"
        assert w.outages, "%s saw no failover" % w.c.client_id
    print("kill -> first new grant: %.0f ms" % ((first - killed) / 1e6))


@pytest.mark.parametrize("protected", [True, False],
                         ids=["step-down", "no-step-down"])
def test_partition_leader_from_etcd(ha, protected):
    """The leader loses etcd but keeps its clients: it stops granting
    before the new leader grants.  Without step-down (testing hook) the
    test must catch two leaders granting at once."""
    env = {} if protected else {"EXTLOCKD_TEST_HA_NO_STEP_DOWN": "1"}
    leader = None
    for i in range(3):
        ha.add("x%d" % i, env=env)
    ha.replicas[0].extra_args.append("--create-cluster")
    for r in ha.replicas:
        r.start()
    leader = ha.wait_leader()
    others = [r for r in ha.replicas if r is not leader]
    # a: only the old leader's address; c: only the others', no following
    a = run_workers([leader.address], "ls", n=1)[0]
    c = Worker([o.address for o in others], "hostc", "ls2",
               lease_ms=LEASE_MS, follow=False)
    c.start()
    wait_progress([a], 10)
    cut = leader.partition()
    new = ha.wait_leader(timeout=10, not_=leader) if protected else \
        wait_for(lambda: next((o for o in others
                               if o.events("elected")), None), 10,
                 "a new leader elected")
    wait_for(lambda: grants(new), 15, "a grant by the new leader")
    # the control's old leader goes on granting to a meanwhile
    wait_for(lambda: protected or grants(leader)[-1]["ts"] >
             grants(new)[0]["ts"], 5, "old leader still granting")
    a.stop_ev.set()
    c.stop_ev.set()
    elected = min(e["ts"] for e in new.events("elected") if e["ts"] > cut)
    first_new = min(e["ts"] for e in grants(new))
    last_old = max(e["ts"] for e in grants(leader))
    steps = [e["ts"] for e in leader.events("step-down") if e["ts"] > cut]
    print("cut %d, old last grant +%.0f ms, step-down %s, elected +%.0f ms, "
          "new first grant +%.0f ms" % (
              cut, (last_old - cut) / 1e6,
              ["+%.0f ms" % ((s - cut) / 1e6) for s in steps],
              (elected - cut) / 1e6, (first_new - cut) / 1e6))
    if not protected:
        # the control: without step-down both leaders grant at once, and
        # the checks below would catch it
        assert not steps and last_old > first_new, \
            "the control did not show two leaders granting at once"
        return
    assert steps, "the partitioned leader never stepped down"
    assert steps[0] < elected, "stepped down only after a new election"
    assert last_old < first_new, \
        "the old leader granted %.0f ms after the new leader's first grant" \
        % ((last_old - first_new) / 1e6)
    # and it stepped down within its lease TTL of the cut
    assert steps[0] - cut <= TTL_S * 1e9 + 0.2e9


@pytest.mark.parametrize("member", ["follower", "leader"])
def test_etcd_member_loss_changes_nothing(ha, etcd, member):
    """One etcd member of three dies: etcd's leader (etcd elects another,
    within 1-2 election timeouts of TTL/4) or a follower.  The
    coordinator's leader keeps its lease proven throughout (keep-alives
    every TTL/6 leave 0.73 TTL of slack), so nothing changes for the
    clients.

    The replicas' TTL here is three times etcd's (whose election timeout
    is derived from its own TTL).  With 2 s, the slack of 1.47 s left
    0.47 s beside etcd's 2 election timeouts; under a load of 25-30 the
    keep-alive, which a surviving member holds until etcd has a leader
    again, came back too late in runA and in 2 of the 3 clean-clone runs
    h1-h3 of 4cfcb03 (the leader logged no keep-alive failure, only the
    step-down at its deadline).  The claim holds for any TTL whose slack
    covers etcd's re-election; 3 x the etcd TTL makes that 4.4 s against
    1 s of election timeouts.  Traffic is then watched for 2 TTLs."""
    ttl_ms = 3 * etcd.ttl_ms
    leader = ha.start(3, ttl_ms=ttl_ms)
    ws = run_workers(ha.addresses(), "ls", n=2)
    wait_progress(ws, 10)
    epoch0 = leader.status()["epoch"]
    lost = etcd.leader_index() if member == "leader" else \
        next(i for i in range(3) if i != etcd.leader_index())
    t = time.monotonic_ns()
    etcd.kill(lost)
    try:
        wait_for(lambda: etcd.leader_index() is not None,
                 10 * ttl_ms / 1000, "etcd has a leader again")
        leaderless_ms = (time.monotonic_ns() - t) / 1e6
        # lock traffic goes on for several lease TTLs
        wait_for(lambda: all(len([g for g in w.grants if g[0] > t]) > 50
                             for w in ws), 10, "traffic without the member")
        time.sleep(2 * ttl_ms / 1000)
        st = leader.status()
        assert st["cluster"]["role"] == "leader" and st["epoch"] == epoch0, \
            "leader changed; etcd had a leader again %.0f ms after the " \
            "kill (replica slack %.0f ms)" % (leaderless_ms, 0.73 * ttl_ms)
        assert not [e for r in ha.replicas for e in r.events("step-down")]
        for w in ws:
            assert not w.outages, "%s lost its connection" % w.c.client_id
        wait_for(lambda: any(not e["healthy"] for e in
                             leader.status()["cluster"]["endpoints"]), 5,
                 "the lost member reported")
    finally:
        etcd.start(lost, state="existing")
        wait_for(etcd.healthy, 30, "etcd member back")
    stop_all(ws)
    check_safe(ws)


def test_quorum_loss_stops_grants(ha, etcd):
    leader = ha.start(3)
    ws = run_workers(ha.addresses(), "ls", n=2)
    wait_progress(ws, 10)
    keep = etcd.leader_index()
    lost = [i for i in range(3) if i != keep]
    t = time.monotonic_ns()
    for i in lost:
        etcd.kill(i)
    try:
        step = wait_for(lambda: [e for e in leader.events("step-down")
                                 if e["ts"] > t], 2 * TTL_S + 5,
                        "the leader steps down")[0]["ts"]
        # nobody grants while there is no quorum
        time.sleep(3 * TTL_S)
        late = [e for r in ha.replicas for e in grants(r) if e["ts"] > step]
        assert not late, "grants without an etcd quorum: %s" % late[:3]
        # the surviving etcd member renews leases until it notices it lost
        # the quorum (raft check-quorum: up to 2 election timeouts, T/4
        # each here), then the proof lapses within T
        assert step - t <= (TTL_S * 1.5 + 0.3) * 1e9
        st = wait_for(lambda: (lambda s: s if s and s["cluster"].get("quorum")
                               is False else None)(ha.replicas[0].status()),
                      5, "no quorum reported")
        assert st["cluster"]["role"] == "follower"
        out = subprocess.run([str(EXTLOCKCTL), "-c", ha.replicas[1].address,
                              "cluster"], capture_output=True, text=True,
                             timeout=10).stdout
        assert "etcd quorum  NO" in out, out
    finally:
        for i in lost:
            etcd.start(i, state="existing")
        wait_for(etcd.healthy, 30, "etcd quorum back")
    back = time.monotonic_ns()
    ha.wait_leader(timeout=15)
    wait_progress(ws, 30, after_ns=back)
    stop_all(ws)
    check_safe(ws)


def test_rolling_restart_loses_nothing(ha):
    ha.start(3)
    ws = run_workers(ha.addresses(), "ls", n=3)
    wait_progress(ws, 10)
    for r in list(ha.replicas):
        t = time.monotonic_ns()
        r.stop()
        r.start()
        ha.wait_leader(timeout=15)
        wait_progress(ws, 30, after_ns=t)
    stop_all(ws)
    check_safe(ws)
    for w in ws:
        assert w.c.sessions_started == 1, \
            "%s had to start a new session" % w.c.client_id


def run_bad(*args, timeout=15):
    t = time.monotonic()
    r = subprocess.run([str(EXTLOCKD)] + list(args), capture_output=True,
                       text=True, timeout=timeout)
    return r, time.monotonic() - t


def test_bad_configuration(ha, etcd, tmp_path):
    sock = "unix:" + str(ha.dir / "bad.sock")
    ep = "--etcd-endpoints=" + ",".join(etcd.urls)
    r, _ = run_bad(ep, "--state-file", str(tmp_path / "s"), "--cluster", "x",
                   "--listen", sock)
    assert r.returncode == 2 and "exclude each other" in r.stderr
    r, _ = run_bad(ep, "--listen", sock)
    assert r.returncode == 2 and "needs --cluster" in r.stderr
    r, _ = run_bad("--cluster", "x", "--listen", sock)
    assert r.returncode == 2 and "need --etcd-endpoints" in r.stderr
    r, _ = run_bad(ep, "--cluster", "bad/name", "--listen", sock)
    assert r.returncode == 2 and "--cluster" in r.stderr
    r, _ = run_bad(ep, "--cluster", "x", "--etcd-lease-ttl-ms", "1500",
                   "--listen", sock)
    assert r.returncode == 2 and "multiple of 1000" in r.stderr
    r, _ = run_bad("--etcd-endpoints=127.0.0.1:1", "--cluster", "x",
                   "--listen", sock)
    assert r.returncode == 2 and "http(s)://" in r.stderr
    # a cluster that was never created: a typo must not start epoch 1 again
    r, _ = run_bad(ep, "--cluster", ha.name + "-typo", "--listen", sock)
    assert r.returncode == 1 and "does not exist in etcd" in r.stderr
    assert "--create-cluster" in r.stderr
    # unreachable etcd: bounded by --etcd-wait-ms
    r, took = run_bad("--etcd-endpoints=http://127.0.0.1:9", "--cluster",
                      "x", "--listen", sock, "--etcd-wait-ms", "700")
    assert r.returncode == 1 and "did not answer within 700 ms" in r.stderr
    assert took < 5


def test_create_cluster_from_state_file(ha, tmp_path):
    """A single coordinator's state moves into etcd: the first leader's
    epoch follows the file's, so tokens keep increasing."""
    state = tmp_path / "single.state"
    state.write_text('{"version":1,"epoch":41}\n')
    r = ha.add("x0", extra_args=["--create-cluster-from", str(state)])
    r.start()
    leader = ha.wait_leader()
    assert leader.status()["epoch"] == 42
    c = HaClient([r.address], "h", "ls")
    c.connect(timeout=5)
    assert c.lock(0, 4096, "exclusive")["token"] >> 40 == 42
    c.bye()


def test_create_cluster_from_keeps_reservations_and_maintenance(ha,
                                                               tmp_path):
    """--create-cluster-from carries a single coordinator's persistent
    reservations and maintenance counts into etcd, not only its epoch and
    sessions: after the move a guest cluster's reservation still holds (a
    preempted node stays fenced off) and a host that did not see the
    maintenance gets the same maint-gen (it rereads the metadata), as a
    restarted single coordinator would send."""
    state = tmp_path / "single.state"
    sock = ha.dir / "single.sock"
    log = open(ha.dir / "single.log", "w")
    p = subprocess.Popen([str(EXTLOCKD), "--state-file", str(state),
                          "--listen", "unix:" + str(sock),
                          "--fence-margin-ms", "200"],
                         stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: sock.exists() or p.poll() is not None, 10,
                 "the single coordinator listening")
        assert p.poll() is None, (ha.dir / "single.log").read_text()
        c = HaClient(["unix:" + str(sock)], "node-a", "pr-disk")
        c.connect(timeout=10)
        assert c.call({"type": "pr-in"})["type"] == "pr-status"
        for msg in ({"action": "register", "sa-key": "a1", "request": 7},
                    {"action": "reserve", "key": "a1", "pr-type": 5,
                     "request": 8}):
            r = c.call(dict(msg, type="pr-out"))
            assert r["type"] == "pr-result" and r["result"] == "ok", r
        c.bye()
        a = HaClient(["unix:" + str(sock)], "host-a", "maint-ls")
        a.connect(timeout=10)
        g = a.call(dict(MAINT, type="lock", mode="exclusive", limit=MAINT))
        assert g["type"] == "granted" and g["length"] == 1 << 63, g
        u = a.call({"type": "unlock", "lock": g["lock"],
                    "maint-size": 65536})
        assert u["type"] != "error", u
        g = a.lock(0, 4096, "shared")
        g = a.call({"type": "renew"})
        gen1 = g.get("maint-gen")
        assert gen1 == (1 << 32) | 1, g
        a.bye()
    finally:
        p.terminate()
        p.wait(10)
        log.close()
    # what the single coordinator left, as the move finds it
    saved = json.loads(state.read_text())
    assert saved["epoch"] == 1, saved
    assert [m["count"] for m in saved["maintenance"]] == [1], saved
    assert [e["lock-space"] for e in saved["reservations"]] == \
        ["pr-disk"], saved

    r = ha.add("x0", extra_args=["--create-cluster-from", str(state)])
    r.start()
    leader = ha.wait_leader()
    assert leader.status()["epoch"] == 2
    # the reservation holds: node-b is not registered, its RESERVE
    # conflicts, and node-a's numbered RESERVE is answered, not applied
    d = HaClient([r.address], "node-b", "pr-disk")
    d.connect(timeout=10)
    st = d.call({"type": "pr-in"})
    assert st["type"] == "pr-status", st
    assert st["generation"] == 1 and st["pr-type"] == 5, st
    assert st["holder"] == "node-a", st
    assert st["registrants"] == [{"client-id": "node-a", "key": "a1"}], st
    r2 = d.call({"type": "pr-out", "action": "reserve", "key": "b",
                 "pr-type": 5})
    assert r2["result"] == "reservation-conflict", r2
    d.close()
    # the maintenance count: a host gets the maint-gen of before (so one
    # that never saw it rereads), the next maintenance a higher one
    b = HaClient([r.address], "host-b", "maint-ls")
    b.connect(timeout=10)
    g = b.lock(0, 4096, "exclusive")
    assert b.call({"type": "renew"}).get("maint-gen") == gen1
    spaces = [s for s in leader.status()["lock-spaces"]
              if s["name"] == "maint-ls"]
    assert spaces and spaces[0]["maintenance"]["generation"] == 1, spaces
    assert b.unlock(g["lock"])["type"] != "error"
    g = b.call(dict(MAINT, type="lock", mode="exclusive", limit=MAINT))
    assert g["type"] == "granted", g
    assert b.call({"type": "unlock", "lock": g["lock"]})["type"] != "error"
    gen2 = b.call({"type": "renew"}).get("maint-gen")
    assert gen2 == (2 << 32) | 2 and gen2 > gen1, gen2
    b.bye()
    # the release is written to etcd after the unlock is answered
    wait_for(lambda: (lambda m: m and (m["count"], m["epoch"]) == (2, 2)
                      and not m.get("pending"))(
                          maint_record(ha, "maint-ls")),
             10, "the second maintenance in etcd's state")
    entry = etcd_state(ha)["reservations"]
    assert [e["lock-space"] for e in entry] == ["pr-disk"], st
    # node-a's numbered pr-outs and its registration's owner came along
    assert sorted(q["request"] for q in entry[0]["requests"]
                  if q["client-id"] == "node-a") == [7, 8], entry
    assert [o["client-id"] for o in entry[0]["owners"]] == ["node-a"], entry


@pytest.mark.parametrize("case,member", [
    ("res-object", '"reservations":{"lock-space":"x"}'),
    ("res-type", '"reservations":[{"lock-space":"x","seq":1,'
     '"generation":1,"pr-type":99}]'),
    ("maint-count", '"maintenance":[{"lock-space":"x","count":-1,'
     '"epoch":1}]'),
    ("missing", None),
])
def test_create_cluster_from_bad_state_file(ha, etcd, tmp_path, case,
                                            member):
    """A state file whose reservations or maintenance counts are corrupt,
    or that does not exist (a typo would start the cluster's tokens from
    epoch 1 again), is refused with a clear error before anything is
    written to etcd."""
    state = tmp_path / "sub" / "bad.state"
    if member:
        state.parent.mkdir()
        state.write_text('{"version":1,"epoch":5,%s}\n' % member)
    name = "%s-%s" % (ha.name[:60], case)
    r, _ = run_bad("--etcd-endpoints=" + ",".join(etcd.urls), "--cluster",
                   name, "--create-cluster-from", str(state), "--listen",
                   "unix:" + str(ha.dir / "bad.sock"))
    assert r.returncode == 1, r.stderr
    assert "--create-cluster-from" in r.stderr and str(state) in r.stderr, \
        r.stderr
    key = base64.b64encode(("/extlock/%s/state" % name).encode()).decode()
    got = etcd_post(etcd.url(0), "/v3/kv/range", {"key": key}, 2.0)
    assert not got.get("kvs"), got
    if not member:
        # a mistyped path leaves nothing behind (no directory, no lock)
        assert not state.parent.exists()


def test_etcd_client_against_real_etcd(etcd):
    """contrib/extlockd/etcd-client.c on its own (cmocka, C): put/get with
    bytes that need base64, txn create-if-absent and CAS on mod_revision
    and value, leases (keep-alive, revoke takes the key, TTL 0 after),
    prefix range, endpoint status of every member, failover past a dead
    endpoint, a bounded error when none answers."""
    r = subprocess.run([str(BUILD / "tests/ha/test-etcd-client")],
                       env={"ETCD_ENDPOINTS": ",".join(etcd.urls)},
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "[  PASSED  ] 5 test(s)." in r.stdout + r.stderr, r.stdout


CERTS = r"""
set -e
key() { certtool --generate-privkey --key-type=ecdsa --outfile "$1" 2>/dev/null; }
key ca-key.pem
printf 'cn = etcd-ca\nca\ncert_signing_key\nexpiration_days = 2\n' > ca.info
certtool --generate-self-signed --load-privkey ca-key.pem --template ca.info \
  --outfile ca-cert.pem 2>/dev/null
sign() {
  key $1-key.pem
  printf 'cn = %s\nip_address = 127.0.0.1\n%b\nsigning_key\nexpiration_days = 2\n' \
    $1 "$2" > $1.info
  certtool --generate-certificate --load-ca-certificate ca-cert.pem \
    --load-ca-privkey ca-key.pem --load-privkey $1-key.pem \
    --template $1.info --outfile $1-cert.pem 2>/dev/null
}
# etcd's own gateway connects to it with the server certificate
sign server 'tls_www_server\ntls_www_client'
sign client tls_www_client
"""


def test_tls_to_etcd(ha, tmp_path):
    """https endpoints with client certificates (etcd
    --client-cert-auth): a replica with --etcd-cacert/-cert/-key is
    elected; one without a client certificate fails at start with a clear
    error, within --etcd-wait-ms."""
    import shutil as sh
    if not sh.which("certtool"):
        pytest.skip("certtool missing (gnutls-bin)")
    d = tmp_path / "pki"
    d.mkdir()
    subprocess.run(["bash", "-c", CERTS], cwd=d, check=True, timeout=60)
    from conftest import free_ports
    cport, pport = free_ports(2)
    url = "https://127.0.0.1:%d" % cport
    log = open(tmp_path / "etcd-tls.log", "w")
    e = subprocess.Popen(
        ["etcd", "--name", "tls", "--data-dir", str(tmp_path / "data"),
         "--listen-client-urls", url, "--advertise-client-urls", url,
         "--listen-peer-urls", "http://127.0.0.1:%d" % pport,
         "--initial-advertise-peer-urls", "http://127.0.0.1:%d" % pport,
         "--initial-cluster", "tls=http://127.0.0.1:%d" % pport,
         "--cert-file", str(d / "server-cert.pem"),
         "--key-file", str(d / "server-key.pem"),
         "--trusted-ca-file", str(d / "ca-cert.pem"),
         "--client-cert-auth",
         "--heartbeat-interval", "25", "--election-timeout", "250"],
        stdout=log, stderr=subprocess.STDOUT)
    try:
        sock = "unix:" + str(ha.dir / "tls.sock")
        args = [str(EXTLOCKD), "--etcd-endpoints=" + url, "--cluster",
                ha.name, "--create-cluster", "--listen", sock,
                "--etcd-cacert", str(d / "ca-cert.pem"),
                "--etcd-wait-ms", "10000"]
        # no client certificate: refused by etcd, a clear error
        r, took = run_bad(*args[1:-2], "--etcd-wait-ms", "1500",
                          timeout=30)
        assert r.returncode == 1 and "did not answer within 1500 ms" in \
            r.stderr, r.stderr
        p = subprocess.Popen(args + ["--etcd-cert", str(d / "client-cert.pem"),
                                     "--etcd-key", str(d / "client-key.pem")],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)
        try:
            c = HaClient([sock], "h", "ls")
            wait_for(lambda: _try_connect(c), 15, "a TLS-to-etcd leader")
            assert c.lock(0, 4096, "exclusive")["token"] >> 40 == 1
            c.bye()
        finally:
            p.terminate()
            out = p.communicate(timeout=30)[0]
        assert "leads cluster" in out, out
    finally:
        e.kill()
        e.wait()


def _try_connect(c):
    try:
        c.connect(timeout=0.5)
        return True
    except Exception:
        return False


def test_reservations_survive_failover(ha):
    """Persistent reservations (docs/protocol.rst) are in the state in etcd:
    a new leader after kill -9 of the old one serves the same registrations
    and reservation, and its epoch bump keeps them, with the identity that
    owns each registration."""
    leader = ha.start(3)
    c = HaClient(ha.addresses(), "node-a", "pr-disk")
    c.connect(timeout=10)
    assert c.call({"type": "pr-in"})["type"] == "pr-status"
    for msg in ({"action": "register", "sa-key": "a1"},
                {"action": "reserve", "key": "a1", "pr-type": 5}):
        r = c.call(dict(msg, type="pr-out"))
        assert r["type"] == "pr-result" and r["result"] == "ok", r
    c.bye()
    # Its session gone from the state in etcd, only the saved owner says
    # whose the registration is (not a session of its client-id)
    deadline = time.monotonic() + 10
    while any(s["client-id"] == "node-a"
              for s in etcd_state(ha).get("sessions", [])):
        assert time.monotonic() < deadline, etcd_state(ha)
        time.sleep(0.05)
    leader.kill9()
    new = ha.wait_leader(timeout=10, not_=leader)
    # and once more, so that a second epoch bump must carry them too
    new.kill9()
    third = ha.wait_leader(timeout=10, not_=new)
    d = HaClient([third.address], "node-b", "pr-disk")
    d.connect(timeout=30)
    st = d.call({"type": "pr-in"})
    assert st["type"] == "pr-status", st
    assert st["generation"] == 1 and st["pr-type"] == 5, st
    assert st["holder"] == "node-a", st
    assert st["registrants"] == [{"client-id": "node-a", "key": "a1"}], st
    # The owner identity of the registration (docs/extlockd.rst "Policy")
    # came along too: the third leader wrote it back (node-b's hello)
    entry = [r for r in etcd_state(ha)["reservations"]
             if r["lock-space"] == "pr-disk"]
    assert len(entry) == 1, entry
    owners = entry[0].get("owners")
    assert owners and [o["client-id"] for o in owners] == ["node-a"], entry
    assert owners[0]["identity"], entry
    # node-b is not registered: its RESERVE conflicts
    r = d.call({"type": "pr-out", "action": "reserve", "key": "b",
                "pr-type": 5})
    assert r["result"] == "reservation-conflict", r
    d.close()


MAINT = {"offset": 0, "length": 1 << 63}


def etcd_state(ha):
    """The cluster's state object as etcd has it (any member answers)."""
    key = base64.b64encode(("/extlock/%s/state" % ha.name).encode()).decode()
    r = etcd_post(ha.etcd.url(0), "/v3/kv/range", {"key": key}, 2.0)
    return json.loads(base64.b64decode(r["kvs"][0]["value"]))


def maint_record(ha, space):
    for m in etcd_state(ha).get("maintenance", []):
        if m["lock-space"] == space:
            return m
    return None


def test_maintenance_count_survives_failover(ha):
    """The maintenance count (maint-gen, docs/protocol.rst "Maintenance")
    is in the state in etcd: a host whose first grant comes from a new
    leader after kill -9 of the old one still learns that a maintenance
    ran (it gets the same maint-gen and maint-size), and a maintenance
    that may have been running when the leader died is counted by the new
    leader in its epoch, a maint-gen no host has seen."""
    leader = ha.start(3)
    space = "maint-ls"
    # host b opened the image before the maintenance, holds no lock yet
    b = HaClient(ha.addresses(), "host-b", space)
    b.connect(timeout=10)
    a = HaClient(ha.addresses(), "host-a", space)
    a.connect(timeout=10)
    g = a.call(dict(MAINT, type="lock", mode="exclusive", limit=MAINT))
    assert g["type"] == "granted" and g["length"] == 1 << 63, g
    u = a.call({"type": "unlock", "lock": g["lock"], "maint-size": 65536})
    assert u["type"] != "error", u
    g = a.call({"type": "lock", "offset": 0, "length": 4096,
                "mode": "shared"})
    assert g["type"] == "granted" and g.get("maint-gen"), g
    gen1 = g["maint-gen"]
    assert gen1 & 0xffffffff == 1, g
    a.bye()
    # the release is written to etcd after the unlock is answered
    wait_for(lambda: (lambda m: m and m["count"] == 1 and
                      not m.get("pending"))(maint_record(ha, space)),
             10, "the maintenance count in etcd's state")
    leader.kill9()
    new = ha.wait_leader(timeout=10, not_=leader)
    b.connect(timeout=30)

    # b renews until the new leader's grace period is over: a request
    # waiting for it without renewals let b's 3 s lease lapse at the
    # grace's end, before b's unlock below, in a clean-clone run (k1)
    def first_grace_over():
        assert b.renew()["type"] == "renewed"
        return all(s["grace-remaining-ms"] == 0
                   for s in new.status()["lock-spaces"]
                   if s["name"] == space)
    wait_for(first_grace_over, 30, "the end of the grace period",
             interval=0.3)
    g = b.call({"type": "lock", "offset": 0, "length": 4096,
                "mode": "exclusive"}, timeout=30)
    assert g["type"] == "granted", g
    # the same count: b rereads (it never saw one), nobody else needs to
    assert g.get("maint-gen") == gen1, g
    assert g.get("maint-size") == 65536, g
    st = [s for s in new.status()["lock-spaces"] if s["name"] == space]
    assert st and st[0]["maintenance"]["generation"] == 1, st
    # the new leader's epoch bump kept the record
    assert maint_record(ha, space)["count"] == 1

    # a maintenance granted (after waiting for b's lock), then the leader
    # and the maintenance's owner die
    c = HaClient([new.address], "host-c", space)
    c.connect(timeout=10)
    rid = c._send(dict(MAINT, type="lock", mode="exclusive", limit=MAINT))
    r = c._recv(10)
    assert r.get("id") == rid and r["type"] == "waiting", r
    assert b.unlock(g["lock"])["type"] != "error"
    r = c._recv(10)
    assert r.get("id") == rid and r["type"] == "granted", r
    # recorded before the grant is sent
    assert maint_record(ha, space).get("pending") is True, etcd_state(ha)
    c.close()
    new.kill9()
    third = ha.wait_leader(timeout=10, not_=new)
    epoch3 = third.status()["epoch"]
    b.connect(timeout=30)

    # c does not come back: b renews until the grace period is over
    def grace_over():
        assert b.renew()["type"] == "renewed"
        return all(s["grace-remaining-ms"] == 0
                   for s in third.status()["lock-spaces"]
                   if s["name"] == space)
    wait_for(grace_over, 30, "the end of the grace period", interval=0.3)
    g = b.call({"type": "lock", "offset": 0, "length": 4096,
                "mode": "exclusive"}, timeout=30)
    assert g["type"] == "granted", g
    gen2 = g.get("maint-gen")
    # counted in the third leader's epoch: every host rereads
    assert gen2 == ((epoch3 & 0x7fffffff) << 32) | 2, (g, epoch3)
    assert gen2 > gen1
    wait_for(lambda: (lambda m: m and m["count"] == 2 and
                      m["epoch"] == epoch3 and not m.get("pending"))(
                          maint_record(ha, space)),
             10, "the counted maintenance in etcd's state")
    b.bye()


def test_metrics_in_ha_mode(ha):
    """--metrics-listen serves the metrics in HA mode too (it was ignored
    there: a replica started without error and nothing listened), and the
    endpoint is up once the replica's coordinator socket accepts."""
    import urllib.request
    from conftest import free_ports
    port, = free_ports(1)
    r = ha.add("x0", extra_args=["--create-cluster", "--metrics-listen",
                                 "127.0.0.1:%d" % port])
    r.start()
    ha.wait_leader()
    with urllib.request.urlopen("http://127.0.0.1:%d/metrics" % port,
                                timeout=10) as resp:
        assert resp.status == 200
        text = resp.read().decode()
    assert "extlock_" in text, text[:500]


def test_create_cluster_from_marks_the_state_file(ha, etcd, tmp_path):
    """After --create-cluster-from the single coordinator's state file is
    marked as moved: a single extlockd started on it again (a unit left
    enabled on the old host) refuses, instead of granting the extents the
    cluster grants; the replica started again with its first command line
    joins the cluster; a file not moved is not copied into a cluster that
    exists already (refused, the file left as it was)."""
    state = tmp_path / "single.state"
    state.write_text('{"version":1,"epoch":7}\n')
    r = ha.add("x0", extra_args=["--create-cluster-from", str(state)])
    r.start()
    leader = ha.wait_leader()
    assert leader.status()["epoch"] == 8
    assert json.loads(state.read_text()).get("moved-to-cluster") == ha.name

    # the old single coordinator on the moved file
    p, _ = run_bad("--state-file", str(state), "--listen",
                   "unix:" + str(ha.dir / "single.sock"))
    assert p.returncode == 1, p.stderr
    assert "moved to the HA cluster '%s'" % ha.name in p.stderr, p.stderr

    # the same replica, its first command line again: joins
    r.stop()
    r.start()
    assert ha.wait_leader() is r
    assert r.status()["epoch"] > 8

    # another cluster's name on the moved file: refused
    p, _ = run_bad("--etcd-endpoints=" + ",".join(etcd.urls), "--cluster",
                   ha.name[:60] + "-other", "--create-cluster-from",
                   str(state), "--listen", "unix:" + str(ha.dir / "o.sock"))
    assert p.returncode == 1 and "not '%s-other'" % ha.name[:60] in p.stderr, \
        p.stderr

    # a file not moved, into the existing cluster: refused, left alone
    other = tmp_path / "other.state"
    other.write_text('{"version":1,"epoch":3}\n')
    p, _ = run_bad("--etcd-endpoints=" + ",".join(etcd.urls), "--cluster",
                   ha.name, "--create-cluster-from", str(other), "--listen",
                   "unix:" + str(ha.dir / "o.sock"))
    assert p.returncode == 1 and "exists in etcd already" in p.stderr, \
        p.stderr
    assert other.read_text() == '{"version":1,"epoch":3}\n'


def test_create_cluster_from_dies_before_the_mark(ha, etcd, tmp_path):
    """--create-cluster-from that dies before its state file is marked
    (here: RLIMIT_FSIZE 0 kills it with SIGXFSZ at its first write to a
    regular file, which is the mark) never leaves a cluster in etcd next
    to a state file a single coordinator accepts: the two would grant the
    same extents with different epochs.  The file is marked before the
    cluster is created, so the replica dies before it wrote anything to
    etcd, and its first command line then does the move."""
    import resource
    import signal

    state = tmp_path / "single.state"
    state.write_text('{"version":1,"epoch":7}\n')

    def no_file_writes():
        resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    r = subprocess.run([str(EXTLOCKD), "--etcd-endpoints=" +
                        ",".join(etcd.urls), "--cluster", ha.name,
                        "--create-cluster-from", str(state), "--listen",
                        "unix:" + str(ha.dir / "dying.sock")],
                       capture_output=True, text=True, timeout=15,
                       preexec_fn=no_file_writes)
    assert r.returncode == -signal.SIGXFSZ, (r.returncode, r.stderr)
    key = base64.b64encode(("/extlock/%s/state" % ha.name).encode()).decode()
    in_etcd = bool(etcd_post(etcd.url(0), "/v3/kv/range", {"key": key},
                             2.0).get("kvs"))

    # a single coordinator on the file, as an operator would restart it
    sock = ha.dir / "single.sock"
    log = open(ha.dir / "single.log", "w")
    p = subprocess.Popen([str(EXTLOCKD), "--state-file", str(state),
                          "--listen", "unix:" + str(sock)],
                         stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: sock.exists() or p.poll() is not None, 10,
                 "the single coordinator listening or refusing")
        accepted = p.poll() is None
    finally:
        p.terminate()
        p.wait(10)
        log.close()
    assert not (in_etcd and accepted), \
        "cluster %s in etcd and the single coordinator runs on %s: %s" % (
            ha.name, state, state.read_text())
    assert not in_etcd

    # the same command line again completes the move
    x = ha.add("x0", extra_args=["--create-cluster-from", str(state)])
    x.start()
    assert ha.wait_leader() is x
    assert x.status()["epoch"] > 7
    assert json.loads(state.read_text()).get("moved-to-cluster") == ha.name


def test_create_cluster_from_unreadable_state_file(ha, etcd, tmp_path):
    """--create-cluster-from a path that exists but cannot be read (a
    directory): one clear error, exit 1, nothing in etcd."""
    state = tmp_path / "dir.state"
    state.mkdir()
    r, _ = run_bad("--etcd-endpoints=" + ",".join(etcd.urls), "--cluster",
                   ha.name, "--create-cluster-from", str(state), "--listen",
                   "unix:" + str(ha.dir / "bad.sock"))
    assert r.returncode == 1, r.stderr
    assert "--create-cluster-from" in r.stderr and str(state) in r.stderr, \
        r.stderr
    assert "GError set over the top" not in r.stderr, r.stderr
    key = base64.b64encode(("/extlock/%s/state" % ha.name).encode()).decode()
    got = etcd_post(etcd.url(0), "/v3/kv/range", {"key": key}, 2.0)
    assert not got.get("kvs"), got
