/*
 * extlockd: the Prometheus endpoint (--metrics-listen), with libmicrohttpd
 *
 * Copyright (c) 2026 The extlock authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 *
 * libmicrohttpd parses HTTP in a thread of its own.  That thread touches
 * nothing of the server: it copies ExtlockdMetrics.text, which the main
 * loop renders each second (metrics_tick), under text_lock.  Only
 * "GET /metrics" is served; other paths get 404, other methods 405.
 * Without libmicrohttpd at build time, --metrics-listen is refused.
 *
 * With --metrics-tls-creds-dir the endpoint speaks HTTPS only (GnuTLS,
 * through libmicrohttpd) with the server certificate of that directory;
 * if it also holds ca-cert.pem, every request must come with a client
 * certificate signed by that CA (checked per request, 403 otherwise), so
 * that only the monitoring system reads lock-space names and client ids.
 */
#include <errno.h>
#include <string.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <glib.h>

#include "metrics.h"

#ifdef HAVE_MICROHTTPD
#include <microhttpd.h>
#include <gnutls/gnutls.h>
#include <gnutls/x509.h>

#define HTTP_CONN_LIMIT     32
/*
 * ... of which one address may hold this many: a client that opens
 * connections and sends nothing (or a byte now and then) cannot take
 * every slot and keep the monitoring system out (docs/extlockd.rst)
 */
#define HTTP_CONN_LIMIT_PER_ADDR 8
#define HTTP_CONN_TIMEOUT_S 10

struct ExtlockdHttp {
    struct MHD_Daemon *daemon;
    /* PEM text given to libmicrohttpd, which keeps the pointers */
    char *cert;
    char *key;
    char *ca;                   /* NULL: no client certificates asked */
    ExtlockdMetrics *metrics;
};

static enum MHD_Result http_reply(struct MHD_Connection *conn,
                                  unsigned status, const char *text,
                                  size_t len, const char *type,
                                  bool allow)
{
    struct MHD_Response *r;
    enum MHD_Result ret;

    r = MHD_create_response_from_buffer(len, (void *)text,
                                        MHD_RESPMEM_MUST_COPY);
    if (!r) {
        return MHD_NO;
    }
    MHD_add_response_header(r, MHD_HTTP_HEADER_CONTENT_TYPE, type);
    if (allow) {
        MHD_add_response_header(r, MHD_HTTP_HEADER_ALLOW, "GET");
    }
    ret = MHD_queue_response(conn, status, r);
    MHD_destroy_response(r);
    return ret;
}

static gnutls_typed_vdata_st client_purpose[] = {
    { .type = GNUTLS_DT_KEY_PURPOSE_OID,
      .data = (unsigned char *)GNUTLS_KP_TLS_WWW_CLIENT },
};

/* Did the TLS peer present a certificate that verifies against our CA? */
static bool http_peer_verified(struct MHD_Connection *conn)
{
    const union MHD_ConnectionInfo *ci;
    unsigned status = 0;

    ci = MHD_get_connection_info(conn, MHD_CONNECTION_INFO_GNUTLS_SESSION);
    if (!ci || !ci->tls_session) {
        return false;
    }
    /* ... and is meant for a TLS client (not the coordinator's own) */
    if (gnutls_certificate_verify_peers(ci->tls_session, client_purpose,
                                        G_N_ELEMENTS(client_purpose),
                                        &status) < 0) {
        return false;           /* no certificate, or it could not be read */
    }
    return status == 0;
}

static enum MHD_Result http_handler(void *opaque,
                                    struct MHD_Connection *conn,
                                    const char *url, const char *method,
                                    const char *version,
                                    const char *upload_data,
                                    size_t *upload_size, void **con_cls)
{
    ExtlockdHttp *http = opaque;
    ExtlockdMetrics *m = http->metrics;
    static const char plain[] = "text/plain; charset=utf-8";
    static const char need_cert[] = "a client certificate signed by the CA "
        "of --metrics-tls-creds-dir is required\n";
    enum MHD_Result ret;
    char *copy;
    size_t len;

    if (http->ca && !http_peer_verified(conn)) {
        return http_reply(conn, MHD_HTTP_FORBIDDEN, need_cert,
                          sizeof(need_cert) - 1, plain, false);
    }
    if (strcmp(url, "/metrics") != 0) {
        return http_reply(conn, MHD_HTTP_NOT_FOUND, "not found\n", 10, plain,
                          false);
    }
    if (strcmp(method, MHD_HTTP_METHOD_GET) != 0) {
        return http_reply(conn, MHD_HTTP_METHOD_NOT_ALLOWED,
                          "only GET\n", 9, plain, true);
    }
    g_mutex_lock(&m->text_lock);
    len = m->text->len;
    copy = g_memdup2(m->text->str, len);
    g_mutex_unlock(&m->text_lock);
    ret = http_reply(conn, MHD_HTTP_OK, copy, len,
                     "text/plain; version=0.0.4; charset=utf-8", false);
    g_free(copy);
    return ret;
}

