/*
 * extlock: security tests against the real extlockd (TLS, identities,
 * policy, resume secrets, limits against floods)
 *
 * Copyright (c) 2026 The extlock authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 *
 * Certificates are made in each test with certtool (gnutls-bin), as
 * QEMU's documentation does: one CA, a server certificate for 127.0.0.1,
 * client certificates with the common names host-a, host-b and admin, and
 * a second ("rogue") CA with a client certificate of its own.  Every
 * refusal is checked three ways: the client gets a clear error, the
 * daemon logs it, and nothing anybody else holds changes (a victim
 * session keeps its lock and its lease).
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <setjmp.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>
#include <cmocka.h>
#include <glib.h>
#include <gio/gio.h>
#include <json-c/json.h>

#include "extlockd-harness.h"

/* The daemon's resident set must stay below this through every flood */
#define RSS_BOUND_KIB   (64 * 1024)
/* extlockd's default --max-unauth */
#define EXTLOCKD_TEST_MAX_UNAUTH 256

static const char policy_text[] =
    "# test policy\n"
    "[identity x509:host-a]\n"
    "lock-spaces=space-a*\n"
    "client-ids=host-a/*\n"
    "\n"
    "[identity x509:host-b]\n"
    "lock-spaces=shared\n"
    "client-ids=host-b/*\n"
    "\n"
    "[identity x509:admin]\n"
    "lock-spaces=*\n"
    "client-ids=*\n"
    "admin=true\n"
    "\n"
    "[identity psk:alice]\n"
    "lock-spaces=shared\n"
    "client-ids=alice/*\n";

typedef struct Pki {
    char *server;               /* --tls-creds-dir of the daemon */
    char *host_a, *host_b, *admin;  /* client credential directories */
    char *rogue;                /* client cert from another CA */
    char *nocert;               /* only the CA: no client certificate */
    char *policy;
} Pki;

static void run_sh(const char *script)
{
    const char *argv[] = { "/bin/sh", "-ec", script, NULL };
    g_autofree char *out = NULL, *err_text = NULL;
    GError *err = NULL;
    int status;

    if (!g_spawn_sync(fx.dir, (char **)argv, NULL, G_SPAWN_DEFAULT, NULL,
                      NULL, &out, &err_text, &status, &err)) {
        fail_msg("cannot run sh: %s", err->message);
    }
    if (!g_spawn_check_wait_status(status, NULL)) {
        fail_msg("script failed:\n%s\n%s%s", script, out, err_text);
    }
}

/*
 * The layout of QEMU's tls-creds-x509 directories: ca-cert.pem, and
 * server-cert.pem/server-key.pem or client-cert.pem/client-key.pem
 */
static void make_pki(Pki *p)
{
    static const char script[] =
        "command -v certtool >/dev/null || "
        "  { echo 'certtool missing: apt-get install gnutls-bin'; exit 1; }\n"
        "mkdir -p pki && cd pki\n"
        "key() { certtool --generate-privkey --key-type=ecdsa "
        "  --outfile \"$1\" 2>/dev/null; }\n"
        "ca() { key $1-key.pem\n"
        "  printf 'cn = %s\\nca\\ncert_signing_key\\nexpiration_days = 2\\n' "
        "    \"$1\" > $1.info\n"
        "  certtool --generate-self-signed --load-privkey $1-key.pem "
        "    --template $1.info --outfile $1-cert.pem 2>/dev/null; }\n"
        "cert() { # CA NAME KIND DIR\n"
        "  mkdir -p $4; cp $1-cert.pem $4/ca-cert.pem\n"
        "  key $4/$3-key.pem\n"
        "  if [ $3 = server ]; then\n"
        "    printf 'cn = %s\\nip_address = 127.0.0.1\\ndns_name = localhost\\n"
        "tls_www_server\\nsigning_key\\nexpiration_days = 2\\n' $2 > $4.info\n"
        "  else\n"
        "    printf 'cn = %s\\ntls_www_client\\nsigning_key\\n"
        "expiration_days = 2\\n' $2 > $4.info\n"
        "  fi\n"
        "  certtool --generate-certificate --load-ca-certificate $1-cert.pem "
        "    --load-ca-privkey $1-key.pem --load-privkey $4/$3-key.pem "
        "    --template $4.info --outfile $4/$3-cert.pem 2>/dev/null; }\n"
        "ca ca; ca rogue\n"
        "cert ca localhost server server\n"
        "cert ca host-a client host-a\n"
        "cert ca host-b client host-b\n"
        "cert ca admin client admin\n"
        "cert rogue host-a client rogue\n"
        "cp ca-cert.pem rogue/ca-cert.pem   # it trusts the real server\n"
        "mkdir -p nocert; cp ca-cert.pem nocert/\n";

    run_sh(script);
    p->server = g_build_filename(fx.dir, "pki", "server", NULL);
    p->host_a = g_build_filename(fx.dir, "pki", "host-a", NULL);
    p->host_b = g_build_filename(fx.dir, "pki", "host-b", NULL);
    p->admin = g_build_filename(fx.dir, "pki", "admin", NULL);
    p->rogue = g_build_filename(fx.dir, "pki", "rogue", NULL);
    p->nocert = g_build_filename(fx.dir, "pki", "nocert", NULL);
    p->policy = g_build_filename(fx.dir, "policy.conf", NULL);
    assert_true(g_file_set_contents(p->policy, policy_text, -1, NULL));
}

static void pki_free(Pki *p)
{
    g_free(p->server);
    g_free(p->host_a);
    g_free(p->host_b);
    g_free(p->admin);
    g_free(p->rogue);
    g_free(p->nocert);
    g_free(p->policy);
}

/* A TLS connection with the credentials in @dir (NULL on failure) */
static ExtlockConn *tls_try(const char *address, const char *dir,
                            const char *psk_user, GError **errp)
{
    ExtlockTlsOptions o = {
        .creds_dir = dir,
        .psk_username = psk_user,
    };
    ExtlockConn *c = extlock_conn_connect_tls(address, &o, errp);

    if (c) {
        g_ptr_array_add(fx.conns, c);
    }
    return c;
}

static ExtlockConn *tls_open(const char *address, const char *dir)
{
    GError *err = NULL;
    ExtlockConn *c = tls_try(address, dir, NULL, &err);

    if (!c) {
        fail_msg("TLS connect %s with %s: %s", address, dir, err->message);
    }
    return c;
}

/*
 * Send hello (with @session and @secret if not NULL); return the reply
 * (a welcome or an error) in @r
 */
static void hello_reply(ExtlockConn *c, const char *client_id,
                        const char *space, const char *session,
                        const char *secret, ExtlockMsg *r)
{
    ExtlockMsg m;
    GError *err = NULL;

    extlock_msg_init(&m, EXTLOCK_MSG_HELLO);
    m.client_id = (char *)client_id;
    m.lock_space = (char *)space;
    m.session = (char *)session;
    m.resume_secret = (char *)secret;
    m.lease_ms = LONG_LEASE_MS;
    extlock_msg_init(r, EXTLOCK_MSG_INVALID);
    if (!extlock_conn_call(c, &m, r, RECV_MS, &err)) {
        fail_msg("hello: %s", err->message);
    }
    if (r->type == EXTLOCK_MSG_WELCOME) {
        secret_remember(r->session, r->resume_secret);
    }
}

/* hello must be refused with permission-denied */
static void hello_denied(ExtlockConn *c, const char *client_id,
                         const char *space, const char *session,
                         const char *secret)
{
    ExtlockMsg r;

    hello_reply(c, client_id, space, session, secret, &r);
    if (r.type != EXTLOCK_MSG_ERROR || r.error != EXTLOCK_ERR_DENIED) {
        fail_msg("hello of %s in %s (session %s) was not denied: %s %s",
                 client_id, space, session ? session : "-",
                 extlock_msg_type_name(r.type),
                 r.message ? r.message : "");
    }
    assert_non_null(r.message);
    assert_true(strlen(r.message) > 10);
    extlock_msg_clear(&r);
}

/* hello must succeed; returns the session id (g_free) */
static char *hello_ok(ExtlockConn *c, const char *client_id,
                      const char *space, const char *identity)
{
    ExtlockMsg r;
    char *session;

    hello_reply(c, client_id, space, NULL, NULL, &r);
    if (r.type != EXTLOCK_MSG_WELCOME) {
        fail_msg("hello of %s in %s refused: %s: %s", client_id, space,
                 extlock_error_code_name(r.error),
                 r.message ? r.message : "");
    }
    assert_int_equal(r.version, EXTLOCK_PROTOCOL_VERSION);
    assert_non_null(r.resume_secret);
    assert_int_equal(strlen(r.resume_secret), EXTLOCK_SECRET_LEN);
    if (identity) {
        assert_non_null(r.identity);
        assert_string_equal(r.identity, identity);
    }
    session = g_strdup(r.session);
    extlock_msg_clear(&r);
    return session;
}

/* The reply to one "status" request (a status reply or an error) */
static void status_reply(ExtlockConn *c, ExtlockMsg *r)
{
    ExtlockMsg m;
    GError *err = NULL;

    extlock_msg_init(&m, EXTLOCK_MSG_STATUS);
    extlock_msg_init(r, EXTLOCK_MSG_INVALID);
    if (!extlock_conn_call(c, &m, r, RECV_MS, &err)) {
        fail_msg("status: %s", err->message);
    }
}

/* Who holds and waits for what (status without counters and timers) */
static char *holdings(ExtlockConn *mon)
{
    g_autofree char *text = status_stable(mon, NULL);
    json_object *st = json_tokener_parse(text);
    json_object *spaces = jget(st, "lock-spaces");
    char *out;

    for (size_t i = 0; i < json_object_array_length(spaces); i++) {
        json_object_object_del(json_object_array_get_idx(spaces, i),
                               "counters");
    }
    out = g_strdup_printf("%s %s", json_object_to_json_string(spaces),
                          json_object_to_json_string(jget(st, "sessions")));
    json_object_put(st);
    return out;
}

static char *status_text(ExtlockConn *c)
{
    json_object *st = status_get(c);
    char *text = g_strdup(json_object_to_json_string_ext(
        st, JSON_C_TO_STRING_PLAIN | JSON_C_TO_STRING_NOSLASHESCAPE));

    json_object_put(st);
    return text;
}

/* How often @needle occurs in the daemon's log */
static unsigned log_count(Daemon *d, const char *needle)
{
    g_autofree char *text = NULL;
    unsigned n = 0;

    if (!g_file_get_contents(d->log, &text, NULL, NULL)) {
        return 0;
    }
    for (const char *p = text; (p = strstr(p, needle)) != NULL; p++) {
        n++;
    }
    return n;
}

/* Wait (bounded) until the log has more than @before lines with @needle */
static void wait_log(Daemon *d, const char *needle, unsigned before)
{
    int64_t deadline = now_ms() + RECV_MS;

    while (log_count(d, needle) <= before) {
        if (now_ms() > deadline) {
            dump_log(d);
            fail_msg("the daemon did not log \"%s\"", needle);
        }
        g_usleep(10 * 1000);
    }
}

static int run_ctl(const char *const *args, char **out, char **err_text)
{
    g_autoptr(GPtrArray) argv = g_ptr_array_new();
    GError *err = NULL;
    int status;

    g_ptr_array_add(argv, (char *)extlockctl_bin);
    for (int i = 0; args[i]; i++) {
        g_ptr_array_add(argv, (char *)args[i]);
    }
    g_ptr_array_add(argv, NULL);
    if (!g_spawn_sync(NULL, (char **)argv->pdata, NULL, G_SPAWN_DEFAULT,
                      NULL, NULL, out, err_text, &status, &err)) {
        fail_msg("cannot run extlockctl: %s", err->message);
    }
    return WIFEXITED(status) ? WEXITSTATUS(status) : 128;
}

/* The victim's lock must still be held by it, with the same token */
static void check_victim(ExtlockConn *mon, const char *session, Grant g)
{
    json_object *st = status_get(mon);
    json_object *s = find_session(st, session);
    json_object *spaces = jget(st, "lock-spaces");
    bool found = false;

    assert_non_null(s);
    assert_string_equal(jstr(s, "state"), "active");
    assert_int_equal(jint(s, "locks-held"), 1);
    for (size_t i = 0; i < json_object_array_length(spaces); i++) {
        json_object *held = jget(json_object_array_get_idx(spaces, i),
                                 "held");

        for (size_t j = 0; j < json_object_array_length(held); j++) {
            json_object *l = json_object_array_get_idx(held, j);

            if (jint(l, "lock") == (int64_t)g.lock &&
                jint(l, "token") == (int64_t)g.token &&
                strcmp(jstr(l, "session"), session) == 0) {
                found = true;
            }
        }
    }
    assert_true(found);
    json_object_put(st);
}

static long rss_kib(pid_t pid)
{
    g_autofree char *path = g_strdup_printf("/proc/%d/status", (int)pid);
    g_autofree char *text = NULL;
    const char *p;

    assert_true(g_file_get_contents(path, &text, NULL, NULL));
    p = strstr(text, "VmRSS:");
    assert_non_null(p);
    return strtol(p + 6, NULL, 10);
}

static Daemon *tls_daemon(Pki *p, const char *state, bool policy)
{
    const char *extra[] = {
        "--tls-creds-dir", p->server, policy ? "--policy" : NULL,
        p->policy, NULL,
    };

    return daemon_start(state, extra, NULL);
}

/* ------------------------------------------------------------------ */
/* Tests                                                               */

/*
 * TLS listener: clients without TLS, with a certificate of another CA or
 * without a certificate are refused (clear error for the client, a log
 * line in the daemon); a client that checks the server's name refuses a
 * certificate for another name.  A victim session is untouched.
 */
static void test_tls_refusals(void **state)
{
    Pki p = { 0 };
    Daemon *d;
    ExtlockConn *victim, *mon, *c;
    GError *err = NULL;
    ExtlockMsg r;
    g_autofree char *sv = NULL, *out = NULL, *errs = NULL;
    Grant g;
    unsigned n;

    make_pki(&p);
    d = tls_daemon(&p, NULL, true);
    victim = tls_open(d->tcp_addr, p.host_b);
    sv = hello_ok(victim, "host-b/d0", "shared", "x509:host-b");
    g = lock_now(victim, 0, 4096, EXTLOCK_MODE_EXCLUSIVE);
    mon = conn_open(d->unix_addr);

    /* Plain TCP to the TLS port: the hello never gets an answer */
    n = log_count(d, "TLS handshake failed");
    c = conn_open(d->tcp_addr);
    send_raw(c, "{\"type\":\"hello\",\"id\":1,\"version\":2,\"client-id\":"
                "\"host-b/d0\",\"lock-space\":\"shared\"}\n");
    extlock_msg_init(&r, EXTLOCK_MSG_INVALID);
    assert_false(extlock_conn_recv(c, &r, RECV_MS, &err));
    g_clear_error(&err);
    wait_log(d, "TLS handshake failed", n);

    /* A client certificate from another CA */
    n = log_count(d, "connection refused");
    c = tls_try(d->tcp_addr, p.rogue, NULL, &err);
    if (c) {
        /* TLS 1.3: the server's verdict arrives after the handshake */
        extlock_msg_init(&r, EXTLOCK_MSG_HELLO);
        r.client_id = g_strdup("host-a/d0");
        r.lock_space = g_strdup("space-a");
        assert_false(extlock_conn_call(c, &r, &r, RECV_MS, &err));
        extlock_msg_clear(&r);
    }
    assert_non_null(err);
    g_test_message("rogue client: %s", err->message);
    g_clear_error(&err);
    wait_log(d, "connection refused", n);
    assert_true(log_count(d, "rejected") + log_count(d, "certificate") > 0);

    /* No client certificate at all */
    n = log_count(d, "connection refused");
    c = tls_try(d->tcp_addr, p.nocert, NULL, &err);
    if (c) {
        extlock_msg_init(&r, EXTLOCK_MSG_STATUS);
        assert_false(extlock_conn_call(c, &r, &r, RECV_MS, &err));
        extlock_msg_clear(&r);
    }
    assert_non_null(err);
    g_clear_error(&err);
    wait_log(d, "connection refused", n);

    /* The client checks the server's name */
    {
        ExtlockTlsOptions o = { .creds_dir = p.host_a,
                                .hostname = "coordinator.example" };

        c = extlock_conn_connect_tls(d->tcp_addr, &o, &err);
        assert_null(c);
        assert_non_null(strstr(err->message, "server certificate rejected"));
        g_clear_error(&err);
    }

    /* extlockctl: admin over TLS yes; a non-admin or no TLS: refused */
    {
        const char *admin_args[] = { "-c", d->tcp_addr, "--tls-creds-dir",
                                     p.admin, "sessions", NULL };
        const char *user_args[] = { "-c", d->tcp_addr, "--tls-creds-dir",
                                    p.host_a, "sessions", NULL };
        const char *plain_args[] = { "-c", d->tcp_addr, "sessions", NULL };

        assert_int_equal(run_ctl(admin_args, &out, &errs), 0);
        assert_non_null(strstr(out, sv));
        g_clear_pointer(&out, g_free);
        g_clear_pointer(&errs, g_free);
        assert_int_equal(run_ctl(user_args, &out, &errs), 1);
        assert_non_null(strstr(errs, "permission-denied"));
        assert_non_null(strstr(errs, "admin"));
        g_clear_pointer(&out, g_free);
        g_clear_pointer(&errs, g_free);
        assert_int_equal(run_ctl(plain_args, &out, &errs), 1);
        assert_non_null(strstr(errs, "extlockctl:"));
    }

    renew(victim);
    check_victim(mon, sv, g);
    daemon_stop(d);
    pki_free(&p);
}

