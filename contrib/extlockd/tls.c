/*
 * extlockd: TLS on TCP connections (GnuTLS), non-blocking (see tls.h)
 *
 * Copyright (c) 2026 The extlock authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 */
#include <errno.h>
#include <string.h>
#include <unistd.h>
#include <gnutls/gnutls.h>
#include <gnutls/x509.h>
#include <gio/gio.h>

#include "policy.h"
#include "tls.h"

#define MAX_IDENTITY 1024

struct ExtlockdTlsCreds {
    char *dir;
    bool verify_peer;
    gnutls_certificate_credentials_t x509;   /* NULL without certificates */
    gnutls_psk_server_credentials_t psk;     /* NULL without keys.psk */
    gnutls_priority_t priority;
};

struct ExtlockdTls {
    ExtlockdTlsCreds *creds;
    gnutls_session_t session;
    bool done;
    bool send_again;            /* a record waits to be sent */
    size_t send_again_len;
    char *identity;
    char *error;
};

static bool file_exists(const char *dir, const char *name, char **path)
{
    *path = g_build_filename(dir, name, NULL);
    return g_file_test(*path, G_FILE_TEST_EXISTS);
}

static bool gnutls_fail(int ret, const char *what, const char *path,
                        GError **errp)
{
    g_set_error(errp, G_IO_ERROR, G_IO_ERROR_FAILED, "TLS: %s %s: %s",
                what, path, gnutls_strerror(ret));
    return false;
}

static bool load_x509(ExtlockdTlsCreds *c, GError **errp)
{
    g_autofree char *ca = NULL, *cert = NULL, *key = NULL, *crl = NULL;
    int ret;

    if (!file_exists(c->dir, "server-cert.pem", &cert)) {
        return true;
    }
    if (!file_exists(c->dir, "server-key.pem", &key)) {
        g_set_error(errp, G_IO_ERROR, G_IO_ERROR_NOT_FOUND,
                    "TLS: %s exists but %s does not", cert, key);
        return false;
    }
    if (!file_exists(c->dir, "ca-cert.pem", &ca) && c->verify_peer) {
        g_set_error(errp, G_IO_ERROR, G_IO_ERROR_NOT_FOUND,
                    "TLS: %s is needed to verify client certificates "
                    "(or pass --tls-verify-peer=no)", ca);
        return false;
    }
    ret = gnutls_certificate_allocate_credentials(&c->x509);
    if (ret < 0) {
        return gnutls_fail(ret, "cannot allocate credentials for", c->dir,
                           errp);
    }
    if (g_file_test(ca, G_FILE_TEST_EXISTS)) {
        ret = gnutls_certificate_set_x509_trust_file(c->x509, ca,
                                                     GNUTLS_X509_FMT_PEM);
        if (ret < 0) {
            return gnutls_fail(ret, "cannot load CA certificate", ca, errp);
        }
        if (ret == 0) {
            g_set_error(errp, G_IO_ERROR, G_IO_ERROR_INVALID_DATA,
                        "TLS: %s holds no certificate", ca);
            return false;
        }
    }
    if (file_exists(c->dir, "ca-crl.pem", &crl)) {
        ret = gnutls_certificate_set_x509_crl_file(c->x509, crl,
                                                   GNUTLS_X509_FMT_PEM);
        if (ret < 0) {
            return gnutls_fail(ret, "cannot load CRL", crl, errp);
        }
    }
    ret = gnutls_certificate_set_x509_key_file(c->x509, cert, key,
                                               GNUTLS_X509_FMT_PEM);
    if (ret < 0) {
        return gnutls_fail(ret, "cannot load certificate/key", cert, errp);
    }
    return true;
}

static bool load_psk(ExtlockdTlsCreds *c, GError **errp)
{
    g_autofree char *path = NULL;
    int ret;

    if (!file_exists(c->dir, "keys.psk", &path)) {
        return true;
    }
    if (access(path, R_OK) < 0) {
        g_set_error(errp, G_IO_ERROR, g_io_error_from_errno(errno),
                    "TLS: cannot read %s: %s", path, g_strerror(errno));
        return false;
    }
    ret = gnutls_psk_allocate_server_credentials(&c->psk);
    if (ret < 0) {
        return gnutls_fail(ret, "cannot allocate PSK credentials for", path,
                           errp);
    }
    ret = gnutls_psk_set_server_credentials_file(c->psk, path);
    if (ret < 0) {
        return gnutls_fail(ret, "cannot use PSK file", path, errp);
    }
    return true;
}

