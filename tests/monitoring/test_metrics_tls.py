# The metrics endpoint over HTTPS (--metrics-tls-creds-dir): served only
# over TLS, and with ca-cert.pem only to clients whose certificate that
# CA signed; a real Prometheus scrapes it with tls_config.
# SPDX-License-Identifier: GPL-2.0-or-later
# Copyright (c) 2026 The extlock authors
import shutil
import ssl
import subprocess
import urllib.error
import urllib.request

import pytest

from conftest import EXTLOCKD, PROMETHEUS, Prometheus, free_port, wait_for

pytestmark = pytest.mark.skipif(not shutil.which("certtool"),
                                reason="certtool missing (gnutls-bin)")

# Two CAs: "ca" signs the server and the good client, "other" signs a
# client the server must refuse.
PKI = r"""
set -e
key() { certtool --generate-privkey --key-type=ecdsa --outfile "$1" 2>/dev/null; }
ca() {
  key $1-key.pem
  printf 'cn = %s\nca\ncert_signing_key\nexpiration_days = 2\n' $1 > $1.info
  certtool --generate-self-signed --load-privkey $1-key.pem \
    --template $1.info --outfile $1-cert.pem 2>/dev/null
}
sign() {    # NAME CA USAGE
  key $1-key.pem
  printf 'cn = %s\nip_address = 127.0.0.1\n%s\nsigning_key\nexpiration_days = 2\n' \
    $1 $3 > $1.info
  certtool --generate-certificate --load-ca-certificate $2-cert.pem \
    --load-ca-privkey $2-key.pem --load-privkey $1-key.pem \
    --template $1.info --outfile $1-cert.pem 2>/dev/null
}
ca ca
ca other
sign server ca tls_www_server
sign client ca tls_www_client
sign stranger other tls_www_client
mkdir -p verify serveronly
cp server-cert.pem server-key.pem verify/
cp ca-cert.pem verify/ca-cert.pem
cp server-cert.pem server-key.pem serveronly/
"""


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    subprocess.run(["bash", "-c", PKI], cwd=d, check=True, timeout=120)
    return d