/*
 * Many TLS records at once, and big replies that take many records and
 * several non-blocking writes (GNUTLS_E_AGAIN): 2000 lock requests, each
 * in a record of its own, sent before reading any reply; then a status of
 * all of them from an admin over TLS.  (The daemon's handling of data
 * GnuTLS has buffered is defensive: GnuTLS reads the socket record by
 * record and the daemon reads 64 KiB, more than a record, so this test
 * passes without it too.)
 */
#define PIPELINED 2000

static void test_tls_pipelining(void **state)
{
    Pki p = { 0 };
    Daemon *d;
    ExtlockConn *a, *adm;
    g_autofree char *sa = NULL, *text = NULL;
    uint64_t first_id;

    make_pki(&p);
    d = tls_daemon(&p, NULL, true);
    a = tls_open(d->tcp_addr, p.host_a);
    sa = hello_ok(a, "host-a/d0", "space-a", "x509:host-a");
    first_id = extlock_conn_next_id(a);
    for (int i = 0; i < PIPELINED; i++) {
        ExtlockMsg m;

        extlock_msg_init(&m, EXTLOCK_MSG_LOCK);
        m.offset = (uint64_t)i * 4096;
        m.length = 4096;
        m.mode = EXTLOCK_MODE_SHARED;
        send_msg(a, &m);
    }
    for (int i = 0; i < PIPELINED; i++) {
        expect_granted(a, first_id + i, (uint64_t)i * 4096, 4096,
                       EXTLOCK_MODE_SHARED);
    }
    adm = tls_open(d->tcp_addr, p.admin);
    text = status_text(adm);
    assert_true(strlen(text) > PIPELINED * 100);
    assert_non_null(strstr(text, "\"offset\":8187904"));  /* the last */
    renew(a);
    daemon_stop(d);
    pki_free(&p);
}

/*
 * With a policy: host-a may not use host-b's lock-space or client-ids,
 * cannot resume host-b's session even with its secret, cannot unlock its
 * locks; status shows no secrets and, to non-admins, nobody else.  The
 * policy is reloaded on SIGHUP; a bad file is refused and the old one
 * stays.
 */
static void test_identity_isolation(void **state)
{
    Pki p = { 0 };
    Daemon *d;
    ExtlockConn *b, *a, *a2, *b2, *adm, *mon;
    g_autofree char *sb = NULL, *sa = NULL, *text = NULL, *before = NULL;
    char *secret_b;
    ExtlockMsg r, m;
    Grant gb;
    unsigned n;

    make_pki(&p);
    d = tls_daemon(&p, NULL, true);
    mon = conn_open(d->unix_addr);
    b = tls_open(d->tcp_addr, p.host_b);
    sb = hello_ok(b, "host-b/d0", "shared", "x509:host-b");
    secret_b = g_strdup(secret_of(sb));
    gb = lock_now(b, 0, 65536, EXTLOCK_MODE_EXCLUSIVE);
    before = holdings(mon);

    /* Lock-space and client-id outside host-a's policy */
    a = tls_open(d->tcp_addr, p.host_a);
    n = log_count(d, "hello refused");
    hello_denied(a, "host-a/d0", "shared", NULL, NULL);
    hello_denied(a, "host-b/d0", "space-a1", NULL, NULL);
    wait_log(d, "hello refused", n + 1);
    assert_true(log_count(d, "may not use lock-space shared") >= 1);
    assert_true(log_count(d, "may not use client-id host-b/d0") >= 1);

    /* Resuming host-b's session: not even with the leaked secret */
    a2 = tls_open(d->tcp_addr, p.host_a);
    n = log_count(d, "may not resume session");
    hello_denied(a2, "host-b/d0", "shared", sb, secret_b);
    adm = tls_open(d->tcp_addr, p.admin);
    hello_denied(adm, "host-b/d0", "shared", sb, secret_b);
    /* ... nor by host-b itself without the right secret */
    b2 = tls_open(d->tcp_addr, p.host_b);
    hello_denied(b2, "host-b/d0", "shared", sb, NULL);
    hello_denied(b2, "host-b/d0", "shared", sb,
                 "0000000000000000000000000000000000000000000000000000000000000000");
    wait_log(d, "may not resume session", n + 2);
    /* host-a was stopped by the policy already, the admin by ownership */
    assert_true(log_count(d, "belongs to another identity") >= 1);
    assert_true(log_count(d, "wrong or missing resume-secret") >= 2);

    /* B still owns its connection (no take-over) and its lock */
    renew(b);
    text = holdings(mon);
    assert_string_equal(text, before);
    g_clear_pointer(&text, g_free);

    /* host-a in its own lock-space cannot touch B's lock */
    sa = hello_ok(a, "host-a/d0", "space-a1", "x509:host-a");
    extlock_msg_init(&m, EXTLOCK_MSG_UNLOCK);
    m.lock = gb.lock;
    send_msg(a, &m);
    expect_error(a, true, m.id, EXTLOCK_ERR_NOT_FOUND);

    /* Status: non-admins only before hello for admins; never a secret */
    status_reply(a2, &r);
    assert_int_equal(r.type, EXTLOCK_MSG_ERROR);
    assert_int_equal(r.error, EXTLOCK_ERR_DENIED);
    extlock_msg_clear(&r);
    text = status_text(a);
    assert_null(strstr(text, "host-b"));
    assert_null(strstr(text, sb));
    assert_null(strstr(text, secret_b));
    assert_null(strstr(text, secret_of(sa)));
    assert_null(strstr(text, "resume-secret"));
    assert_non_null(strstr(text, sa));
    g_clear_pointer(&text, g_free);
    text = status_text(adm);            /* an admin, before hello */
    assert_non_null(strstr(text, "host-b/d0"));
    assert_non_null(strstr(text, sb));
    assert_non_null(strstr(text, "x509:host-b"));
    assert_null(strstr(text, secret_b));
    assert_null(strstr(text, secret_of(sa)));
    assert_null(strstr(text, "resume-secret"));
    g_clear_pointer(&text, g_free);

    /* SIGHUP with a broken policy: refused, the old one stays */
    n = log_count(d, "policy not reloaded");
    assert_true(g_file_set_contents(p.policy, "[identity x509:host-a]\n"
                                    "lock-spaces=*\nbogus=1\n", -1, NULL));
    assert_int_equal(kill(d->pid, SIGHUP), 0);
    wait_log(d, "policy not reloaded", n);
    a2 = tls_open(d->tcp_addr, p.host_a);
    hello_denied(a2, "host-a/d1", "shared", NULL, NULL);
    g_free(hello_ok(a2, "host-a/d1", "space-a2", NULL));

    /* A good one that lets host-a into "shared" */
    n = log_count(d, "policy reloaded");
    assert_true(g_file_set_contents(p.policy, "[identity x509:host-a]\n"
                                    "lock-spaces=shared\n"
                                    "client-ids=host-a/*\n", -1, NULL));
    assert_int_equal(kill(d->pid, SIGHUP), 0);
    wait_log(d, "policy reloaded", n);
    a2 = tls_open(d->tcp_addr, p.host_a);
    g_free(hello_ok(a2, "host-a/d2", "shared", "x509:host-a"));
    extlock_msg_init(&m, EXTLOCK_MSG_LOCK);
    m.offset = 0;
    m.length = 1;
    m.mode = EXTLOCK_MODE_SHARED;
    m.wait = false;
    send_msg(a2, &m);
    expect_error(a2, true, m.id, EXTLOCK_ERR_WOULD_BLOCK);

    renew(b);
    check_victim(mon, sb, gb);
    g_free(secret_b);
    daemon_stop(d);
    pki_free(&p);
}

/*
 * After a restart, only the identity that owned a session may reclaim it
 * (the owner is in the state file, the secret only as a hash)
 */
static void test_reclaim_identity(void **state)
{
    Pki p = { 0 };
    Daemon *d;
    ExtlockConn *b, *adm;
    g_autofree char *sb = NULL, *text = NULL, *path = NULL;
    g_autofree char *old_secret = NULL, *hash = NULL;
    ExtlockMsg r, m;
    Grant gb;
    struct stat st;

    make_pki(&p);
    path = g_build_filename(fx.dir, "reclaim.state", NULL);
    d = tls_daemon(&p, path, true);
    b = tls_open(d->tcp_addr, p.host_b);
    sb = hello_ok(b, "host-b/d0", "shared", "x509:host-b");
    old_secret = g_strdup(secret_of(sb));
    gb = lock_now(b, 4096, 4096, EXTLOCK_MODE_EXCLUSIVE);

    assert_true(g_file_get_contents(path, &text, NULL, NULL));
    assert_non_null(strstr(text, "\"owner\":\"x509:host-b\""));
    hash = g_compute_checksum_for_string(G_CHECKSUM_SHA256, old_secret, -1);
    assert_non_null(strstr(text, hash));
    assert_null(strstr(text, old_secret));
    assert_int_equal(stat(path, &st), 0);
    assert_int_equal(st.st_mode & 077, 0);

    /* Crash and restart */
    assert_int_equal(kill(d->pid, SIGKILL), 0);
    assert_true(daemon_wait_exit(d, 5000));
    d = tls_daemon(&p, path, true);

    /* The admin identity, with B's secret, may not reclaim it */
    adm = tls_open(d->tcp_addr, p.admin);
    hello_denied(adm, "host-b/d0", "shared", sb, old_secret);
    assert_true(log_count(d, "belongs to another identity") >= 1);

    /* host-b with its secret reclaims, and gets a new secret */
    b = tls_open(d->tcp_addr, p.host_b);
    hello_reply(b, "host-b/d0", "shared", sb, old_secret, &r);
    assert_int_equal(r.type, EXTLOCK_MSG_WELCOME);
    assert_true(r.reclaim);
    assert_string_equal(r.session, sb);
    assert_non_null(r.resume_secret);
    assert_string_not_equal(r.resume_secret, old_secret);
    extlock_msg_clear(&r);
    extlock_msg_init(&m, EXTLOCK_MSG_RECLAIM);
    m.offset = 4096;
    m.length = 4096;
    m.mode = EXTLOCK_MODE_EXCLUSIVE;
    m.token = gb.token;
    send_msg(b, &m);
    expect_msg(b, &r, EXTLOCK_MSG_GRANTED, m.id);
    assert_int_equal(r.token, gb.token);
    extlock_msg_clear(&r);
    /* The old secret is void now */
    b = tls_open(d->tcp_addr, p.host_b);
    hello_denied(b, "host-b/d0", "shared", sb, old_secret);
    daemon_stop(d);
    pki_free(&p);
}

/* PSK in QEMU's keys.psk format: the identity is psk:NAME */
static void test_psk(void **state)
{
    g_autofree char *dir = g_build_filename(fx.dir, "psk", NULL);
    g_autofree char *bad = g_build_filename(fx.dir, "psk-bad", NULL);
    g_autofree char *keys = g_build_filename(dir, "keys.psk", NULL);
    g_autofree char *bad_keys = g_build_filename(bad, "keys.psk", NULL);
    g_autofree char *policy = g_build_filename(fx.dir, "policy.conf", NULL);
    g_autofree char *s = NULL, *out = NULL, *errs = NULL;
    const char *extra[] = { "--tls-creds-dir", dir, "--policy", policy,
                            NULL };
    Daemon *d;
    ExtlockConn *c;
    GError *err = NULL;
    ExtlockMsg r;
    unsigned n;

    assert_int_equal(g_mkdir_with_parents(dir, 0700), 0);
    assert_int_equal(g_mkdir_with_parents(bad, 0700), 0);
    assert_true(g_file_set_contents(keys,
        "alice:00112233445566778899aabbccddeeff00112233445566778899aabb"
        "ccddeeff\n", -1, NULL));
    assert_true(g_file_set_contents(bad_keys,
        "alice:ffeeddccbbaa99887766554433221100ffeeddccbbaa998877665544"
        "33221100\n", -1, NULL));
    assert_true(g_file_set_contents(policy, policy_text, -1, NULL));
    d = daemon_start(NULL, extra, NULL);

    c = tls_try(d->tcp_addr, dir, "alice", &err);
    assert_non_null(c);
    s = hello_ok(c, "alice/vm1", "shared", "psk:alice");
    lock_now(c, 0, 1, EXTLOCK_MODE_SHARED);

    /* The wrong key: the handshake fails on both sides */
    n = log_count(d, "connection refused");
    c = tls_try(d->tcp_addr, bad, "alice", &err);
    if (c) {
        extlock_msg_init(&r, EXTLOCK_MSG_STATUS);
        assert_false(extlock_conn_call(c, &r, &r, RECV_MS, &err));
        extlock_msg_clear(&r);
    }
    assert_non_null(err);
    g_clear_error(&err);
    wait_log(d, "connection refused", n);

    /* alice is no admin: extlockctl gets a clear refusal */
    {
        const char *args[] = { "-c", d->tcp_addr, "--tls-creds-dir", dir,
                               "--tls-psk-user", "alice", NULL };

        assert_int_equal(run_ctl(args, &out, &errs), 1);
        assert_non_null(strstr(errs, "permission-denied"));
    }
    daemon_stop(d);
}

/*
 * UNIX peers are uid:N (logged with their pid); TCP without TLS needs
 * --insecure, and its clients are "anonymous" (not admins)
 */