/* "HOST:PORT" (IPv4) or "[HOST]:PORT" (IPv6) into @ss */
static bool http_parse_addr(const char *addr, struct sockaddr_storage *ss,
                            GError **errp)
{
    g_autofree char *host = NULL;
    const char *colon = strrchr(addr, ':');
    char *end;
    guint64 port;

    memset(ss, 0, sizeof(*ss));
    if (!colon || colon == addr || !colon[1]) {
        goto bad;
    }
    errno = 0;
    port = g_ascii_strtoull(colon + 1, &end, 10);
    if (*end || errno || port > 65535 || !g_ascii_isdigit(colon[1])) {
        g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_INVAL,
                    "--metrics-listen '%s': bad port '%s' (0-65535)", addr,
                    colon + 1);
        return false;
    }
    if (addr[0] == '[') {
        struct sockaddr_in6 *s6 = (struct sockaddr_in6 *)ss;

        if (colon[-1] != ']') {
            goto bad;
        }
        host = g_strndup(addr + 1, colon - addr - 2);
        s6->sin6_family = AF_INET6;
        s6->sin6_port = htons(port);
        if (inet_pton(AF_INET6, host, &s6->sin6_addr) != 1) {
            goto bad;
        }
        return true;
    } else {
        struct sockaddr_in *s4 = (struct sockaddr_in *)ss;

        host = g_strndup(addr, colon - addr);
        s4->sin_family = AF_INET;
        s4->sin_port = htons(port);
        if (inet_pton(AF_INET, host, &s4->sin_addr) != 1) {
            goto bad;
        }
        return true;
    }
bad:
    g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_INVAL,
                "--metrics-listen '%s': expected IPv4-ADDRESS:PORT or "
                "[IPv6-ADDRESS]:PORT", addr);
    return false;
}

/* Read DIR/@name into *@text; a missing optional file leaves it NULL */
static bool http_read_pem(const char *dir, const char *name, bool optional,
                          char **text, GError **errp)
{
    g_autofree char *path = g_build_filename(dir, name, NULL);
    g_autoptr(GError) err = NULL;

    if (optional && !g_file_test(path, G_FILE_TEST_EXISTS)) {
        return true;
    }
    if (!g_file_get_contents(path, text, NULL, &err)) {
        g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_INVAL,
                    "--metrics-tls-creds-dir: %s", err->message);
        return false;
    }
    return true;
}

/*
 * The credentials of --metrics-tls-creds-dir @dir are there and GnuTLS
 * takes them: the key matches the certificate, the CA file holds
 * certificates.  Checked at start-up, before anything else happens.
 */
static bool http_check_tls(const char *dir, GError **errp)
{
    g_autofree char *cert = NULL, *key = NULL, *ca = NULL;
    gnutls_certificate_credentials_t x509;
    gnutls_datum_t c, k, t;
    int ret;

    if (MHD_is_feature_supported(MHD_FEATURE_TLS) != MHD_YES) {
        g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_NOSYS,
                    "--metrics-tls-creds-dir: this libmicrohttpd was "
                    "built without TLS");
        return false;
    }
    if (!http_read_pem(dir, "server-cert.pem", false, &cert, errp) ||
        !http_read_pem(dir, "server-key.pem", false, &key, errp) ||
        !http_read_pem(dir, "ca-cert.pem", true, &ca, errp)) {
        return false;
    }
    if (gnutls_certificate_allocate_credentials(&x509) < 0) {
        g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_NOMEM,
                    "--metrics-tls-creds-dir: out of memory");
        return false;
    }
    c = (gnutls_datum_t){ (unsigned char *)cert, strlen(cert) };
    k = (gnutls_datum_t){ (unsigned char *)key, strlen(key) };
    ret = gnutls_certificate_set_x509_key_mem(x509, &c, &k,
                                              GNUTLS_X509_FMT_PEM);
    if (ret < 0) {
        g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_INVAL,
                    "--metrics-tls-creds-dir %s: server-cert.pem and "
                    "server-key.pem: %s", dir, gnutls_strerror(ret));
    } else if (ca) {
        t = (gnutls_datum_t){ (unsigned char *)ca, strlen(ca) };
        ret = gnutls_certificate_set_x509_trust_mem(x509, &t,
                                                    GNUTLS_X509_FMT_PEM);
        if (ret <= 0) {
            g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_INVAL,
                        "--metrics-tls-creds-dir %s: ca-cert.pem: %s", dir,
                        ret < 0 ? gnutls_strerror(ret)
                                : "no certificate in it");
            ret = -1;
        }
    }
    gnutls_certificate_free_credentials(x509);
    return ret >= 0;
}

