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

#define HTTP_CONN_LIMIT     32
#define HTTP_CONN_TIMEOUT_S 10

struct ExtlockdHttp {
    struct MHD_Daemon *daemon;
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

static enum MHD_Result http_handler(void *opaque,
                                    struct MHD_Connection *conn,
                                    const char *url, const char *method,
                                    const char *version,
                                    const char *upload_data,
                                    size_t *upload_size, void **con_cls)
{
    ExtlockdMetrics *m = opaque;
    static const char plain[] = "text/plain; charset=utf-8";
    enum MHD_Result ret;
    char *copy;
    size_t len;

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

bool metrics_http_check(const char *addr, GError **errp)
{
    struct sockaddr_storage ss;

    return http_parse_addr(addr, &ss, errp);
}

ExtlockdHttp *metrics_http_start(ExtlockdMetrics *m, const char *addr,
                                 GError **errp)
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
    http->daemon = MHD_start_daemon(flags, 0, NULL, NULL, http_handler, m,
                                    MHD_OPTION_SOCK_ADDR, &ss,
                                    MHD_OPTION_CONNECTION_LIMIT,
                                    (unsigned)HTTP_CONN_LIMIT,
                                    MHD_OPTION_CONNECTION_TIMEOUT,
                                    (unsigned)HTTP_CONN_TIMEOUT_S,
                                    MHD_OPTION_END);
    if (!http->daemon) {
        g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_FAILED,
                    "--metrics-listen '%s': cannot listen there (address in "
                    "use or not local?)", addr);
        g_free(http);
        return NULL;
    }
    return http;
}

void metrics_http_stop(ExtlockdHttp *http)
{
    if (http) {
        MHD_stop_daemon(http->daemon);
        g_free(http);
    }
}

#else /* !HAVE_MICROHTTPD */

bool metrics_http_check(const char *addr, GError **errp)
{
    g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_NOSYS,
                "--metrics-listen: extlockd was built without libmicrohttpd "
                "(install libmicrohttpd-dev and rebuild)");
    return false;
}

ExtlockdHttp *metrics_http_start(ExtlockdMetrics *m, const char *addr,
                                 GError **errp)
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