static void test_unix_identity_and_insecure(void **state)
{
    g_autofree char *me = g_strdup_printf("uid:%u", (unsigned)getuid());
    g_autofree char *logged = g_strdup_printf("uid %u pid %d",
                                              (unsigned)getuid(),
                                              (int)getpid());
    g_autofree char *out = NULL, *errs = NULL, *tcp = NULL, *sock = NULL;
    g_autofree char *state_path = NULL;
    Daemon *d = daemon_start(NULL, NULL, NULL);
    ExtlockConn *u = conn_open(d->unix_addr);
    ExtlockConn *t = conn_open(d->tcp_addr);
    ExtlockMsg r;
    GError *err = NULL;
    int status;

    g_free(hello_ok(u, "local/d0", "disk", me));
    wait_log(d, logged, 0);
    assert_true(log_count(d, "INSECURE") >= 1);
    status_reply(t, &r);
    assert_int_equal(r.type, EXTLOCK_MSG_ERROR);
    assert_int_equal(r.error, EXTLOCK_ERR_DENIED);
    assert_string_equal(r.message, "status before hello needs an admin "
                        "identity (this connection is anonymous)");
    extlock_msg_clear(&r);
    g_free(hello_ok(t, "remote/d0", "disk", "anonymous"));

    /*
     * Forcing a session's release is for admins only: "anonymous" is
     * refused (and learns nothing about the session), uid 0 on the UNIX
     * socket is told that the session is not expired
     */
    {
        ExtlockMsg m;

        extlock_msg_init(&m, EXTLOCK_MSG_RELEASE_SESSION);
        m.session = (char *)"0123456789abcdef0123456789abcdef";
        send_msg(t, &m);
        extlock_msg_init(&r, EXTLOCK_MSG_INVALID);
        recv_msg(t, &r, 5000);
        assert_int_equal(r.type, EXTLOCK_MSG_ERROR);
        assert_int_equal(r.error, EXTLOCK_ERR_DENIED);
        assert_int_equal(r.id, m.id);
        assert_string_equal(r.message, "release-session needs an admin "
                            "identity (this connection is anonymous)");
        extlock_msg_clear(&r);
        wait_log(d, "release-session of 0123456789abcdef0123456789abcdef "
                 "refused: identity anonymous is not an admin", 0);
        extlock_msg_init(&m, EXTLOCK_MSG_RELEASE_SESSION);
        m.session = (char *)"0123456789abcdef0123456789abcdef";
        send_msg(u, &m);
        expect_error(u, true, m.id, EXTLOCK_ERR_NOT_FOUND);
    }
    daemon_stop(d);

    /* No TLS, no --insecure: refused at start, with the way out */
    tcp = g_strdup_printf("tcp:127.0.0.1:%d", free_tcp_port());
    sock = g_build_filename(fx.dir, "x.sock", NULL);
    state_path = g_build_filename(fx.dir, "x.state", NULL);
    {
        const char *argv[] = { extlockd_bin, "--listen", tcp,
                               "--state-file", state_path, NULL };

        assert_true(g_spawn_sync(NULL, (char **)argv, NULL, G_SPAWN_DEFAULT,
                                 NULL, NULL, &out, &errs, &status, &err));
        assert_true(WIFEXITED(status));
        assert_int_equal(WEXITSTATUS(status), 2);
        assert_non_null(strstr(errs, "--tls-creds-dir"));
        assert_non_null(strstr(errs, "--insecure"));
    }
}

/*
 * Floods: 2000 idle connections (from 20 loopback addresses), a status
 * flood from a client that never reads, 3000 malformed lines.  Meanwhile
 * a victim renews its lease and keeps its lock, every renewal is answered
 * before its lease can have run out (see Renewer), and the daemon's RSS
 * stays below
 * RSS_BOUND_KIB.  Defaults for every limit except the hello timeout,
 * which is short so that the test can wait for it.
 */
#define VICTIM_LEASE_MS 2000
#define HELLO_TIMEOUT_MS 1500

/*
 * A victim that renews its lease from its own thread (four times a lease,
 * like the driver, or more often), while the main thread floods the
 * daemon.  What a victim needs is that its lease never runs out: each
 * renewal must be answered
 * before the lease given by the previous one can have ended, i.e. before
 * (previous renewal sent) + lease - the daemon extended the lease when it
 * processed that renewal, which was after it was sent.  That bound is
 * derived from the configured lease only; how fast the renewals are
 * answered is printed, not asserted (a benchmark figure).  The test's own
 * pace (a main thread waiting for welcomes) cannot starve the victim.
 */
typedef struct Renewer {
    ExtlockConn *c;
    int64_t lease_ms;
    int64_t every_ms;
    int64_t last_sent;
    GThread *thread;
    gint stop;
    /* read after renewer_stop() */
    unsigned renewals;
    unsigned late;
    int64_t worst_ms;
    char *error;
} Renewer;

static gpointer renewer_main(gpointer opaque)
{
    Renewer *r = opaque;
    int64_t prev_sent = r->last_sent;

    do {
        int64_t t0 = now_ms(), t1;
        GError *err = NULL;
        ExtlockMsg req, rep;

        extlock_msg_init(&req, EXTLOCK_MSG_RENEW);
        extlock_msg_init(&rep, EXTLOCK_MSG_INVALID);
        /* Wait past the deadline, so that a late answer is counted */
        if (!extlock_conn_call(r->c, &req, &rep, 4 * r->lease_ms, &err)) {
            r->error = g_strdup_printf("renewal %u: %s", r->renewals,
                                       err->message);
            g_error_free(err);
            break;
        }
        t1 = now_ms();
        if (rep.type != EXTLOCK_MSG_RENEWED) {
            r->error = g_strdup_printf("renewal %u answered with %s (%s)",
                                       r->renewals,
                                       extlock_msg_type_name(rep.type),
                                       rep.message ? rep.message : "");
            extlock_msg_clear(&rep);
            break;
        }
        extlock_msg_clear(&rep);
        if (t1 >= prev_sent + r->lease_ms) {
            r->late++;
        }
        r->worst_ms = MAX(r->worst_ms, t1 - t0);
        r->renewals++;
        prev_sent = t0;
        /* Pacing, not synchronisation: renew again every_ms on */
        while (!g_atomic_int_get(&r->stop) && now_ms() < t0 + r->every_ms) {
            g_usleep(5 * 1000);
        }
    } while (!g_atomic_int_get(&r->stop));
    return NULL;
}

/*
 * Start renewing @c every @every_ms (at least once); @c sent its last
 * renewal, which was answered, at @last_sent (now_ms())
 */
static void renewer_start(Renewer *r, ExtlockConn *c, int64_t lease_ms,
                          int64_t every_ms, int64_t last_sent)
{
    *r = (Renewer) { .c = c, .lease_ms = lease_ms, .every_ms = every_ms,
                     .last_sent = last_sent };
    r->thread = g_thread_new("renewer", renewer_main, r);
}

/* Stop and check: every renewal answered in time, none failed */
static void renewer_stop(Renewer *r, const char *what)
{
    g_atomic_int_set(&r->stop, 1);
    g_thread_join(r->thread);
    g_test_message("%s: %u renewals, worst %" PRId64 " ms (lease %" PRId64
                   " ms), %u late", what, r->renewals, r->worst_ms,
                   r->lease_ms, r->late);
    if (r->error) {
        fail_msg("%s: %s", what, r->error);
    }
    assert_true(r->renewals >= 1);
    assert_int_equal(r->late, 0);
}

/* What the daemon sent on @fd before closing it (bounded wait) */
static char *read_all(int fd)
{
    GString *got = g_string_new(NULL);
    int64_t deadline = now_ms() + RECV_MS;
    char buf[4096];

    for (;;) {
        struct pollfd pfd = { .fd = fd, .events = POLLIN };
        ssize_t n;

        assert_true(now_ms() < deadline);
        if (poll(&pfd, 1, 100) <= 0) {
            continue;
        }
        n = recv(fd, buf, sizeof(buf), MSG_DONTWAIT);
        if (n <= 0) {
            break;
        }
        g_string_append_len(got, buf, n);
    }
    return g_string_free(got, FALSE);
}

static int raw_tcp(const char *src_ip, int port)
{
    struct sockaddr_in src = { .sin_family = AF_INET };
    struct sockaddr_in dst = { .sin_family = AF_INET };
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);

    assert_true(fd >= 0);
    inet_pton(AF_INET, src_ip, &src.sin_addr);
    inet_pton(AF_INET, "127.0.0.1", &dst.sin_addr);
    dst.sin_port = htons(port);
    if (bind(fd, (struct sockaddr *)&src, sizeof(src)) < 0 ||
        connect(fd, (struct sockaddr *)&dst, sizeof(dst)) < 0) {
        fail_msg("TCP from %s to port %d: %s", src_ip, port,
                 g_strerror(errno));
    }
    return fd;
}

/* Write as much of @line, repeated up to @count times, as fits; no reads */
static unsigned blast(int fd, const char *line, unsigned count)
{
    size_t len = strlen(line);
    unsigned sent = 0;
    g_autoptr(GString) buf = g_string_new(NULL);

    for (unsigned i = 0; i < 100; i++) {
        g_string_append(buf, line);
    }
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
    while (sent < count) {
        unsigned n = MIN(100, count - sent);
        ssize_t w = send(fd, buf->str, n * len, MSG_NOSIGNAL);

        if (w < (ssize_t)(n * len)) {
            /* Full (the daemon pushes back) or closed: stop here */
            sent += w > 0 ? w / len : 0;
            break;
        }
        sent += n;
    }
    return sent;
}

static void test_floods(void **state)
{
    g_autofree char *hello_to = NULL;
    const char *extra[] = { "--status-rate=10", NULL, NULL };
    Daemon *d;
    int port;
    ExtlockConn *victim, *mon;
    ExtlockConn *flooder;
    g_autofree char *sv = NULL;
    GArray *fds;
    int64_t deadline, t_renew, t_flood;
    unsigned timed_out;
    Renewer rn;
    long rss, max_rss = 0;
    json_object *st;
    int64_t errors0, refused, sent;
    Grant g;

    /*
     * RSS_BOUND_KIB is for the daemon's own allocations: under ASan+UBSan
     * its memory is several times larger (shadow, quarantine), so the
     * bound says nothing there (run-tests.sh sets this in its sanitizer
     * step; the test runs in the normal build)
     */
    if (g_getenv("EXTLOCK_UNDER_SANITIZER")) {
        skip();
    }
    hello_to = g_strdup_printf("--hello-timeout-ms=%d", HELLO_TIMEOUT_MS);
    extra[1] = hello_to;
    d = daemon_start(NULL, extra, NULL);
    port = atoi(strrchr(d->tcp_addr, ':') + 1);
    victim = conn_open(d->unix_addr);
    mon = conn_open(d->unix_addr);
    fds = g_array_new(FALSE, FALSE, sizeof(int));

    {
        ExtlockMsg w;
        GError *err = NULL;

        extlock_msg_init(&w, EXTLOCK_MSG_INVALID);
        assert_true(extlock_conn_hello(victim, "victim/d0", "disk",
                                       VICTIM_LEASE_MS, &w, &err));
        sv = g_strdup(w.session);
        extlock_msg_clear(&w);
    }
    g = lock_now(victim, 0, 4096, EXTLOCK_MODE_EXCLUSIVE);
    t_renew = now_ms();
    renew(victim);
    renewer_start(&rn, victim, VICTIM_LEASE_MS, VICTIM_LEASE_MS / 4, t_renew);

    /* 1. 2000 idle connections, 100 from each of 20 addresses */
    t_flood = now_ms();
    for (int i = 0; i < 2000; i++) {
        char ip[32];
        int fd;

        g_snprintf(ip, sizeof(ip), "127.0.0.%d", 10 + i / 100);
        fd = raw_tcp(ip, port);
        g_array_append_val(fds, fd);
        if (i % 100 == 99) {
            max_rss = MAX(max_rss, rss_kib(d->pid));
        }
    }
    /*
     * Wait until the daemon has dealt with all 2000 (accepted and kept,
     * refused, or - on a slow machine, where opening them takes longer
     * than HELLO_TIMEOUT_MS - closed at the hello timeout, which frees a
     * place for one more): the cap is checked against what it did, not
     * against a guess that it all happens within the hello timeout.
     */
    deadline = now_ms() + HANG_MS;
    for (;;) {
        int64_t conns;

        st = status_get(mon);
        refused = jint(jget(st, "counters"), "refused-connections");
        conns = jint(jget(st, "counters"), "connections");
        json_object_put(st);
        /* At most 256 without hello at any time (+ victim and mon) */
        assert_true(conns <= EXTLOCKD_TEST_MAX_UNAUTH + 2);
        timed_out = log_count(d, "no hello within");
        if (refused + (conns - 2) + timed_out >= 2000) {
            break;
        }
        assert_true(now_ms() < deadline);
        g_usleep(10 * 1000);
    }
    g_test_message("idle flood: %" PRId64 " refused, %u closed at the hello "
                   "timeout meanwhile, RSS %ld KiB", refused, timed_out,
                   max_rss);
    /* Let in: at most 256, and one more for each closed meanwhile */
    assert_true(refused >= 2000 - EXTLOCKD_TEST_MAX_UNAUTH -
                (int64_t)timed_out);
    assert_true(log_count(d, "refusing connection from") >= 1);
    /* The refusals are logged once a second at most, not 1744 times */
    assert_true(log_count(d, "refusing connection from") <=
                (now_ms() - t_flood) / 1000 + 2);

    /* ... and those let in are closed after the hello timeout */
    deadline = now_ms() + HELLO_TIMEOUT_MS + SLACK_MS * 2;
    for (;;) {
        int64_t conns;

        st = status_get(mon);
        conns = jint(jget(st, "counters"), "connections");
        json_object_put(st);
        if (conns <= 2) {
            break;
        }
        assert_true(now_ms() < deadline);
        g_usleep(50 * 1000);
    }
    assert_true(log_count(d, "no hello within") >= 1);
    /* Both kinds of refusal say why before closing */
    {
        g_autofree char *first = read_all(g_array_index(fds, int, 0));
        g_autofree char *last = read_all(g_array_index(fds, int,
                                                       fds->len - 1));

        assert_non_null(strstr(first, "no hello within"));
        assert_non_null(strstr(last, "limit-exceeded"));
    }
    for (guint i = 0; i < fds->len; i++) {
        close(g_array_index(fds, int, i));
    }
    g_array_set_size(fds, 0);

    /* 2. A status flood from a client that never reads */
    flooder = conn_open(d->tcp_addr);
    g_free(hello_ok(flooder, "flooder/d0", "other", "anonymous"));
    st = status_get(mon);
    errors0 = jint(jget(st, "counters"), "errors");
    json_object_put(st);
    sent = blast(extlock_conn_fd(flooder),
                 "{\"type\":\"status\",\"id\":7}\n", 200000);
    max_rss = MAX(max_rss, rss_kib(d->pid));
    /*
     * Most are refused by the rate limit, not answered with a status.
     * The daemon reads the flood at its own pace (on a loaded machine it
     * had counted 90 of them when blast() returned): wait, bounded, for
     * more than 1000 refusals; without the rate limit there are none.
     */
    deadline = now_ms() + HANG_MS;
    for (;;) {
        int64_t errors;

        st = status_get(mon);
        errors = jint(jget(st, "counters"), "errors") - errors0;
        json_object_put(st);
        if (errors > 1000 || now_ms() >= deadline) {
            g_test_message("status flood: %" PRId64 " sent, %" PRId64
                           " errors (rate limit), RSS %ld KiB", sent, errors,
                           max_rss);
            assert_true(errors > 1000);
            break;
        }
        g_usleep(200 * 1000);   /* below the monitor's own status rate */
    }
    max_rss = MAX(max_rss, rss_kib(d->pid));

    /* 3. 3000 malformed lines, no reads */
    {
        int fd = raw_tcp("127.0.0.5", port);

        st = status_get(mon);
        errors0 = jint(jget(st, "counters"), "errors");
        json_object_put(st);
        assert_int_equal(blast(fd, "this is { not json\n", 3000), 3000);
        deadline = now_ms() + RECV_MS;
        for (;;) {
            int64_t e;

            max_rss = MAX(max_rss, rss_kib(d->pid));
            st = status_get(mon);
            e = jint(jget(st, "counters"), "errors") - errors0;
            json_object_put(st);
            if (e >= 3000) {
                break;
            }
            assert_true(now_ms() < deadline);
            g_usleep(20 * 1000);
        }
        close(fd);
    }

    rss = rss_kib(d->pid);
    max_rss = MAX(max_rss, rss);
    g_test_message("max RSS %ld KiB", max_rss);
    renewer_stop(&rn, "victim during the floods");
    assert_true(max_rss < RSS_BOUND_KIB);
    renew(victim);
    check_victim(mon, sv, g);
    g_array_free(fds, TRUE);
    daemon_stop(d);
}