ExtlockdTlsCreds *extlockd_tls_creds_load(const char *dir, bool verify_peer,
                                          GError **errp)
{
    ExtlockdTlsCreds *c = g_new0(ExtlockdTlsCreds, 1);
    const char *prio;
    int ret;

    c->dir = g_strdup(dir);
    c->verify_peer = verify_peer;
    if (!g_file_test(dir, G_FILE_TEST_IS_DIR)) {
        g_set_error(errp, G_IO_ERROR, G_IO_ERROR_NOT_FOUND,
                    "TLS: credential directory %s does not exist", dir);
        goto fail;
    }
    if (!load_x509(c, errp) || !load_psk(c, errp)) {
        goto fail;
    }
    if (!c->x509 && !c->psk) {
        g_set_error(errp, G_IO_ERROR, G_IO_ERROR_NOT_FOUND,
                    "TLS: %s has neither server-cert.pem/server-key.pem "
                    "nor keys.psk", dir);
        goto fail;
    }
    prio = c->psk ? "NORMAL:+ECDHE-PSK:+DHE-PSK:+PSK" : "NORMAL";
    ret = gnutls_priority_init(&c->priority, prio, NULL);
    if (ret < 0) {
        gnutls_fail(ret, "bad priority string for", dir, errp);
        goto fail;
    }
    return c;

fail:
    extlockd_tls_creds_free(c);
    return NULL;
}

void extlockd_tls_creds_free(ExtlockdTlsCreds *c)
{
    if (!c) {
        return;
    }
    if (c->x509) {
        gnutls_certificate_free_credentials(c->x509);
    }
    if (c->psk) {
        gnutls_psk_free_server_credentials(c->psk);
    }
    if (c->priority) {
        gnutls_priority_deinit(c->priority);
    }
    g_free(c->dir);
    g_free(c);
}

const char *extlockd_tls_creds_kinds(const ExtlockdTlsCreds *c)
{
    return c->x509 && c->psk ? "x509+psk" : c->x509 ? "x509" : "psk";
}

/*
 * A client certificate must be meant for TLS clients: its extended key
 * usage (if it has one) must include clientAuth, so that a coordinator's
 * certificate signed by the same CA does not pass as a client's
 */
static gnutls_typed_vdata_st client_purpose[] = {
    { .type = GNUTLS_DT_KEY_PURPOSE_OID,
      .data = (unsigned char *)GNUTLS_KP_TLS_WWW_CLIENT },
};

ExtlockdTls *extlockd_tls_new(ExtlockdTlsCreds *creds, int fd,
                              GError **errp)
{
    ExtlockdTls *t = g_new0(ExtlockdTls, 1);
    int ret;

    t->creds = creds;
    ret = gnutls_init(&t->session, GNUTLS_SERVER | GNUTLS_NONBLOCK);
    if (ret < 0) {
        g_free(t);
        gnutls_fail(ret, "cannot start a session on", "a connection", errp);
        return NULL;
    }
    gnutls_priority_set(t->session, creds->priority);
    if (creds->x509) {
        gnutls_credentials_set(t->session, GNUTLS_CRD_CERTIFICATE,
                               creds->x509);
        if (creds->verify_peer) {
            /* The handshake fails unless the client's chain verifies */
            gnutls_certificate_server_set_request(t->session,
                                                  GNUTLS_CERT_REQUIRE);
            gnutls_session_set_verify_cert2(t->session, client_purpose,
                                            G_N_ELEMENTS(client_purpose), 0);
        } else {
            gnutls_certificate_server_set_request(t->session,
                                                  GNUTLS_CERT_IGNORE);
        }
    }
    if (creds->psk) {
        gnutls_credentials_set(t->session, GNUTLS_CRD_PSK, creds->psk);
    }
    gnutls_transport_set_int(t->session, fd);
    gnutls_handshake_set_timeout(t->session, 0);
    return t;
}

void extlockd_tls_free(ExtlockdTls *t)
{
    if (t) {
        gnutls_deinit(t->session);
        g_free(t->identity);
        g_free(t->error);
        g_free(t);
    }
}

static char *sanitize(const char *s, size_t len)
{
    GString *out = g_string_sized_new(len);

    for (size_t i = 0; i < len && out->len < MAX_IDENTITY; i++) {
        unsigned char ch = s[i];

        g_string_append_c(out, ch < 0x20 || ch == 0x7f ? '?' : ch);
    }
    return g_string_free(out, FALSE);
}