def https_get(port, pki, cert=None, path="/metrics"):
    """(status, body) of GET https://127.0.0.1:port/path, verifying the
    server against ca-cert.pem, presenting @cert (a name in @pki) if
    given; (None, error) if TLS or the connection failed."""
    ctx = ssl.create_default_context(cafile=str(pki / "ca-cert.pem"))
    if cert:
        ctx.load_cert_chain(str(pki / f"{cert}-cert.pem"),
                            str(pki / f"{cert}-key.pem"))
    try:
        with urllib.request.urlopen(f"https://127.0.0.1:{port}{path}",
                                    context=ctx, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except (urllib.error.URLError, ConnectionError, ssl.SSLError) as e:
        return None, str(e)


def take_grants(d, n=20):
    c = d.client("tls-mon")
    for i in range(n):
        g = c.lock(i * 4096, 4096, "exclusive")
        c.unlock(g["lock"])
    c.close()


def test_client_certificate_required(extlockd, pki):
    """With ca-cert.pem: a client with a certificate of that CA gets the
    metrics; no certificate, one of another CA, or one of that CA for TLS
    servers only (key purpose), gets 403 and no metric;
    plain HTTP gets nothing."""
    d = extlockd("METRICS", f"--metrics-tls-creds-dir={pki / 'verify'}")
    take_grants(d)
    # the text is rendered once a second: wait for the grants in it
    status, body = wait_for(
        lambda: (lambda r: r if 'extlock_grants_total{lock_space="mon"}'
                 in r[1] else None)(https_get(d.metrics_port, pki, "client")),
        15, "the grants in the HTTPS metrics")
    assert status == 200, body
    assert "# TYPE extlock_grants_total counter" in body

    # "server" is of the right CA but meant for TLS servers only
    # (extended key usage serverAuth): not a client certificate
    for cert in (None, "stranger", "server"):
        status, body = https_get(d.metrics_port, pki, cert)
        assert status in (403, None), (cert, status, body)
        assert "extlock_" not in body, (cert, body)

    try:
        with urllib.request.urlopen(d.metrics_url(), timeout=10) as r:
            plain = r.read().decode(errors="replace")
    except (urllib.error.URLError, ConnectionError, OSError) as e:
        plain = str(e)
    assert "extlock_grants_total" not in plain
    assert d.alive(), d.log.read_text()
    # still serving the good client afterwards
    assert https_get(d.metrics_port, pki, "client")[0] == 200


def test_server_only_tls(extlockd, pki):
    """Without ca-cert.pem the endpoint is HTTPS for anybody."""
    d = extlockd("METRICS", f"--metrics-tls-creds-dir={pki / 'serveronly'}")
    status, body = https_get(d.metrics_port, pki)
    assert status == 200 and "extlock_grants_total" in body, (status, body)
    assert "metrics at https://" in d.log.read_text()


@pytest.mark.skipif(not PROMETHEUS, reason="prometheus (Debian) missing")
def test_real_prometheus_scrapes_over_tls(extlockd, pki, tmp_path):
    """A real Prometheus with tls_config (CA, client certificate) scrapes
    the HTTPS endpoint; its query API sees the grants."""
    d = extlockd("METRICS", f"--metrics-tls-creds-dir={pki / 'verify'}")
    take_grants(d, 50)
    prom = Prometheus(tmp_path, f"""  - job_name: extlockd-tls
    scheme: https
    tls_config:
      ca_file: {pki / 'ca-cert.pem'}
      cert_file: {pki / 'client-cert.pem'}
      key_file: {pki / 'client-key.pem'}
    static_configs:
      - targets: ['127.0.0.1:{d.metrics_port}']
""")
    try:
        s = prom.wait_series(
            "extlock_grants_total",
            lambda s: s["metric"].get("lock_space") == "mon" and
            float(s["value"][1]) >= 50,
            90, "Prometheus to scrape the HTTPS endpoint")
        assert s["metric"]["job"] == "extlockd-tls"
    finally:
        prom.stop()


@pytest.mark.parametrize("setup, extra, message", [
    (None, ["--metrics-tls-creds-dir=DIR"], "needs --metrics-listen"),
    (None, ["METRICS", "--metrics-tls-creds-dir=DIR/nope"],
     "not a directory"),
    ("nokey", ["METRICS", "--metrics-tls-creds-dir=DIR"], "server-key.pem"),
    ("mismatch", ["METRICS", "--metrics-tls-creds-dir=DIR"],
     "server-cert.pem and server-key.pem"),
    ("badca", ["METRICS", "--metrics-tls-creds-dir=DIR"], "ca-cert.pem"),
])
def test_bad_tls_options(tmp_path, pki, setup, extra, message):
    """Bad credentials are refused at start, with a clear error, before
    anything happens: no socket, no state file."""
    creds = tmp_path / "creds"
    creds.mkdir()
    if setup == "nokey":
        shutil.copy(pki / "server-cert.pem", creds / "server-cert.pem")
    elif setup == "mismatch":
        shutil.copy(pki / "server-cert.pem", creds / "server-cert.pem")
        shutil.copy(pki / "client-key.pem", creds / "server-key.pem")
    elif setup == "badca":
        shutil.copy(pki / "server-cert.pem", creds / "server-cert.pem")
        shutil.copy(pki / "server-key.pem", creds / "server-key.pem")
        (creds / "ca-cert.pem").write_text("not a certificate\n")
    args = []
    for a in extra:
        if a == "METRICS":
            a = f"--metrics-listen=127.0.0.1:{free_port()}"
        args.append(a.replace("DIR", str(creds)))
    p = subprocess.run([str(EXTLOCKD), "-l", f"unix:{tmp_path}/s",
                        "-s", str(tmp_path / "state"), *args],
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 2, (p.returncode, p.stderr)
    assert message in p.stderr, p.stderr
    assert not (tmp_path / "s").exists()
    assert not (tmp_path / "state").exists()