/*
 * A hello storm on a slow disk (every state file write takes
 * STORM_STATE_DELAY_MS): STORM new sessions at once.  The writes are
 * coalesced off the event loop, so the victim's renewals are not delayed,
 * every welcome arrives, and the state file lists every session.
 */
#define STATE_DELAY_MS 50
#define STORM 200
#define STORM_STATE_DELAY_MS 400
/*
 * The storm victim's lease: a quarter of what the STORM writes would cost
 * one by one on the event loop (80 s), so that such a daemon holds a
 * renewal far past the lease (the renewal sent into the storm waits for
 * most of the writes) - and a daemon that coalesces has 3/4 of 20 s to
 * answer on a loaded machine.  Seen with 50 ms writes and a 5 s lease
 * under ASan at load average 15-28 on 2 CPUs: 200 welcomes took 9.8 s of
 * CPU-starved event loop and a renewal 3.8 s, twice in a row, which was
 * counted late although no renewal waited for a write.
 */
#define STORM_VICTIM_LEASE_MS (STORM * STORM_STATE_DELAY_MS / 4)

static void test_hello_storm(void **state)
{
    g_autofree char *delay = g_strdup_printf("EXTLOCKD_TEST_STATE_DELAY_MS=%d",
                                             STORM_STATE_DELAY_MS);
    const char *env[] = { delay, NULL };
    Daemon *d = daemon_start(NULL, NULL, env);
    ExtlockConn *victim = conn_open(d->unix_addr);
    ExtlockConn *mon = conn_open(d->unix_addr);
    ExtlockConn *c[STORM];
    uint64_t ids[STORM];
    g_autofree char *sv = NULL, *text = NULL;
    int64_t t0, t_renew;
    Renewer rn;
    Grant g;

    {
        ExtlockMsg w;
        GError *err = NULL;

        extlock_msg_init(&w, EXTLOCK_MSG_INVALID);
        assert_true(extlock_conn_hello(victim, "victim/d0", "disk",
                                       STORM_VICTIM_LEASE_MS, &w,
                                       &err));
        sv = g_strdup(w.session);
        extlock_msg_clear(&w);
    }
    g = lock_now(victim, 0, 4096, EXTLOCK_MODE_EXCLUSIVE);
    t_renew = now_ms();
    renew(victim);
    renewer_start(&rn, victim, STORM_VICTIM_LEASE_MS,
                  STORM_VICTIM_LEASE_MS / 4, t_renew);

    t0 = now_ms();
    for (int i = 0; i < STORM; i++) {
        g_autofree char *cid = g_strdup_printf("storm/%d", i);
        ExtlockMsg m;

        c[i] = conn_open(d->unix_addr);
        extlock_msg_init(&m, EXTLOCK_MSG_HELLO);
        m.client_id = cid;
        m.lock_space = (char *)"storm";
        m.lease_ms = LONG_LEASE_MS;
        send_msg(c[i], &m);
        ids[i] = m.id;
    }
    for (int i = 0; i < STORM; i++) {
        ExtlockMsg w;

        /* How soon is not checked here: the renewer's verdict is */
        extlock_msg_init(&w, EXTLOCK_MSG_INVALID);
        recv_msg(c[i], &w, HANG_MS);
        assert_int_equal(w.type, EXTLOCK_MSG_WELCOME);
        assert_int_equal(w.id, ids[i]);
        extlock_msg_clear(&w);
    }
    g_test_message("hello storm: %d welcomes in %" PRId64 " ms (a write "
                   "takes %d ms)", STORM, now_ms() - t0, STORM_STATE_DELAY_MS);
    /*
     * Written one by one on the event loop, the STORM writes would hold a
     * renewal for up to STORM * STORM_STATE_DELAY_MS = 80 s, past the
     * victim's 20 s lease: the renewer would count it late.
     */
    renewer_stop(&rn, "victim during the hello storm");
    /* Every session is in the file (it was, before its welcome) */
    assert_true(g_file_get_contents(d->state, &text, NULL, NULL));
    for (int i = 0; i < STORM; i++) {
        g_autofree char *cid = g_strdup_printf("\"storm/%d\"", i);

        assert_non_null(strstr(text, cid));
    }
    check_victim(mon, sv, g);
    daemon_stop(d);
}

/*
 * After a crash, every client comes back at once (on a slow disk): each
 * reclaim welcome carries a new resume secret that must be durable first.
 * The writes are coalesced, so the client that came back first renews
 * undisturbed, and every other one is told to reclaim.
 */
#define RECLAIMERS 30

static void test_reclaim_storm(void **state)
{
    g_autofree char *delay = g_strdup_printf("EXTLOCKD_TEST_STATE_DELAY_MS=%d",
                                             STATE_DELAY_MS);
    g_autofree char *path = g_build_filename(fx.dir, "storm.state", NULL);
    const char *env[] = { delay, NULL };
    const char *grace[] = { "--grace-ms=40000", NULL };
    char *sess[RECLAIMERS] = { NULL };
    char *secrets[RECLAIMERS];
    ExtlockConn *c[RECLAIMERS];
    uint64_t ids[RECLAIMERS];
    int64_t t_renew;
    Renewer rn;
    Daemon *d = daemon_start(path, NULL, NULL);

    for (int i = 0; i < RECLAIMERS; i++) {
        g_autofree char *cid = g_strdup_printf("r/%d", i);

        c[i] = conn_open(d->unix_addr);
        sess[i] = hello_ok(c[i], cid, "disk", NULL);
        secrets[i] = secret_of(sess[i]);
        lock_now(c[i], (uint64_t)i * 4096, 4096, EXTLOCK_MODE_EXCLUSIVE);
    }
    assert_int_equal(kill(d->pid, SIGKILL), 0);
    assert_true(daemon_wait_exit(d, 5000));
    d = daemon_start(path, grace, env);

    /* The first one back renews while the others come back */
    c[0] = conn_open(d->unix_addr);
    {
        ExtlockMsg w;

        hello_reply(c[0], "r/0", "disk", sess[0], secrets[0], &w);
        assert_int_equal(w.type, EXTLOCK_MSG_WELCOME);
        assert_true(w.reclaim);
        extlock_msg_clear(&w);
    }
    t_renew = now_ms();
    renew(c[0]);
    renewer_start(&rn, c[0], LONG_LEASE_MS, STATE_DELAY_MS, t_renew);
    for (int i = 1; i < RECLAIMERS; i++) {
        g_autofree char *cid = g_strdup_printf("r/%d", i);
        ExtlockMsg m;

        c[i] = conn_open(d->unix_addr);
        extlock_msg_init(&m, EXTLOCK_MSG_HELLO);
        m.client_id = cid;
        m.lock_space = (char *)"disk";
        m.session = sess[i];
        m.resume_secret = secrets[i];
        m.lease_ms = LONG_LEASE_MS;
        send_msg(c[i], &m);
        ids[i] = m.id;
    }
    for (int i = 1; i < RECLAIMERS; i++) {
        ExtlockMsg w;

        extlock_msg_init(&w, EXTLOCK_MSG_INVALID);
        expect_msg(c[i], &w, EXTLOCK_MSG_WELCOME, ids[i]);
        assert_true(w.reclaim);
        assert_string_equal(w.session, sess[i]);
        extlock_msg_clear(&w);
    }
    /*
     * The first one back keeps its lease throughout.  How much the
     * coalesced writes delay a renewal (a write takes STATE_DELAY_MS; the
     * worst renewal is printed) is a performance figure, not asserted: a
     * wall-clock bound of a few writes failed on a loaded machine.
     */
    renewer_stop(&rn, "first one back during the reclaim storm");
    daemon_stop(d);
    for (int i = 0; i < RECLAIMERS; i++) {
        g_free(sess[i]);
    }
}

/* Run extlockd with @args; its exit status, stderr in *@err_text */
static int run_daemon(const char *const *args, char **err_text)
{
    g_autoptr(GPtrArray) argv = g_ptr_array_new();
    g_autofree char *state_path = g_build_filename(fx.dir, "opt.state",
                                                   NULL);
    g_autofree char *sock = g_build_filename(fx.dir, "opt.sock", NULL);
    g_autofree char *listen = g_strdup_printf("unix:%s", sock);
    GError *err = NULL;
    int status;

    g_ptr_array_add(argv, (char *)extlockd_bin);
    g_ptr_array_add(argv, (char *)"--state-file");
    g_ptr_array_add(argv, state_path);
    g_ptr_array_add(argv, (char *)"--listen");
    g_ptr_array_add(argv, listen);
    for (int i = 0; args[i]; i++) {
        g_ptr_array_add(argv, (char *)args[i]);
    }
    g_ptr_array_add(argv, NULL);
    if (!g_spawn_sync(NULL, (char **)argv->pdata, NULL, G_SPAWN_DEFAULT,
                      NULL, NULL, NULL, err_text, &status, &err)) {
        fail_msg("cannot run extlockd: %s", err->message);
    }
    return WIFEXITED(status) ? WEXITSTATUS(status) : 128;
}

/* Bad security options and files: a clear message, no daemon */
static void test_bad_security_options(void **state)
{
    g_autofree char *policy = g_build_filename(fx.dir, "bad.conf", NULL);
    g_autofree char *empty = g_build_filename(fx.dir, "empty", NULL);
    static const struct {
        const char *args[4];
        int status;
        const char *says;
    } cases[] = {
        { { "--tls-verify-peer=maybe", NULL }, 2, "yes or no" },
        { { "--tls-verify-peer=no", NULL }, 2, "--tls-creds-dir" },
        { { "--hello-timeout-ms=0", NULL }, 2, "--hello-timeout-ms" },
        { { "--max-unauth=0", NULL }, 2, "--max-unauth" },
        { { "--max-unauth-per-peer=0", NULL }, 2, "--max-unauth-per-peer" },
        { { "--status-rate=0", NULL }, 2, "--status-rate" },
        { { "--tls-creds-dir", "/nonexistent/tls", NULL }, 1,
          "does not exist" },
        { { "--tls-creds-dir", "EMPTY", NULL }, 1, "neither" },
        { { "--policy", "/nonexistent/policy.conf", NULL }, 1,
          "policy file" },
        { { "--policy", "POLICY", NULL }, 1, "unknown group" },
        { { "--policy", "ACTIONS", NULL }, 1,
          "allow: unknown action \"write-all\" (expected read, write, "
          "reserve, freeze, maintain)" },
        { { "--policy", "MAXREG", NULL }, 1,
          "max-registrations must be a number from 0 to 64, not \"65\"" },
    };
    g_autofree char *actions = g_build_filename(fx.dir, "actions.conf", NULL);
    g_autofree char *maxreg = g_build_filename(fx.dir, "maxreg.conf", NULL);

    assert_true(g_file_set_contents(policy, "[somebody]\nadmin=true\n", -1,
                                    NULL));
    assert_true(g_file_set_contents(actions, "[identity uid:5]\n"
                                    "lock-spaces=*\nclient-ids=*\n"
                                    "allow=read;write-all\n", -1, NULL));
    assert_true(g_file_set_contents(maxreg, "[identity uid:5]\n"
                                    "lock-spaces=*\nclient-ids=*\n"
                                    "max-registrations=65\n", -1, NULL));
    assert_int_equal(g_mkdir_with_parents(empty, 0700), 0);
    for (size_t i = 0; i < G_N_ELEMENTS(cases); i++) {
        const char *args[4];
        g_autofree char *err_text = NULL;

        for (int j = 0; j < 4; j++) {
            const char *a = cases[i].args[j];

            args[j] = a && strcmp(a, "EMPTY") == 0 ? empty :
                      a && strcmp(a, "POLICY") == 0 ? policy :
                      a && strcmp(a, "ACTIONS") == 0 ? actions :
                      a && strcmp(a, "MAXREG") == 0 ? maxreg : a;
        }
        assert_int_equal(run_daemon(args, &err_text), cases[i].status);
        if (!strstr(err_text, cases[i].says)) {
            fail_msg("case %zu: \"%s\" not in: %s", i, cases[i].says,
                     err_text);
        }
    }
}

/*
 * Persistent reservations: every successful pr-out is pushed as a
 * pr-update to every subscribed session of the lock-space and waits
 * there for their pr-acks.  One session that sends pr-outs without
 * waiting for their results must not pile up updates (and queued
 * changes) without bound in front of a session that is slow to read and
 * acknowledge: at most EXTLOCKD_TEST_MAX_PR_PENDING pr-outs of a session
 * wait, more get limit-exceeded and change nothing.
 */
#define EXTLOCKD_TEST_MAX_PR_PENDING 16
#define PR_FLOOD 2000

static void test_pr_out_flood(void **state)
{
    Daemon *d = daemon_start(NULL, NULL, NULL);
    ExtlockConn *victim = client(d->unix_addr, "victim/0", LONG_LEASE_MS);
    ExtlockConn *attacker = client(d->unix_addr, "attacker/0", LONG_LEASE_MS);
    unsigned updates = 0, limited = 0, results = 0, others = 0;
    uint64_t last_seq = 0, renew_id, ack_id, in_id;
    ExtlockMsg m = { .type = EXTLOCK_MSG_INVALID };

    /* The victim subscribes, then reads nothing while the flood comes */
    in_id = send_simple(victim, EXTLOCK_MSG_PR_IN);
    expect_msg(victim, &m, EXTLOCK_MSG_PR_STATUS, in_id);
    extlock_msg_clear(&m);

    for (unsigned i = 0; i < PR_FLOOD; i++) {
        extlock_msg_init(&m, EXTLOCK_MSG_PR_OUT);
        m.pr_action = EXTLOCK_PR_REGISTER_AND_IGNORE;
        m.pr_sa_key = 1 + i % 2;
        send_msg(attacker, &m);
    }
    /* Its renew is answered once every pr-out before it was handled */
    renew_id = send_simple(attacker, EXTLOCK_MSG_RENEW);
    for (unsigned n = 0; n < 3 * PR_FLOOD + 10; n++) {
        recv_msg(attacker, &m, RECV_MS);
        if (m.type == EXTLOCK_MSG_RENEWED && m.id == renew_id) {
            extlock_msg_clear(&m);
            break;
        }
        if (m.type == EXTLOCK_MSG_ERROR && m.error == EXTLOCK_ERR_LIMIT) {
            limited++;
        } else if (m.type == EXTLOCK_MSG_PR_RESULT) {
            results++;
        } else if (m.type != EXTLOCK_MSG_PR_UPDATE) {
            others++;
        }
        extlock_msg_clear(&m);
    }
    assert_int_equal(others, 0);
    /* Nobody acknowledged: no pr-out was answered yet */
    assert_int_equal(results, 0);

    /* What piled up for the victim, up to its renew's reply */
    renew_id = send_simple(victim, EXTLOCK_MSG_RENEW);
    for (unsigned n = 0; n < PR_FLOOD + 10; n++) {
        recv_msg(victim, &m, RECV_MS);
        if (m.type == EXTLOCK_MSG_RENEWED && m.id == renew_id) {
            extlock_msg_clear(&m);
            break;
        }
        assert_int_equal(m.type, EXTLOCK_MSG_PR_UPDATE);
        assert_true(m.pr_seq > last_seq);
        last_seq = m.pr_seq;
        updates++;
        extlock_msg_clear(&m);
    }
    if (updates > EXTLOCKD_TEST_MAX_PR_PENDING) {
        fail_msg("one session's %u pr-outs without waiting queued %u "
                 "pr-updates for another session (limit-exceeded: %u)",
                 PR_FLOOD, updates, limited);
    }
    assert_int_equal(updates, EXTLOCKD_TEST_MAX_PR_PENDING);
    assert_int_equal(limited, PR_FLOOD - EXTLOCKD_TEST_MAX_PR_PENDING);

    /* The victim acknowledges: the waiting pr-outs are answered */
    extlock_msg_init(&m, EXTLOCK_MSG_PR_ACK);
    m.pr_seq = last_seq;
    send_msg(victim, &m);
    ack_id = m.id;
    expect_msg(victim, &m, EXTLOCK_MSG_PR_ACKED, ack_id);
    extlock_msg_clear(&m);
    for (unsigned i = 0; i < EXTLOCKD_TEST_MAX_PR_PENDING; i++) {
        recv_msg(attacker, &m, RECV_MS);
        assert_int_equal(m.type, EXTLOCK_MSG_PR_RESULT);
        assert_int_equal(m.pr_result, EXTLOCK_PR_OK);
        extlock_msg_clear(&m);
    }
    /* ... and the attacker may send again */
    extlock_msg_init(&m, EXTLOCK_MSG_PR_OUT);
    m.pr_action = EXTLOCK_PR_REGISTER_AND_IGNORE;
    m.pr_sa_key = 7;
    send_msg(attacker, &m);
    recv_msg(attacker, &m, RECV_MS);
    assert_int_equal(m.type, EXTLOCK_MSG_PR_UPDATE);
    extlock_msg_clear(&m);
    recv_msg(victim, &m, RECV_MS);
    assert_int_equal(m.type, EXTLOCK_MSG_PR_UPDATE);
    extlock_msg_clear(&m);
    daemon_stop(d);
}