bool metrics_http_check(const char *addr, const char *tls_dir,
                        GError **errp)
{
    struct sockaddr_storage ss;

    return http_parse_addr(addr, &ss, errp) &&
           (!tls_dir || http_check_tls(tls_dir, errp));
}

static void http_free(ExtlockdHttp *http)
{
    g_free(http->cert);
    g_free(http->key);
    g_free(http->ca);
    g_free(http);
}

ExtlockdHttp *metrics_http_start(ExtlockdMetrics *m, const char *addr,
                                 const char *tls_dir, GError **errp)
{
    struct sockaddr_storage ss;
    ExtlockdHttp *http;
    unsigned flags = MHD_USE_POLL_INTERNAL_THREAD;

    if (!http_parse_addr(addr, &ss, errp)) {
        return NULL;
    }
    if (ss.ss_family == AF_INET6) {
        flags |= MHD_USE_IPv6;
    }
    http = g_new0(ExtlockdHttp, 1);
    http->metrics = m;
    if (tls_dir) {
        /* checked by metrics_http_check(); read again as it is now */
        if (!http_read_pem(tls_dir, "server-cert.pem", false, &http->cert,
                           errp) ||
            !http_read_pem(tls_dir, "server-key.pem", false, &http->key,
                           errp) ||
            !http_read_pem(tls_dir, "ca-cert.pem", true, &http->ca, errp)) {
            http_free(http);
            return NULL;
        }
        flags |= MHD_USE_TLS;
    }
    http->daemon = MHD_start_daemon(flags, 0, NULL, NULL, http_handler, http,
                                    MHD_OPTION_SOCK_ADDR, &ss,
                                    MHD_OPTION_CONNECTION_LIMIT,
                                    (unsigned)HTTP_CONN_LIMIT,
                                    MHD_OPTION_CONNECTION_TIMEOUT,
                                    (unsigned)HTTP_CONN_TIMEOUT_S,
                                    MHD_OPTION_PER_IP_CONNECTION_LIMIT,
                                    (unsigned)HTTP_CONN_LIMIT_PER_ADDR,
                                    http->cert ? MHD_OPTION_HTTPS_MEM_CERT
                                               : MHD_OPTION_END,
                                    http->cert,
                                    MHD_OPTION_HTTPS_MEM_KEY, http->key,
                                    http->ca ? MHD_OPTION_HTTPS_MEM_TRUST
                                             : MHD_OPTION_END,
                                    http->ca,
                                    MHD_OPTION_END);
    if (!http->daemon) {
        g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_FAILED,
                    "--metrics-listen '%s': cannot listen there (address in "
                    "use or not local?)%s", addr,
                    tls_dir ? ", or the certificate or key in "
                    "--metrics-tls-creds-dir is not valid PEM" : "");
        http_free(http);
        return NULL;
    }
    return http;
}

void metrics_http_stop(ExtlockdHttp *http)
{
    if (http) {
        MHD_stop_daemon(http->daemon);
        http_free(http);
    }
}

#else /* !HAVE_MICROHTTPD */

bool metrics_http_check(const char *addr, const char *tls_dir,
                        GError **errp)
{
    g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_NOSYS,
                "--metrics-listen: extlockd was built without libmicrohttpd "
                "(install libmicrohttpd-dev and rebuild)");
    return false;
}

ExtlockdHttp *metrics_http_start(ExtlockdMetrics *m, const char *addr,
                                 const char *tls_dir, GError **errp)
{
    g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_NOSYS,
                "--metrics-listen: extlockd was built without libmicrohttpd "
                "(install libmicrohttpd-dev and rebuild)");
    return NULL;
}

void metrics_http_stop(ExtlockdHttp *http)
{
    g_assert(!http);
}

#endif