/* "x509:CN" of the verified peer certificate, or NULL with @errp set */
static char *x509_identity(ExtlockdTls *t, GError **errp)
{
    const gnutls_datum_t *certs;
    unsigned int ncerts = 0, status = 0;
    gnutls_x509_crt_t crt;
    char cn[MAX_IDENTITY + 1];
    size_t cn_len = sizeof(cn);
    g_autofree char *name = NULL;
    int ret;

    ret = gnutls_certificate_verify_peers(t->session, client_purpose,
                                          G_N_ELEMENTS(client_purpose),
                                          &status);
    certs = gnutls_certificate_get_peers(t->session, &ncerts);
    if (ret < 0 || status != 0 || !certs || ncerts == 0) {
        gnutls_datum_t text = { 0 };

        if (ret >= 0 && status != 0 &&
            gnutls_certificate_verification_status_print(
                status, GNUTLS_CRT_X509, &text, 0) == 0) {
            g_set_error(errp, G_IO_ERROR, G_IO_ERROR_PERMISSION_DENIED,
                        "client certificate rejected: %s", text.data);
            gnutls_free(text.data);
        } else {
            g_set_error(errp, G_IO_ERROR, G_IO_ERROR_PERMISSION_DENIED,
                        "client certificate rejected: %s",
                        !certs || ncerts == 0 ? "none presented" :
                        gnutls_strerror(ret));
        }
        return NULL;
    }
    if (gnutls_x509_crt_init(&crt) < 0) {
        g_set_error(errp, G_IO_ERROR, G_IO_ERROR_FAILED, "out of memory");
        return NULL;
    }
    ret = gnutls_x509_crt_import(crt, &certs[0], GNUTLS_X509_FMT_DER);
    if (ret >= 0) {
        ret = gnutls_x509_crt_get_dn_by_oid(crt, GNUTLS_OID_X520_COMMON_NAME,
                                            0, 0, cn, &cn_len);
        if (ret >= 0) {
            name = sanitize(cn, cn_len);
        } else {
            gnutls_datum_t dn = { 0 };

            ret = gnutls_x509_crt_get_dn2(crt, &dn);
            if (ret >= 0) {
                name = sanitize((const char *)dn.data, dn.size);
                gnutls_free(dn.data);
            }
        }
    }
    gnutls_x509_crt_deinit(crt);
    if (!name || !name[0]) {
        g_set_error(errp, G_IO_ERROR, G_IO_ERROR_PERMISSION_DENIED,
                    "client certificate has no usable subject name");
        return NULL;
    }
    return g_strconcat("x509:", name, NULL);
}

int extlockd_tls_handshake(ExtlockdTls *t, GError **errp)
{
    int ret;

    if (t->done) {
        return 1;
    }
    do {
        ret = gnutls_handshake(t->session);
    } while (ret == GNUTLS_E_INTERRUPTED);
    if (ret == GNUTLS_E_AGAIN) {
        return 0;
    }
    if (ret < 0) {
        /* Best effort: tell the client why (an alert), then we close */
        gnutls_alert_send_appropriate(t->session, ret);
        if (ret == GNUTLS_E_CERTIFICATE_VERIFICATION_ERROR ||
            ret == GNUTLS_E_CERTIFICATE_ERROR ||
            ret == GNUTLS_E_NO_CERTIFICATE_FOUND ||
            ret == GNUTLS_E_CERTIFICATE_REQUIRED) {
            unsigned int status = gnutls_session_get_verify_cert_status(
                t->session);
            gnutls_datum_t text = { 0 };

            if (status &&
                gnutls_certificate_verification_status_print(
                    status, GNUTLS_CRT_X509, &text, 0) == 0) {
                g_set_error(errp, G_IO_ERROR, G_IO_ERROR_PERMISSION_DENIED,
                            "TLS handshake failed: client certificate "
                            "rejected: %s", text.data);
                gnutls_free(text.data);
                return -1;
            }
        }
        g_set_error(errp, G_IO_ERROR, G_IO_ERROR_PERMISSION_DENIED,
                    "TLS handshake failed: %s", gnutls_strerror(ret));
        return -1;
    }

    switch (gnutls_auth_get_type(t->session)) {
    case GNUTLS_CRD_PSK: {
        const char *user = gnutls_psk_server_get_username(t->session);

        if (!user || !user[0]) {
            g_set_error(errp, G_IO_ERROR, G_IO_ERROR_PERMISSION_DENIED,
                        "TLS PSK client without a username");
            return -1;
        }
        g_autofree char *name = sanitize(user, strlen(user));
        t->identity = g_strconcat("psk:", name, NULL);
        break;
    }
    case GNUTLS_CRD_CERTIFICATE:
        if (t->creds->verify_peer) {
            t->identity = x509_identity(t, errp);
            if (!t->identity) {
                return -1;
            }
        } else {
            t->identity = g_strdup(EXTLOCKD_IDENTITY_ANONYMOUS);
        }
        break;
    default:
        g_set_error(errp, G_IO_ERROR, G_IO_ERROR_PERMISSION_DENIED,
                    "TLS: unexpected authentication method");
        return -1;
    }
    t->done = true;
    return 1;
}