/* Send a pr-out (the reply is the caller's to read); its request id */
static uint64_t send_pr_out(ExtlockConn *c, ExtlockPrAction action,
                            unsigned type, uint64_t key, uint64_t sa_key)
{
    ExtlockMsg m = { .type = EXTLOCK_MSG_INVALID };

    extlock_msg_init(&m, EXTLOCK_MSG_PR_OUT);
    m.pr_action = action;
    m.pr_type = type;
    m.pr_key = key;
    m.pr_sa_key = sa_key;
    send_msg(c, &m);
    return m.id;
}

/*
 * Read from @c until the pr-result of @id (pr-updates before it are
 * acknowledged if @ack); fails on anything else
 */
static void pr_wait_result(ExtlockConn *c, uint64_t id, bool ack)
{
    ExtlockMsg m = { .type = EXTLOCK_MSG_INVALID };

    for (int n = 0; n < 16; n++) {
        recv_msg(c, &m, RECV_MS);
        if (m.type == EXTLOCK_MSG_PR_RESULT && m.id == id) {
            assert_int_equal(m.pr_result, EXTLOCK_PR_OK);
            extlock_msg_clear(&m);
            return;
        }
        assert_int_equal(m.type, EXTLOCK_MSG_PR_UPDATE);
        if (ack) {
            uint64_t seq = m.pr_seq, ack_id;

            extlock_msg_clear(&m);
            extlock_msg_init(&m, EXTLOCK_MSG_PR_ACK);
            m.pr_seq = seq;
            send_msg(c, &m);
            ack_id = m.id;
            expect_msg(c, &m, EXTLOCK_MSG_PR_ACKED, ack_id);
        }
        extlock_msg_clear(&m);
    }
    fail_msg("no pr-result for pr-out %" PRIu64, id);
}

/* Acknowledge the next pr-update on @c */
static void pr_ack_next(ExtlockConn *c)
{
    ExtlockMsg m = { .type = EXTLOCK_MSG_INVALID };
    uint64_t seq, id;

    recv_msg(c, &m, RECV_MS);
    assert_int_equal(m.type, EXTLOCK_MSG_PR_UPDATE);
    seq = m.pr_seq;
    extlock_msg_clear(&m);
    extlock_msg_init(&m, EXTLOCK_MSG_PR_ACK);
    m.pr_seq = seq;
    send_msg(c, &m);
    id = m.id;
    expect_msg(c, &m, EXTLOCK_MSG_PR_ACKED, id);
    extlock_msg_clear(&m);
}

/*
 * PREEMPT AND ABORT of a client whose connection is gone (partitioned,
 * still writing until its own lease deadline and then for up to the
 * fence margin with writes in flight).  The pr-out waits for its lease
 * to lapse; the victim's locks must then go by the lease rule - at its
 * deadline plus the fence margin, after the fence agent if there is one -
 * not at the deadline itself: a lock of the preempter granted earlier
 * overlaps the victim's writes in flight.
 */
static void test_preempt_abort_keeps_fence_margin(void **state)
{
    /*
     * The victim does not renew during the setup (six round trips): at
     * the tests' 400 ms its lease lapsed there once under load, and it
     * got session-expired instead of the pr-update
     */
    const int64_t lease = 3000;
    Daemon *d = daemon_start(NULL, NULL, NULL);
    ExtlockConn *victim = client(d->unix_addr, "victim/0", lease);
    ExtlockConn *attacker = client(d->unix_addr, "attacker/0", LONG_LEASE_MS);
    ExtlockMsg m = { .type = EXTLOCK_MSG_INVALID };
    uint64_t in_id, out_id, lock_id;
    int64_t t_renew, t_grant = 0;
    bool result = false;

    in_id = send_simple(victim, EXTLOCK_MSG_PR_IN);
    expect_msg(victim, &m, EXTLOCK_MSG_PR_STATUS, in_id);
    extlock_msg_clear(&m);
    pr_wait_result(victim, send_pr_out(victim, EXTLOCK_PR_REGISTER, 0, 0,
                                       0xa), true);
    lock_now(victim, 0, 4096, EXTLOCK_MODE_EXCLUSIVE);
    out_id = send_pr_out(attacker, EXTLOCK_PR_REGISTER, 0, 0, 0xb);
    pr_ack_next(victim);
    pr_wait_result(attacker, out_id, false);

    /* The victim's last renewal, then its network goes */
    t_renew = now_ms();
    renew(victim);
    conn_drop(victim);

    out_id = send_pr_out(attacker, EXTLOCK_PR_PREEMPT_AND_ABORT, 0, 0xb,
                         0xa);
    lock_id = send_lock(attacker, 0, 4096, EXTLOCK_MODE_EXCLUSIVE, true);
    for (int n = 0; n < 16 && !t_grant; n++) {
        recv_msg(attacker, &m, lease + MARGIN_MS + RECV_MS);
        if (m.type == EXTLOCK_MSG_GRANTED && m.id == lock_id) {
            t_grant = now_ms();
        } else if (m.type == EXTLOCK_MSG_PR_RESULT && m.id == out_id) {
            assert_int_equal(m.pr_result, EXTLOCK_PR_OK);
            result = true;
        } else if (m.type != EXTLOCK_MSG_PR_UPDATE &&
                   m.type != EXTLOCK_MSG_WAITING) {
            fail_msg("unexpected %s", extlock_msg_type_name(m.type));
        }
        extlock_msg_clear(&m);
    }
    assert_true(t_grant != 0);
    if (t_grant - t_renew < lease + MARGIN_MS) {
        fail_msg("the preempted client's lock was granted to another %"
                 PRId64 " ms after its last renewal: before its lease (%d "
                 "ms) plus the fence margin (%d ms) had passed",
                 t_grant - t_renew, (int)lease, MARGIN_MS);
    }
    if (!result) {
        recv_msg(attacker, &m, RECV_MS);
        assert_int_equal(m.type, EXTLOCK_MSG_PR_RESULT);
        assert_int_equal(m.pr_result, EXTLOCK_PR_OK);
        extlock_msg_clear(&m);
    }
    daemon_stop(d);
}

/*
 * "slow" never renews: its lease must outlast the setup below (about ten
 * round trips; at 400 ms it lapsed during the setup once, in a parallel
 * meson run under load) and lapse after conn_drop().
 */
#define SLOW_LEASE_MS 3000

/*
 * A PREEMPT AND ABORT waits for a session that lost its connection; when
 * that session's lease lapses (the lease timer walks the sessions), the
 * pr-out is answered and the preempted session - next in the timer's
 * walk - is ended.  That used to free it under the walk: extlockd died
 * with SIGSEGV (use after free), taking every lock-space down.
 */
static void test_preempt_abort_during_lease_check(void **state)
{
    Daemon *d = daemon_start(NULL, NULL, NULL);
    /* In this order: the timer reaches "slow" first, then "victim" */
    ExtlockConn *slow = client(d->unix_addr, "slow/0", SLOW_LEASE_MS);
    ExtlockConn *victim = client(d->unix_addr, "victim/0", LONG_LEASE_MS);
    ExtlockConn *attacker = client(d->unix_addr, "attacker/0", LONG_LEASE_MS);
    ExtlockMsg m = { .type = EXTLOCK_MSG_INVALID };
    uint64_t id;

    id = send_simple(slow, EXTLOCK_MSG_PR_IN);
    expect_msg(slow, &m, EXTLOCK_MSG_PR_STATUS, id);
    extlock_msg_clear(&m);
    id = send_simple(victim, EXTLOCK_MSG_PR_IN);
    expect_msg(victim, &m, EXTLOCK_MSG_PR_STATUS, id);
    extlock_msg_clear(&m);
    id = send_pr_out(victim, EXTLOCK_PR_REGISTER, 0, 0, 0xb2);
    pr_ack_next(slow);
    pr_wait_result(victim, id, false);
    id = send_pr_out(attacker, EXTLOCK_PR_REGISTER, 0, 0, 0xc3);
    pr_ack_next(slow);
    pr_ack_next(victim);
    pr_wait_result(attacker, id, false);

    /* Victim acknowledges the preemption, "slow" is gone */
    id = send_pr_out(attacker, EXTLOCK_PR_PREEMPT_AND_ABORT, 0, 0xc3, 0xb2);
    pr_ack_next(victim);
    conn_drop(slow);

    /* Answered once slow's lease lapsed: the victim's session is ended */
    recv_msg(attacker, &m, SLOW_LEASE_MS + MARGIN_MS + RECV_MS);
    assert_int_equal(m.type, EXTLOCK_MSG_PR_UPDATE);
    extlock_msg_clear(&m);
    recv_msg(attacker, &m, SLOW_LEASE_MS + MARGIN_MS + RECV_MS);
    if (m.type != EXTLOCK_MSG_PR_RESULT) {
        dump_log(d);
        fail_msg("no pr-result but %s (extlockd alive: %d)",
                 extlock_msg_type_name(m.type), !daemon_reap(d, false));
    }
    assert_int_equal(m.id, id);
    assert_int_equal(m.pr_result, EXTLOCK_PR_OK);
    extlock_msg_clear(&m);
    recv_msg(victim, &m, RECV_MS);
    assert_int_equal(m.type, EXTLOCK_MSG_SESSION_EXPIRED);
    extlock_msg_clear(&m);
    renew(attacker);
    daemon_stop(d);
}

/*
 * After a coordinator restart, a session listed in the state file whose
 * client has not come back yet (it may still be writing until its own
 * lease deadline) is preempted with PREEMPT AND ABORT by a new session.
 * Ending that session used to end its lock-space's grace period at once
 * (it was the only one to wait for), so the preempter was granted the
 * victim's extent right after the restart.
 */
static void test_preempt_abort_of_absent_reclaimer(void **state)
{
    const uint32_t lease = 2000;
    Daemon *d = daemon_start(NULL, NULL, NULL);
    ExtlockConn *victim = client(d->unix_addr, "victim/0", lease);
    ExtlockConn *attacker;
    ExtlockMsg m = { .type = EXTLOCK_MSG_INVALID };
    uint64_t id, lock_id;
    int64_t t_renew, t_grant = 0;

    id = send_simple(victim, EXTLOCK_MSG_PR_IN);
    expect_msg(victim, &m, EXTLOCK_MSG_PR_STATUS, id);
    extlock_msg_clear(&m);
    pr_wait_result(victim, send_pr_out(victim, EXTLOCK_PR_REGISTER, 0, 0,
                                       0xa), true);
    lock_now(victim, 0, 4096, EXTLOCK_MODE_EXCLUSIVE);
    t_renew = now_ms();
    renew(victim);

    /* The coordinator crashes and comes back; the victim does not (yet) */
    assert_int_equal(kill(d->pid, SIGKILL), 0);
    assert_true(daemon_wait_exit(d, 5000));
    d = daemon_start(d->state, NULL, NULL);
    attacker = client(d->unix_addr, "attacker/0", LONG_LEASE_MS);
    pr_wait_result(attacker, send_pr_out(attacker, EXTLOCK_PR_REGISTER, 0, 0,
                                         0xb), false);
    id = send_pr_out(attacker, EXTLOCK_PR_PREEMPT_AND_ABORT, 0, 0xb, 0xa);
    pr_wait_result(attacker, id, false);
    lock_id = send_lock(attacker, 0, 4096, EXTLOCK_MODE_EXCLUSIVE, true);
    for (int n = 0; n < 8 && !t_grant; n++) {
        recv_msg(attacker, &m, lease + MARGIN_MS + RECV_MS);
        if (m.type == EXTLOCK_MSG_GRANTED && m.id == lock_id) {
            t_grant = now_ms();
        } else if (m.type != EXTLOCK_MSG_WAITING &&
                   m.type != EXTLOCK_MSG_PR_UPDATE) {
            fail_msg("unexpected %s", extlock_msg_type_name(m.type));
        }
        extlock_msg_clear(&m);
    }
    assert_true(t_grant != 0);
    if (t_grant - t_renew < (int64_t)lease + MARGIN_MS) {
        fail_msg("the absent victim's extent was granted %" PRId64 " ms "
                 "after its last renewal, before its lease (%u ms) plus "
                 "the fence margin (%d ms) had passed", t_grant - t_renew,
                 lease, MARGIN_MS);
    }
    daemon_stop(d);
}

/*
 * A pr-ack flood: one client sends pr-acks of an old seq while a pr-out of
 * its lock-space waits for a subscriber that never acknowledges, with
 * ACK_IDLE sessions elsewhere.  Each such pr-ack used to look at every
 * pending pr-out, going through every session (O(sessions) per line);
 * now only an ack that acknowledges something new does.  Checked here:
 * every pr-ack is answered and a victim in another lock-space keeps its
 * lease throughout (the event loop serves connections in turn, so the
 * victim was not late before that change either: what it saved is the
 * daemon's CPU time, see the commit message).
 */
#define ACK_IDLE 1000
#define ACK_FLOOD 50000

typedef struct Flood {
    int fd;
    GString *text;
} Flood;

/* Write all of @f->text to @f->fd (non-blocking: poll for room) */
static gpointer flood_main(gpointer opaque)
{
    Flood *f = opaque;
    size_t off = 0;

    while (off < f->text->len) {
        struct pollfd pfd = { .fd = f->fd, .events = POLLOUT };
        ssize_t n = write(f->fd, f->text->str + off, f->text->len - off);

        if (n > 0) {
            off += n;
        } else if (n < 0 && errno != EAGAIN && errno != EINTR) {
            break;
        } else if (poll(&pfd, 1, HANG_MS) <= 0) {
            break;
        }
    }
    return NULL;
}

static void test_pr_ack_flood(void **state)
{
    /*
     * The idle sessions say hello one after the other without waiting for
     * their welcome: a daemon slowed down (ASan, a busy machine) has more
     * than --max-unauth-per-peer of them without hello at a time and
     * refuses the rest, which is not what this test is about
     */
    const char *const extra[] = { "--max-sessions-per-identity", "4096",
                                  "--max-unauth", "4096",
                                  "--max-unauth-per-peer", "4096", NULL };
    int n_idle = ACK_IDLE, n_flood = ACK_FLOOD;
    Daemon *d;
    ExtlockConn *victim;
    ExtlockConn *a1, *a2;
    g_autofree ExtlockConn **idle = NULL;
    g_autofree uint64_t *ids = NULL;
    ExtlockMsg m = { .type = EXTLOCK_MSG_INVALID };
    Flood f;
    GThread *thread;
    int64_t t_renew;
    uint64_t id;
    Renewer rn;

    /*
     * What this checks is the daemon's time under a flood (every pr-ack
     * answered, the victim's renewals in time): under ASan+UBSan the
     * daemon is several times slower and the run went past meson's
     * timeout, so, like test_floods, it runs in the normal build only
     * (scripts/run-tests.sh sets this in its sanitizer step).  The pr-ack
     * paths themselves run under the sanitizers in test-extlockd-pr.
     */
    if (g_getenv("EXTLOCK_UNDER_SANITIZER")) {
        skip();
    }
    idle = g_new0(ExtlockConn *, ACK_IDLE);
    ids = g_new0(uint64_t, ACK_IDLE);
    d = daemon_start(NULL, extra, NULL);
    victim = client(d->unix_addr, "victim/0", VICTIM_LEASE_MS);
    t_renew = now_ms();
    renew(victim);
    renewer_start(&rn, victim, VICTIM_LEASE_MS, VICTIM_LEASE_MS / 4, t_renew);

    a1 = client(d->unix_addr, "a1/0", LONG_LEASE_MS);
    for (int i = 0; i < n_idle; i++) {
        g_autofree char *cid = g_strdup_printf("idle/%d", i);

        idle[i] = conn_open(d->unix_addr);
        extlock_msg_init(&m, EXTLOCK_MSG_HELLO);
        m.client_id = cid;
        m.lock_space = (char *)"idle";
        m.lease_ms = LONG_LEASE_MS;
        send_msg(idle[i], &m);
        ids[i] = m.id;
    }
    for (int i = 0; i < n_idle; i++) {
        extlock_msg_init(&m, EXTLOCK_MSG_INVALID);
        recv_msg(idle[i], &m, HANG_MS);
        assert_int_equal(m.type, EXTLOCK_MSG_WELCOME);
        extlock_msg_clear(&m);
    }
    /* a2 subscribes last and never acknowledges: a1's pr-out waits */
    a2 = client(d->unix_addr, "a2/0", LONG_LEASE_MS);
    id = send_simple(a2, EXTLOCK_MSG_PR_IN);
    expect_msg(a2, &m, EXTLOCK_MSG_PR_STATUS, id);
    extlock_msg_clear(&m);
    send_pr_out(a1, EXTLOCK_PR_REGISTER, 0, 0, 1);
    recv_msg(a1, &m, RECV_MS);
    assert_int_equal(m.type, EXTLOCK_MSG_PR_UPDATE);
    extlock_msg_clear(&m);

    f.fd = extlock_conn_fd(a1);
    f.text = g_string_new(NULL);
    for (int i = 0; i < n_flood; i++) {
        g_string_append_printf(f.text, "{\"type\":\"pr-ack\",\"id\":%d,"
                               "\"seq\":0}\n", 1000000 + i);
    }
    thread = g_thread_new("flood", flood_main, &f);
    for (int i = 0; i < n_flood; i++) {
        recv_msg(a1, &m, HANG_MS);
        assert_int_equal(m.type, EXTLOCK_MSG_PR_ACKED);
        extlock_msg_clear(&m);
    }
    g_thread_join(thread);
    g_string_free(f.text, true);
    renewer_stop(&rn, "victim during a pr-ack flood");
    daemon_stop(d);
}



/*
 * Key purpose (extended key usage) of the certificates, made here by
 * certtool and signed by the one CA: a certificate for TLS servers
 * (serverAuth) is no client certificate, and a client certificate
 * (clientAuth) that names this host is no coordinator certificate.
 * Before, both passed: a client's certificate let its holder pose as the
 * coordinator to extlockctl and the client library.
 */
static void test_tls_key_purpose(void **state)
{
    static const char script[] =
        "cd pki\n"
        "mk() { # NAME KIND TEMPLATE\n"
        "  mkdir -p $1; cp ca-cert.pem $1/\n"
        "  certtool --generate-privkey --key-type=ecdsa "
        "    --outfile $1/$2-key.pem 2>/dev/null\n"
        "  printf \"$3\" > $1.info\n"
        "  certtool --generate-certificate --load-ca-certificate ca-cert.pem "
        "    --load-ca-privkey ca-key.pem --load-privkey $1/$2-key.pem "
        "    --template $1.info --outfile $1/$2-cert.pem 2>/dev/null; }\n"
        "mk impostor server 'cn = localhost\\nip_address = 127.0.0.1\\n"
        "dns_name = localhost\\ntls_www_client\\nsigning_key\\n"
        "expiration_days = 2\\n'\n"
        "mk server-as-client client 'cn = host-a\\ntls_www_server\\n"
        "signing_key\\nexpiration_days = 2\\n'\n"
        "certtool -i --infile impostor/server-cert.pem | "
        "  grep -q 'TLS WWW Client'\n"
        "certtool -i --infile server-as-client/client-cert.pem | "
        "  grep -q 'TLS WWW Server'\n";
    Pki p = { 0 };
    g_autofree char *impostor = NULL, *server_as_client = NULL;
    g_autofree char *out = NULL, *errs = NULL;
    Daemon *d, *fake;
    ExtlockConn *c;
    GError *err = NULL;
    ExtlockMsg r;
    unsigned n;

    make_pki(&p);
    run_sh(script);
    impostor = g_build_filename(fx.dir, "pki", "impostor", NULL);
    server_as_client = g_build_filename(fx.dir, "pki", "server-as-client",
                                        NULL);
    d = tls_daemon(&p, NULL, true);

    /* A server certificate as a client's: refused by the daemon */
    n = log_count(d, "connection refused");
    c = tls_try(d->tcp_addr, server_as_client, NULL, &err);
    if (c) {
        /* TLS 1.3: the server's verdict arrives after the handshake */
        extlock_msg_init(&r, EXTLOCK_MSG_HELLO);
        r.client_id = g_strdup("host-a/d0");
        r.lock_space = g_strdup("space-a");
        assert_false(extlock_conn_call(c, &r, &r, RECV_MS, &err));
        extlock_msg_clear(&r);
    }
    assert_non_null(err);
    g_clear_error(&err);
    wait_log(d, "connection refused", n);
    wait_log(d, "intended purpose", 0);
    /* The right one of the same CA still gets in */
    c = tls_open(d->tcp_addr, p.host_a);
    g_free(hello_ok(c, "host-a/d0", "space-a", "x509:host-a"));

    /* A coordinator with a client certificate: the clients refuse it */
    {
        const char *extra[] = { "--tls-creds-dir", impostor, NULL };
        ExtlockTlsOptions o = { .creds_dir = p.host_a };
        const char *args[] = { NULL, "-c", NULL, "--tls-creds-dir",
                               p.admin, "sessions", NULL };

        fake = daemon_start(NULL, extra, NULL);
        c = extlock_conn_connect_tls(fake->tcp_addr, &o, &err);
        if (c) {
            extlock_conn_close(c);
            fail_msg("a coordinator with a client certificate passed");
        }
        g_test_message("impostor: %s", err->message);
        assert_non_null(strstr(err->message, "server certificate rejected"));
        assert_non_null(strstr(err->message, "intended purpose"));
        g_clear_error(&err);
        args[2] = fake->tcp_addr;
        assert_int_not_equal(run_ctl(args + 1, &out, &errs), 0);
        assert_non_null(strstr(errs, "intended purpose"));
        daemon_stop(fake);
    }
    daemon_stop(d);
    pki_free(&p);
}


/* Sockets the daemon has open (/proc/PID/fd) */
static unsigned socket_count(pid_t pid)
{
    g_autofree char *path = g_strdup_printf("/proc/%d/fd", (int)pid);
    g_autoptr(GDir) dir = g_dir_open(path, 0, NULL);
    const char *name;
    unsigned n = 0;

    assert_non_null(dir);
    while ((name = g_dir_read_name(dir))) {
        g_autofree char *fd = g_build_filename(path, name, NULL);
        g_autofree char *target = g_file_read_link(fd, NULL);

        n += target && g_str_has_prefix(target, "socket:");
    }
    return n;
}

/* GET /metrics from @src: true if a 200 came within @ms */
static bool scrape(const char *src, int port, int ms)
{
    static const char get[] = "GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n";
    int fd = raw_tcp(src, port);
    int64_t deadline = now_ms() + ms;
    g_autoptr(GString) got = g_string_new(NULL);
    char buf[4096];

    assert_int_equal(write(fd, get, sizeof(get) - 1), sizeof(get) - 1);
    while (now_ms() < deadline) {
        struct pollfd p = { .fd = fd, .events = POLLIN };
        ssize_t n;

        if (poll(&p, 1, (int)MAX(1, deadline - now_ms())) <= 0) {
            continue;
        }
        n = read(fd, buf, sizeof(buf));
        if (n <= 0) {
            break;
        }
        g_string_append_len(got, buf, n);
    }
    close(fd);
    return g_str_has_prefix(got->str, "HTTP/1.") &&
           strstr(got->str, " 200 ") && strstr(got->str, "extlock_");
}

/*
 * The metrics endpoint (its own thread, libmicrohttpd) against scrapers
 * and crowds: 300 scrapes back to back, then 256 half-sent requests from
 * 16 addresses.  The daemon never holds more than the endpoint's 32
 * connections (counted in /proc/PID/fd), and the lock service goes on:
 * a victim's renewals are all answered within its lease, a new client's
 * hello is answered.  (Scrapes from a fifth address may be kept out by
 * such a crowd: docs/extlockd.rst, "Known limitations".)
 */
#define METRICS_HTTP_LIMIT 32

static void test_metrics_crowd(void **state)
{
    g_autofree char *listen = NULL;
    const char *extra[] = { "--metrics-listen", NULL, NULL };
    Daemon *d;
    ExtlockConn *victim, *c;
    g_autofree char *sv = NULL;
    GArray *fds = g_array_new(FALSE, FALSE, sizeof(int));
    int base, most = 0;
    unsigned ok = 0;
    int64_t deadline, t_renew;
    int port = free_tcp_port();
    Renewer rn;

    if (g_getenv("EXTLOCK_UNDER_SANITIZER")) {
        skip();     /* timing of the victim's renewals: normal build */
    }
    listen = g_strdup_printf("127.0.0.1:%d", port);
    extra[1] = listen;
    d = daemon_start(NULL, extra, NULL);
    assert_true(scrape("127.0.0.1", port, HANG_MS));
    victim = conn_open(d->unix_addr);
    {
        ExtlockMsg w;
        GError *err = NULL;

        extlock_msg_init(&w, EXTLOCK_MSG_INVALID);
        assert_true(extlock_conn_hello(victim, "victim/d0", "disk",
                                       VICTIM_LEASE_MS, &w, &err));
        sv = g_strdup(w.session);
        extlock_msg_clear(&w);
    }
    lock_now(victim, 0, 4096, EXTLOCK_MODE_EXCLUSIVE);
    t_renew = now_ms();
    renew(victim);
    renewer_start(&rn, victim, VICTIM_LEASE_MS, VICTIM_LEASE_MS / 4, t_renew);

    /* 1. Scrapes back to back */
    for (int i = 0; i < 300; i++) {
        ok += scrape("127.0.0.5", port, RECV_MS);
    }
    g_test_message("%u of 300 scrapes answered", ok);
    assert_true(ok >= 290);
    c = conn_open(d->tcp_addr);
    g_free(hello_ok(c, "newcomer/d0", "disk", NULL));

    /* 2. A crowd of half-sent requests from 16 addresses */
    base = socket_count(d->pid);
    for (int i = 0; i < 256; i++) {
        char ip[32];
        int fd;

        g_snprintf(ip, sizeof(ip), "127.0.1.%d", 10 + i / 16);
        fd = raw_tcp(ip, port);
        assert_int_equal(write(fd, "GET /met", 8), 8);
        g_array_append_val(fds, fd);
        most = MAX(most, (int)socket_count(d->pid) - (int)base);
    }
    /* The daemon deals with them all (bounded); count what it holds */
    deadline = now_ms() + RECV_MS;
    while (now_ms() < deadline) {
        most = MAX(most, (int)socket_count(d->pid) - (int)base);
        g_usleep(20 * 1000);
    }
    g_test_message("metrics crowd: at most %d sockets held", most);
    assert_true(most <= METRICS_HTTP_LIMIT);
    assert_true(most >= 8);         /* it did serve the crowd */
    c = conn_open(d->tcp_addr);
    g_free(hello_ok(c, "newcomer/d1", "disk", NULL));
    renewer_stop(&rn, "victim during the metrics crowd");
    for (guint i = 0; i < fds->len; i++) {
        close(g_array_index(fds, int, i));
    }
    g_array_free(fds, TRUE);
    daemon_stop(d);
}

/*
 * A pr-out REGISTER by @c (sa_key @key): its status.  A change comes
 * with a pr-update first (nobody else is subscribed in these tests).
 */
static ExtlockPrStatus pr_register(ExtlockConn *c, uint64_t key)
{
    uint64_t id = pr_out(c, EXTLOCK_PR_REGISTER, 0, 0, key);
    ExtlockPrStatus st;
    ExtlockMsg m;

    extlock_msg_init(&m, EXTLOCK_MSG_INVALID);
    recv_msg(c, &m, RECV_MS);
    if (m.type == EXTLOCK_MSG_PR_UPDATE) {
        extlock_msg_clear(&m);
        recv_msg(c, &m, RECV_MS);
    }
    if (m.type != EXTLOCK_MSG_PR_RESULT || m.id != id) {
        fail_msg("expected the pr-result of %" PRIu64 ", got %s", id,
                 extlock_msg_type_name(m.type));
    }
    st = m.pr_result;
    extlock_msg_clear(&m);
    return st;
}

static void bye_drop(ExtlockConn *c)
{
    bye(c);
    conn_drop(c);
}

/*
 * SCSI-3 registration slots: one identity with a client-ids wildcard
 * registers as many client-ids as it can and leaves.  Its identity may
 * hold max-registrations of them in the lock-space (3 here); an
 * initiator of another identity can still register afterwards.  Before
 * the limit, the attacker got all 64 slots and the victim
 * insufficient-registration-resources.
 */