GIOCondition extlockd_tls_events(ExtlockdTls *t)
{
    return gnutls_record_get_direction(t->session) ? G_IO_OUT : G_IO_IN;
}

const char *extlockd_tls_identity(ExtlockdTls *t)
{
    return t->identity;
}

/*
 * @ret as errno.  When the send() or recv() of the socket failed, errno
 * is that call's, @sys_errno, so that the caller can tell a peer that
 * closed (EPIPE, ECONNRESET) from other failures, as on a plain socket;
 * EIO (the connection is closed, not read on as a peer's that is gone)
 * if GnuTLS left none, or one that would read as "try again" (GnuTLS
 * turns those into GNUTLS_E_AGAIN/INTERRUPTED itself).  GnuTLS
 * reports such a failure as GNUTLS_E_PUSH_ERROR or GNUTLS_E_PULL_ERROR,
 * except ECONNRESET, which it reports as GNUTLS_E_PREMATURE_TERMINATION
 * (GnuTLS 3.7: a send() to a peer that reset the connection).
 */
static ssize_t map_error(ExtlockdTls *t, ssize_t ret, int sys_errno)
{
    if (ret == GNUTLS_E_AGAIN) {
        errno = EAGAIN;
    } else if (ret == GNUTLS_E_INTERRUPTED) {
        errno = EINTR;
    } else {
        g_free(t->error);
        t->error = g_strdup(gnutls_strerror(ret));
        if (ret == GNUTLS_E_PUSH_ERROR || ret == GNUTLS_E_PULL_ERROR ||
            ret == GNUTLS_E_PREMATURE_TERMINATION) {
            errno = sys_errno == 0 || sys_errno == EAGAIN ||
                    sys_errno == EWOULDBLOCK || sys_errno == EINTR ?
                    EIO : sys_errno;
        } else {
            errno = EPROTO;
        }
    }
    return -1;
}

ssize_t extlockd_tls_recv(ExtlockdTls *t, void *buf, size_t len)
{
    ssize_t ret;
    int sys_errno;

    errno = 0;
    ret = gnutls_record_recv(t->session, buf, len);
    sys_errno = errno;
    if (ret >= 0) {
        return ret;
    }
    if (ret == GNUTLS_E_PREMATURE_TERMINATION) {
        return 0;               /* the peer closed without close_notify */
    }
    return map_error(t, ret, sys_errno);
}

ssize_t extlockd_tls_send(ExtlockdTls *t, const void *buf, size_t len)
{
    ssize_t ret;
    int sys_errno;

    errno = 0;
    if (t->send_again) {
        /* The record was encrypted before: GnuTLS only flushes it */
        g_assert(len >= t->send_again_len);
        ret = gnutls_record_send(t->session, NULL, 0);
    } else {
        ret = gnutls_record_send(t->session, buf, len);
    }
    sys_errno = errno;
    if (ret >= 0) {
        t->send_again = false;
        return ret;
    }
    if (ret == GNUTLS_E_AGAIN || ret == GNUTLS_E_INTERRUPTED) {
        if (!t->send_again) {
            t->send_again = true;
            t->send_again_len = len;
        }
    }
    return map_error(t, ret, sys_errno);
}

bool extlockd_tls_pending(ExtlockdTls *t)
{
    return t->done && gnutls_record_check_pending(t->session) > 0;
}

const char *extlockd_tls_error(ExtlockdTls *t)
{
    return t->error ? t->error : "TLS error";
}