static void test_pr_registration_limit(void **state)
{
    g_autofree char *policy = g_build_filename(fx.dir, "policy.conf", NULL);
    const char *extra[] = { "--policy", policy, NULL };
    unsigned registered = 0;
    Daemon *d;
    ExtlockConn *v;

    assert_true(g_file_set_contents(policy, "[identity anonymous]\n"
                                    "lock-spaces=*\nclient-ids=*\n"
                                    "max-registrations=3\n", -1, NULL));
    d = daemon_start(NULL, extra, NULL);
    for (unsigned i = 0; i < EXTLOCK_PR_MAX_REGISTRANTS; i++) {
        g_autofree char *id = g_strdup_printf("attacker/%u", i);
        ExtlockConn *c = conn_open(d->tcp_addr);
        ExtlockPrStatus st;

        g_free(hello_ok(c, id, "disk", "anonymous"));
        st = pr_register(c, 0x1000 + i);
        bye_drop(c);
        if (st != EXTLOCK_PR_OK) {
            assert_int_equal(st, EXTLOCK_PR_NO_RESOURCES);
            break;
        }
        registered++;
    }
    assert_int_equal(registered, 3);
    wait_log(d, "identity anonymous already has 3 registrations there "
             "(its max-registrations is 3)", 0);

    /* The owner may still change its own: a new key, then unregister */
    v = conn_open(d->tcp_addr);
    g_free(hello_ok(v, "attacker/0", "disk", "anonymous"));
    {
        uint64_t id = pr_out(v, EXTLOCK_PR_REGISTER_AND_IGNORE, 0, 0, 0x77);
        ExtlockMsg m = { .type = EXTLOCK_MSG_INVALID };

        pr_expect_update(v, &m);
        extlock_msg_clear(&m);
        expect_msg(v, &m, EXTLOCK_MSG_PR_RESULT, id);
        assert_int_equal(m.pr_result, EXTLOCK_PR_OK);
        extlock_msg_clear(&m);
    }
    bye_drop(v);

    /* Another identity (the daemon's uid on the UNIX socket) registers */
    v = conn_open(d->unix_addr);
    g_free(hello_ok(v, "victim/d0", "disk", NULL));
    assert_int_equal(pr_register(v, 0x999), EXTLOCK_PR_OK);
    bye_drop(v);
    daemon_stop(d);
}

/*
 * max-registrations survives a restart: an identity registers 3 client-ids
 * (its limit), the coordinator is killed and started again from its state
 * file; a 4th client-id of that identity is still refused (the loaded
 * registrations belong to the owner of their client-id's saved session),
 * while another identity registers.  Before, loaded registrations belonged
 * to nobody and the identity got 3 more.
 */
static void test_pr_registration_limit_restart(void **state)
{
    g_autofree char *policy = g_build_filename(fx.dir, "policy.conf", NULL);
    g_autofree char *state_file = g_build_filename(fx.dir, "limit.state",
                                                   NULL);
    const char *extra[] = { "--policy", policy, NULL };
    Daemon *d;
    ExtlockConn *c, *a[3];

    assert_true(g_file_set_contents(policy, "[identity anonymous]\n"
                                    "lock-spaces=*\nclient-ids=*\n"
                                    "max-registrations=3\n", -1, NULL));
    d = daemon_start(state_file, extra, NULL);
    for (unsigned i = 0; i < 3; i++) {
        g_autofree char *id = g_strdup_printf("attacker/%u", i);

        a[i] = conn_open(d->tcp_addr);
        g_free(hello_ok(a[i], id, "disk", "anonymous"));
        /* the earlier ones acknowledge it */
        pr_change(a[i], a, i, EXTLOCK_PR_REGISTER, 0, 0, 0x1000 + i, i + 1);
    }
    /* killed: the sessions stay in the state file */
    assert_int_equal(kill(d->pid, SIGKILL), 0);
    assert_true(daemon_wait_exit(d, 5000));
    for (unsigned i = 0; i < 3; i++) {
        conn_drop(a[i]);
    }

    d = daemon_start(state_file, extra, NULL);
    c = conn_open(d->tcp_addr);
    g_free(hello_ok(c, "attacker/3", "disk", "anonymous"));
    assert_int_equal(pr_register(c, 0x1003), EXTLOCK_PR_NO_RESOURCES);
    bye_drop(c);
    c = conn_open(d->unix_addr);
    g_free(hello_ok(c, "victim/d0", "disk", NULL));
    assert_int_equal(pr_register(c, 0x999), EXTLOCK_PR_OK);
    bye_drop(c);
    daemon_stop(d);
}

/*
 * Reservation state of lock-spaces that are used and dropped: 300
 * lock-spaces, each with a pr-in, a registration and its removal, then
 * bye.  Every such empty state is forgotten (status counter
 * "reservation-states" back to the one lock-space that keeps a
 * registration; the state file does not name the others).  Before, each
 * stayed in memory and in every state file write.
 */
#define PR_SPACES 300

static void test_pr_state_freed(void **state)
{
    Daemon *d = daemon_start(NULL, NULL, NULL);
    ExtlockConn *mon = conn_open(d->unix_addr);
    ExtlockConn *k = conn_open(d->unix_addr);
    g_autofree char *text = NULL;
    int64_t deadline, n = -1;

    g_free(hello_ok(k, "keeper/d0", "kept", NULL));
    assert_int_equal(pr_register(k, 0x42), EXTLOCK_PR_OK);
    bye_drop(k);
    for (unsigned i = 0; i < PR_SPACES; i++) {
        g_autofree char *space = g_strdup_printf("scratch-%u", i);
        ExtlockConn *c = conn_open(d->unix_addr);
        ExtlockMsg m = { .type = EXTLOCK_MSG_INVALID };

        g_free(hello_ok(c, "churn/d0", space, NULL));
        pr_in(c, &m);
        extlock_msg_clear(&m);
        assert_int_equal(pr_register(c, 0x100 + i), EXTLOCK_PR_OK);
        /* unregister: REGISTER with the key and sa_key 0 */
        {
            uint64_t id = pr_out(c, EXTLOCK_PR_REGISTER, 0, 0x100 + i, 0);

            extlock_msg_init(&m, EXTLOCK_MSG_INVALID);
            pr_expect_update(c, &m);
            extlock_msg_clear(&m);
            expect_msg(c, &m, EXTLOCK_MSG_PR_RESULT, id);
            assert_int_equal(m.pr_result, EXTLOCK_PR_OK);
            extlock_msg_clear(&m);
        }
        bye_drop(c);
    }
    /* Forgotten from the main loop, soon after the last session went */
    deadline = now_ms() + RECV_MS;
    while (now_ms() < deadline) {
        json_object *st = status_get(mon);

        n = jint(jget(st, "counters"), "reservation-states");
        json_object_put(st);
        if (n == 1) {
            break;
        }
        g_usleep(20 * 1000);
    }
    assert_int_equal(n, 1);
    /* The next state file write leaves them out; the kept one stays */
    k = conn_open(d->unix_addr);
    g_free(hello_ok(k, "keeper/d1", "kept", NULL));
    assert_true(g_file_get_contents(d->state, &text, NULL, NULL));
    assert_null(strstr(text, "scratch-"));
    assert_non_null(strstr(text, "\"kept\""));
    bye_drop(k);
    daemon_stop(d);
}

/*
 * A pr-out with a request number and its retry
 */
static ExtlockPrStatus pr_out_numbered(ExtlockConn *c, uint64_t key,
                                       uint64_t sa_key, uint64_t request,
                                       bool update)
{
    uint64_t id = pr_out_request(c, EXTLOCK_PR_REGISTER, 0, key, sa_key,
                                 request);
    ExtlockMsg m = { .type = EXTLOCK_MSG_INVALID };
    ExtlockPrStatus st;

    if (update) {
        pr_expect_update(c, &m);
        extlock_msg_clear(&m);
    }
    expect_msg(c, &m, EXTLOCK_MSG_PR_RESULT, id);
    st = m.pr_result;
    extlock_msg_clear(&m);
    return st;
}

/*
 * A retried pr-out is recognised after the empty reservation state of its
 * lock-space was forgotten: register (request 1), unregister (request 2),
 * bye; once "reservation-states" is 0, a new session of the same
 * client-id retries request 2 and gets its first result (ok), not
 * reservation-conflict from applying it again.  Before, the remembered
 * requests went with the state.
 */
static void test_pr_retry_after_state_freed(void **state)
{
    Daemon *d = daemon_start(NULL, NULL, NULL);
    ExtlockConn *mon = conn_open(d->unix_addr);
    ExtlockConn *c = conn_open(d->unix_addr);
    int64_t deadline, n = -1;

    g_free(hello_ok(c, "retry/d0", "gone", NULL));
    assert_int_equal(pr_out_numbered(c, 0, 0x51, 1, true), EXTLOCK_PR_OK);
    assert_int_equal(pr_out_numbered(c, 0x51, 0, 2, true), EXTLOCK_PR_OK);
    /* a retry in the same session is recognised */
    assert_int_equal(pr_out_numbered(c, 0x51, 0, 2, false), EXTLOCK_PR_OK);
    bye_drop(c);
    deadline = now_ms() + RECV_MS;
    while (now_ms() < deadline) {
        json_object *st = status_get(mon);

        n = jint(jget(st, "counters"), "reservation-states");
        json_object_put(st);
        if (n == 0) {
            break;
        }
        g_usleep(20 * 1000);
    }
    assert_int_equal(n, 0);
    c = conn_open(d->unix_addr);
    g_free(hello_ok(c, "retry/d0", "gone", NULL));
    assert_int_equal(pr_out_numbered(c, 0x51, 0, 2, false), EXTLOCK_PR_OK);
    /* a new request is applied: nothing to unregister */
    assert_int_equal(pr_out_numbered(c, 0x51, 0, 3, false),
                     EXTLOCK_PR_CONFLICT);
    bye_drop(c);
    daemon_stop(d);
}

/*
 * Per-action permissions: "allow=read" lets an identity take shared
 * locks and follow reservations (pr-in), nothing else: exclusive locks,
 * the maintenance lock, a freeze and pr-out get permission-denied and
 * change nothing.  A reload with an unknown action is refused and the
 * old policy stays; a good one applies to the open session.  Before,
 * every member could do everything.
 */
static void test_policy_actions(void **state)
{
    g_autofree char *policy = g_build_filename(fx.dir, "policy.conf", NULL);
    const char *extra[] = { "--policy", policy, NULL };
    Daemon *d;
    ExtlockConn *c, *w;
    ExtlockMsg m = { .type = EXTLOCK_MSG_INVALID };
    uint64_t id;
    unsigned n;

    assert_true(g_file_set_contents(policy, "[identity anonymous]\n"
                                    "lock-spaces=*\nclient-ids=*\n"
                                    "allow=read\n", -1, NULL));
    d = daemon_start(NULL, extra, NULL);
    c = conn_open(d->tcp_addr);
    g_free(hello_ok(c, "reader/d0", "disk", "anonymous"));
    lock_now(c, 0, 4096, EXTLOCK_MODE_SHARED);
    id = send_lock(c, 4096, 4096, EXTLOCK_MODE_EXCLUSIVE, false);
    expect_error(c, true, id, EXTLOCK_ERR_DENIED);
    id = send_lock(c, EXTLOCK_MAINT_OFFSET, EXTLOCK_MAINT_LENGTH,
                   EXTLOCK_MODE_EXCLUSIVE, true);
    expect_error(c, true, id, EXTLOCK_ERR_DENIED);
    id = send_lock(c, EXTLOCK_MAINT_OFFSET, EXTLOCK_MAINT_LENGTH,
                   EXTLOCK_MODE_SHARED, true);
    expect_error(c, true, id, EXTLOCK_ERR_DENIED);
    id = pr_out(c, EXTLOCK_PR_REGISTER, 0, 0, 0x5);
    expect_error(c, true, id, EXTLOCK_ERR_DENIED);
    pr_in(c, &m);
    assert_int_equal(m.pr->registrants->len, 0);
    extlock_msg_clear(&m);
    wait_log(d, "may not take exclusive locks (write)", 0);

    /* Nothing was taken: a writer of the daemon's uid gets 4096.. */
    w = conn_open(d->unix_addr);
    g_free(hello_ok(w, "writer/d0", "disk", NULL));
    lock_now(w, 4096, 4096, EXTLOCK_MODE_EXCLUSIVE);

    /* An unknown action: refused, the old policy stays */
    n = log_count(d, "policy not reloaded");
    assert_true(g_file_set_contents(policy, "[identity anonymous]\n"
                                    "lock-spaces=*\nclient-ids=*\n"
                                    "allow=read;bogus\n", -1, NULL));
    assert_int_equal(kill(d->pid, SIGHUP), 0);
    wait_log(d, "policy not reloaded", n);
    wait_log(d, "unknown action \"bogus\"", 0);
    id = send_lock(c, 1 << 20, 4096, EXTLOCK_MODE_EXCLUSIVE, false);
    expect_error(c, true, id, EXTLOCK_ERR_DENIED);

    /* write added: applies to the open session */
    n = log_count(d, "policy reloaded");
    assert_true(g_file_set_contents(policy, "[identity anonymous]\n"
                                    "lock-spaces=*\nclient-ids=*\n"
                                    "allow=read;write\n", -1, NULL));
    assert_int_equal(kill(d->pid, SIGHUP), 0);
    wait_log(d, "policy reloaded", n);
    lock_now(c, 1 << 20, 4096, EXTLOCK_MODE_EXCLUSIVE);
    id = pr_out(c, EXTLOCK_PR_REGISTER, 0, 0, 0x5);
    expect_error(c, true, id, EXTLOCK_ERR_DENIED);

    /*
     * grown: a write lock whose limit is the whole space is granted grown
     * to it, and is still no maintenance (write is not maintain): its
     * unlock with maint-size counts none and announces no size.  Before,
     * the granted extent was tested: generation 1, size 12345.
     */
    {
        ExtlockConn *g = conn_open(d->tcp_addr), *mon;
        json_object *st;
        const char *text;
        Grant gr;

        g_free(hello_ok(g, "grower/d0", "grown", "anonymous"));
        gr.id = send_lock_limit(g, 0, 4096, EXTLOCK_MODE_EXCLUSIVE,
                                EXTLOCK_MAINT_OFFSET, EXTLOCK_MAINT_LENGTH);
        gr = expect_granted(g, gr.id, 0, EXTLOCK_MAINT_LENGTH,
                            EXTLOCK_MODE_EXCLUSIVE);
        extlock_msg_init(&m, EXTLOCK_MSG_UNLOCK);
        m.lock = gr.lock;
        m.has_maint_size = true;
        m.maint_size = 12345;
        send_msg(g, &m);
        id = m.id;
        extlock_msg_init(&m, EXTLOCK_MSG_INVALID);
        expect_msg(g, &m, EXTLOCK_MSG_UNLOCKED, id);
        extlock_msg_clear(&m);
        mon = conn_open(d->unix_addr);
        st = status_get(mon);
        text = json_object_to_json_string(st);
        assert_null(strstr(text, "\"maintenance\""));
        json_object_put(st);
        conn_drop(mon);
        bye_drop(g);
    }
    daemon_stop(d);
}

/*
 * A policy for the registration limits: "anonymous" (plain TCP) with
 * @anon_keys, and the test's uid (the UNIX socket) in a group of its own
 * with max-lock-spaces=3
 */
static void write_limit_policy(const char *path, const char *anon_keys)
{
    g_autofree char *text = g_strdup_printf(
        "[identity anonymous]\nlock-spaces=*\nclient-ids=*\n%s\n"
        "[identity uid:%u]\nlock-spaces=*\nclient-ids=*\n"
        "max-lock-spaces=3\n", anon_keys, (unsigned)getuid());

    assert_true(g_file_set_contents(path, text, -1, NULL));
}

/* A session of "anonymous" as @client_id in @space registers @key */
static ExtlockPrStatus anon_register(Daemon *d, const char *client_id,
                                     const char *space, uint64_t key)
{
    ExtlockConn *c = conn_open(d->tcp_addr);
    ExtlockPrStatus st;

    g_free(hello_ok(c, client_id, space, "anonymous"));
    st = pr_register(c, key);
    bye_drop(c);
    return st;
}

/* Does lock-space @space (it has a session) have a reservation state? */
static bool space_has_reservation(ExtlockConn *mon, const char *space)
{
    json_object *st = status_get(mon);
    json_object *spaces = jget(st, "lock-spaces");
    bool found = false, has = false;

    for (size_t i = 0; i < json_object_array_length(spaces); i++) {
        json_object *sp = json_object_array_get_idx(spaces, i);

        if (strcmp(jstr(sp, "name"), space) == 0) {
            found = true;
            has = json_object_object_get_ex(sp, "reservation", NULL);
        }
    }
    json_object_put(st);
    assert_true(found);
    return has;
}

/* SIGHUP with the policy @keys for anonymous; expect @log_needle */
static void reload_policy(Daemon *d, const char *policy, const char *keys,
                          const char *log_needle)
{
    unsigned n = log_count(d, log_needle);

    write_limit_policy(policy, keys);
    assert_int_equal(kill(d->pid, SIGHUP), 0);
    wait_log(d, log_needle, n);
}

/*
 * Lock-spaces with registrations: an identity whose lock-spaces pattern
 * is "*" registers in scratch-0, scratch-1, ... and leaves each time.
 * Its max-lock-spaces (3) stops it at the 4th lock-space with
 * insufficient-registration-resources and a log line naming the limit;
 * the refusal changes nothing (state file and status as before, no
 * registrant).  It may still change its own registrations, and dropping
 * one frees a lock-space.  Another identity registers in lock-spaces of
 * its own bound.  Bad max-lock-spaces values are refused at reload (the
 * old bound stays) and at start-up.  A session of another identity that
 * uses one of its client-ids does not take a registration (and the count)
 * over.  Before, the identity registered in every lock-space it named.
 */
static void test_pr_lock_space_limit(void **state)
{
    g_autofree char *policy = g_build_filename(fx.dir, "policy.conf", NULL);
    const char *extra[] = { "--policy", policy, NULL };
    const char *bad[] = { "max-lock-spaces=-1", "max-lock-spaces=4097",
                          "max-lock-spaces=many" };
    unsigned registered = 0;
    ExtlockConn *mon, *c;
    Daemon *d;

    write_limit_policy(policy, "max-lock-spaces=3");
    d = daemon_start(NULL, extra, NULL);
    mon = conn_open(d->unix_addr);
    for (unsigned i = 0; i < 8; i++) {
        g_autofree char *space = g_strdup_printf("scratch-%u", i);
        g_autofree char *id = g_strdup_printf("attacker/%u", i);
        g_autofree char *before = NULL, *after = NULL;
        ExtlockMsg m = { .type = EXTLOCK_MSG_INVALID };
        ExtlockPrStatus st;

        c = conn_open(d->tcp_addr);
        g_free(hello_ok(c, id, space, "anonymous"));
        /* written before the welcome: what a refusal must leave alone */
        assert_true(g_file_get_contents(d->state, &before, NULL, NULL));
        st = pr_register(c, 0x1000 + i);
        if (st == EXTLOCK_PR_OK) {
            registered++;
            bye_drop(c);
            continue;
        }
        assert_int_equal(st, EXTLOCK_PR_NO_RESOURCES);
        assert_true(g_file_get_contents(d->state, &after, NULL, NULL));
        assert_string_equal(before, after);
        assert_false(space_has_reservation(mon, space));
        pr_in(c, &m);
        assert_int_equal(m.pr->registrants->len, 0);
        extlock_msg_clear(&m);
        bye_drop(c);
        break;
    }
    assert_int_equal(registered, 3);
    wait_log(d, "identity anonymous already has registrations in 3 "
             "lock-spaces (its max-lock-spaces is 3)", 0);

    /* Its own: a new key in scratch-0, then unregister (frees one) */
    c = conn_open(d->tcp_addr);
    g_free(hello_ok(c, "attacker/0", "scratch-0", "anonymous"));
    {
        ExtlockMsg m = { .type = EXTLOCK_MSG_INVALID };
        uint64_t id = pr_out(c, EXTLOCK_PR_REGISTER_AND_IGNORE, 0, 0, 0x77);

        pr_expect_update(c, &m);
        extlock_msg_clear(&m);
        expect_msg(c, &m, EXTLOCK_MSG_PR_RESULT, id);
        assert_int_equal(m.pr_result, EXTLOCK_PR_OK);
        extlock_msg_clear(&m);
        id = pr_out(c, EXTLOCK_PR_REGISTER, 0, 0x77, 0);
        pr_expect_update(c, &m);
        extlock_msg_clear(&m);
        expect_msg(c, &m, EXTLOCK_MSG_PR_RESULT, id);
        assert_int_equal(m.pr_result, EXTLOCK_PR_OK);
        extlock_msg_clear(&m);
    }
    bye_drop(c);
    assert_int_equal(anon_register(d, "attacker/3", "scratch-3", 0x1003),
                     EXTLOCK_PR_OK);
    assert_int_equal(anon_register(d, "attacker/4", "scratch-4", 0x1004),
                     EXTLOCK_PR_NO_RESOURCES);

    /* Another identity, bound on its own: the same lock-spaces and more */
    for (unsigned i = 0; i < 3; i++) {
        g_autofree char *space = g_strdup_printf("scratch-%u", i + 1);
        g_autofree char *id = g_strdup_printf("victim/%u", i);

        c = conn_open(d->unix_addr);
        g_free(hello_ok(c, id, space, NULL));
        assert_int_equal(pr_register(c, 0x900 + i), EXTLOCK_PR_OK);
        bye_drop(c);
    }

    /* Bad values: refused, the old bound stays in force */
    for (unsigned i = 0; i < G_N_ELEMENTS(bad); i++) {
        reload_policy(d, policy, bad[i], "policy not reloaded");
    }
    wait_log(d, "max-lock-spaces must be a number from 0 to 4096, not "
             "\"many\"", 0);
    assert_int_equal(anon_register(d, "attacker/5", "scratch-5", 0x1005),
                     EXTLOCK_PR_NO_RESOURCES);
    /* A good one raises it */
    reload_policy(d, policy, "max-lock-spaces=4", "policy reloaded");
    assert_int_equal(anon_register(d, "attacker/5", "scratch-5", 0x1005),
                     EXTLOCK_PR_OK);

    /*
     * A registration stays with the identity that made it: a session of
     * another identity using the same client-id changes its key, and the
     * maker still holds 4 lock-spaces (scratch-6 refused).  Before,
     * ownership moved with every pr-out.
     */
    c = conn_open(d->unix_addr);
    g_free(hello_ok(c, "attacker/1", "scratch-1", NULL));
    {
        ExtlockMsg m = { .type = EXTLOCK_MSG_INVALID };
        uint64_t id = pr_out(c, EXTLOCK_PR_REGISTER_AND_IGNORE, 0, 0, 0x78);

        pr_expect_update(c, &m);
        extlock_msg_clear(&m);
        expect_msg(c, &m, EXTLOCK_MSG_PR_RESULT, id);
        assert_int_equal(m.pr_result, EXTLOCK_PR_OK);
        extlock_msg_clear(&m);
    }
    bye_drop(c);
    assert_int_equal(anon_register(d, "attacker/6", "scratch-6", 0x1006),
                     EXTLOCK_PR_NO_RESOURCES);
    conn_drop(mon);
    daemon_stop(d);

    /* ... and at start-up, it keeps the daemon from starting */
    write_limit_policy(policy, "max-lock-spaces=4097");
    daemon_refused(NULL, extra, 1, "max-lock-spaces must be a number from "
                   "0 to 4096, not \"4097\"");
}

/*
 * The owner of a registration survives a restart without its session:
 * "anonymous" registers two client-ids in "disk" (its max-registrations)
 * and one in "other" (its max-lock-spaces is 2), ends every session and
 * the coordinator restarts from its state file.  A third client-id in
 * "disk" and a registration in a third lock-space are still refused;
 * another identity registers.  Before, the loaded registrations belonged
 * to nobody (the owner was not saved, and no saved session named it) and
 * both were granted.
 */
static void test_pr_owner_restart(void **state)
{
    g_autofree char *policy = g_build_filename(fx.dir, "policy.conf", NULL);
    g_autofree char *state_file = g_build_filename(fx.dir, "owner.state",
                                                   NULL);
    g_autofree char *text = NULL;
    const char *extra[] = { "--policy", policy, NULL };
    ExtlockConn *c;
    Daemon *d;

    write_limit_policy(policy, "max-registrations=2\nmax-lock-spaces=2");
    d = daemon_start(state_file, extra, NULL);
    assert_int_equal(anon_register(d, "attacker/0", "disk", 0x1000),
                     EXTLOCK_PR_OK);
    assert_int_equal(anon_register(d, "attacker/1", "disk", 0x1001),
                     EXTLOCK_PR_OK);
    assert_int_equal(anon_register(d, "attacker/2", "other", 0x1002),
                     EXTLOCK_PR_OK);
    daemon_stop(d);
    assert_true(g_file_get_contents(state_file, &text, NULL, NULL));
    assert_null(strstr(text, "\"sessions\""));
    assert_non_null(strstr(text, "{\"client-id\":\"attacker/2\","
                           "\"identity\":\"anonymous\"}"));

    d = daemon_start(state_file, extra, NULL);
    assert_int_equal(anon_register(d, "attacker/3", "disk", 0x1003),
                     EXTLOCK_PR_NO_RESOURCES);
    wait_log(d, "identity anonymous already has 2 registrations there "
             "(its max-registrations is 2)", 0);
    assert_int_equal(anon_register(d, "attacker/4", "third", 0x1004),
                     EXTLOCK_PR_NO_RESOURCES);
    wait_log(d, "identity anonymous already has registrations in 2 "
             "lock-spaces (its max-lock-spaces is 2)", 0);
    c = conn_open(d->unix_addr);
    g_free(hello_ok(c, "victim/0", "disk", NULL));
    assert_int_equal(pr_register(c, 0x999), EXTLOCK_PR_OK);
    bye_drop(c);
    daemon_stop(d);
}

/*
 * A state file without owners (written by an older extlockd) still
 * loads: its registrations are there and belong to nobody, as before, so
 * they count for no identity (max-lock-spaces=1 and a registration from
 * the file: a new lock-space is granted).  A malformed "owners" (not an
 * array, no or an empty identity, a client-id twice or one that is not
 * registered) keeps the daemon from starting.
 */
static void test_pr_owners_old_state(void **state)
{
    g_autofree char *policy = g_build_filename(fx.dir, "policy.conf", NULL);
    g_autofree char *state_file = g_build_filename(fx.dir, "old.state",
                                                   NULL);
    const char *extra[] = { "--policy", policy, NULL };
    static const char *const bad_owners[] = {
        "\"anonymous\"",
        "[{\"client-id\":\"old/0\"}]",
        "[{\"client-id\":\"old/0\",\"identity\":\"\"}]",
        "[{\"client-id\":\"old/0\",\"identity\":7}]",
        ("[{\"client-id\":\"old/0\",\"identity\":\"a\"},"
         "{\"client-id\":\"old/0\",\"identity\":\"b\"}]"),
        "[{\"client-id\":\"nobody/0\",\"identity\":\"anonymous\"}]",
    };
    json_object *obj, *res, *entry = NULL;
    ExtlockMsg m = { .type = EXTLOCK_MSG_INVALID };
    ExtlockConn *c;
    Daemon *d;

    write_limit_policy(policy, "max-lock-spaces=1");
    d = daemon_start(state_file, extra, NULL);
    assert_int_equal(anon_register(d, "old/0", "old", 0x51), EXTLOCK_PR_OK);
    daemon_stop(d);

    /* What an older extlockd wrote: no "owners" */
    obj = json_object_from_file(state_file);
    assert_non_null(obj);
    res = jget(obj, "reservations");
    assert_int_equal(json_object_array_length(res), 1);
    entry = json_object_array_get_idx(res, 0);
    assert_non_null(jget(entry, "owners"));
    json_object_object_del(entry, "owners");
    assert_int_equal(json_object_to_file(state_file, obj), 0);
    json_object_put(obj);

    d = daemon_start(state_file, extra, NULL);
    c = conn_open(d->unix_addr);
    g_free(hello_ok(c, "check/0", "old", NULL));
    pr_in(c, &m);
    assert_int_equal(m.pr->registrants->len, 1);
    extlock_msg_clear(&m);
    bye_drop(c);
    assert_int_equal(anon_register(d, "new/0", "new", 0x52), EXTLOCK_PR_OK);
    /* now it owns one: the next lock-space is refused */
    assert_int_equal(anon_register(d, "new/1", "newer", 0x53),
                     EXTLOCK_PR_NO_RESOURCES);
    daemon_stop(d);

    /* Malformed owners keep the daemon from starting */
    for (unsigned i = 0; i < G_N_ELEMENTS(bad_owners); i++) {
        g_autofree char *saved = NULL;

        assert_true(g_file_get_contents(state_file, &saved, NULL, NULL));
        obj = json_tokener_parse(saved);
        assert_non_null(obj);
        res = jget(obj, "reservations");
        entry = NULL;
        for (size_t j = 0; j < json_object_array_length(res); j++) {
            json_object *e = json_object_array_get_idx(res, j);

            if (strcmp(jstr(e, "lock-space"), "old") == 0) {
                entry = e;
            }
        }
        assert_non_null(entry);
        /* nobody owns the one of the older file */
        assert_false(json_object_object_get_ex(entry, "owners", NULL));
        json_object_object_add(entry, "owners",
                               json_tokener_parse(bad_owners[i]));
        assert_int_equal(json_object_to_file(state_file, obj), 0);
        json_object_put(obj);
        daemon_refused(state_file, extra, 1, "state: reservation of old: "
                       "\"owners\" must be an array of {\"client-id\","
                       "\"identity\"}");
        assert_true(g_file_set_contents(state_file, saved, -1, NULL));
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_tls_refusals, setup, teardown),
        cmocka_unit_test_setup_teardown(test_tls_pipelining, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_identity_isolation, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_reclaim_identity, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_psk, setup, teardown),
        cmocka_unit_test_setup_teardown(test_unix_identity_and_insecure,
                                        setup, teardown),
        cmocka_unit_test_setup_teardown(test_floods, setup, teardown),
        cmocka_unit_test_setup_teardown(test_hello_storm, setup, teardown),
        cmocka_unit_test_setup_teardown(test_reclaim_storm, setup, teardown),
        cmocka_unit_test_setup_teardown(test_bad_security_options, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_pr_out_flood, setup, teardown),
        cmocka_unit_test_setup_teardown(test_preempt_abort_keeps_fence_margin,
                                        setup, teardown),
        cmocka_unit_test_setup_teardown(test_preempt_abort_during_lease_check,
                                        setup, teardown),
        cmocka_unit_test_setup_teardown(test_preempt_abort_of_absent_reclaimer,
                                        setup, teardown),
        cmocka_unit_test_setup_teardown(test_pr_ack_flood, setup, teardown),
        cmocka_unit_test_setup_teardown(test_pr_registration_limit, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_pr_registration_limit_restart,
                                        setup, teardown),
        cmocka_unit_test_setup_teardown(test_pr_lock_space_limit, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_pr_owner_restart, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_pr_owners_old_state, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_pr_state_freed, setup, teardown),
        cmocka_unit_test_setup_teardown(test_pr_retry_after_state_freed,
                                        setup, teardown),
        cmocka_unit_test_setup_teardown(test_policy_actions, setup, teardown),
        cmocka_unit_test_setup_teardown(test_tls_key_purpose, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_metrics_crowd, setup, teardown),
    };

    extlockd_bin = g_getenv("EXTLOCKD");
    extlockctl_bin = g_getenv("EXTLOCKCTL");
    if (!extlockd_bin || !extlockctl_bin) {
        fprintf(stderr, "set EXTLOCKD and EXTLOCKCTL\n");
        return 1;
    }
    if (g_getenv("EXTLOCKD_TEST_FILTER")) {
        cmocka_set_test_filter(g_getenv("EXTLOCKD_TEST_FILTER"));
    }
    signal(SIGPIPE, SIG_IGN);
    return cmocka_run_group_tests(tests, NULL, NULL);
}
