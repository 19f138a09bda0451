/*
 * libFuzzer harness: the coordinator wire protocol codec
 *
 * Copyright (c) 2026 The extlock authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 *
 * For every input:
 *
 * 1. The whole input is decoded as one line.  A rejected line must come
 *    with an error code and leave nothing allocated in the message (the
 *    leak checker sees it otherwise).  An accepted line must decode the
 *    same way a second time (nothing carries over from the lines decoded
 *    before it).  An accepted message is encoded,
 *    and the encoding must be one line that decodes again to a message
 *    that encodes to the same bytes (the round trip is stable).
 * 2. The accepted line is decoded once more through json-c (the reference
 *    decoder), by inserting an unknown member with an escaped name, which
 *    the fast path never accepts: both decodings must encode identically.
 * 3. The input is fed in small chunks to a line buffer, and the lines it
 *    returns are compared with a simple model (every '\n'-terminated line
 *    is returned once, or reported as too long once; an unterminated rest
 *    is reported only if it already exceeds the limit).  Every returned
 *    line goes through step 1 as well.
 *
 * Any violated expectation aborts, which libFuzzer reports as a crash.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <glib.h>

#include "extlock/protocol.h"

#define FAIL(...) \
    do { \
        fprintf(stderr, "fuzz-protocol: " __VA_ARGS__); \
        fputc('\n', stderr); \
        abort(); \
    } while (0)

/* The escaped name is "_": unknown to every message type */
static const char extra_member[] = "\"\\u005f\":0,";

static void check_encoding(const GString *enc)
{
    if (enc->len < 2 || enc->str[enc->len - 1] != '\n' ||
        memchr(enc->str, '\n', enc->len - 1)) {
        FAIL("encoding is not exactly one line: %s", enc->str);
    }
}

/* Decode through json-c only: @line with an unknown escaped member added */
static void check_reference(const char *line, size_t len,
                            const GString *enc)
{
    size_t i = 0;
    GString *alt;
    GString *enc2;
    ExtlockMsg m;
    ExtlockProtoError err;

    while (i < len && (line[i] == ' ' || line[i] == '\t' ||
                       line[i] == '\r' || line[i] == '\n')) {
        i++;
    }
    if (i == len || line[i] != '{') {
        FAIL("accepted line does not start with an object");
    }
    alt = g_string_sized_new(len + sizeof(extra_member));
    g_string_append_len(alt, line, i + 1);
    g_string_append(alt, extra_member);
    g_string_append_len(alt, line + i + 1, len - i - 1);
    if (!extlock_msg_parse(alt->str, alt->len, &m, &err)) {
        FAIL("json-c rejects what the fast path accepted (%s): %.*s",
             err.message, (int)len, line);
    }
    enc2 = g_string_new(NULL);
    extlock_msg_format(&m, enc2);
    if (!g_string_equal(enc, enc2)) {
        FAIL("fast path and json-c decode differently:\n  %s  %s",
             enc->str, enc2->str);
    }
    extlock_msg_clear(&m);
    g_string_free(enc2, TRUE);
    g_string_free(alt, TRUE);
}

static void check_line(const char *line, size_t len)
{
    ExtlockMsg m, m2;
    ExtlockProtoError err;
    GString *enc, *enc2;

    if (!extlock_msg_parse(line, len, &m, &err)) {
        if (err.code == EXTLOCK_ERR_NONE || err.code >= EXTLOCK_ERR__MAX ||
            !err.message[0]) {
            FAIL("rejected without an error code or message");
        }
        /* Only the id may be left in a rejected message: nothing to free */
        return;
    }
    if (m.type == EXTLOCK_MSG_INVALID || m.type >= EXTLOCK_MSG__MAX) {
        FAIL("accepted with type %d", m.type);
    }
    enc = g_string_new(NULL);
    extlock_msg_format(&m, enc);
    check_encoding(enc);
    /* Decoding depends on the line alone (no state from earlier lines) */
    if (!extlock_msg_parse(line, len, &m2, &err)) {
        FAIL("line rejected the second time (%s)", err.message);
    }
    enc2 = g_string_new(NULL);
    extlock_msg_format(&m2, enc2);
    if (!g_string_equal(enc, enc2)) {
        FAIL("one line decoded twice, differently:\n  %s  %s", enc->str,
             enc2->str);
    }
    extlock_msg_clear(&m2);
    g_string_free(enc2, TRUE);
    if (!extlock_msg_parse(enc->str, enc->len - 1, &m2, &err)) {
        FAIL("own encoding rejected (%s): %s", err.message, enc->str);
    }
    if (m2.type != m.type || m2.has_id != m.has_id || m2.id != m.id) {
        FAIL("round trip changed type or id: %s", enc->str);
    }
    enc2 = g_string_new(NULL);
    extlock_msg_format(&m2, enc2);
    if (!g_string_equal(enc, enc2)) {
        FAIL("round trip is not stable:\n  %s  %s", enc->str, enc2->str);
    }
    if (len <= EXTLOCK_MAX_LINE) {
        check_reference(line, len, enc);
    }
    extlock_msg_clear(&m);
    extlock_msg_clear(&m2);
    g_string_free(enc, TRUE);
    g_string_free(enc2, TRUE);
}

/* Expected line buffer results: 'o' line (its bytes), 't' too long */
typedef struct Expect {
    char kind;
    const uint8_t *p;
    size_t n;
} Expect;

static void check_linebuf(const uint8_t *data, size_t size)
{
    /* Mostly the real limit for JSON-like input, small ones otherwise */
    size_t max_line = (data[0] & 1) ? EXTLOCK_MAX_LINE : 2 + data[0] % 64;
    size_t chunk = 1 + data[size - 1] % 13;
    GArray *want = g_array_new(FALSE, FALSE, sizeof(Expect));
    ExtlockLineBuf lb;
    size_t start = 0, got = 0;

    for (size_t i = 0; i <= size; i++) {
        if (i == size || data[i] == '\n') {
            size_t n = i - start;
            Expect e = { .p = data + start };

            if (i < size && n + 1 <= max_line) {
                e.kind = 'o';
                e.n = n && data[i - 1] == '\r' ? n - 1 : n;
                g_array_append_val(want, e);
            } else if (i < size || n >= max_line) {
                e.kind = 't';
                g_array_append_val(want, e);
            }
            start = i + 1;
        }
    }

    extlock_linebuf_init_max(&lb, max_line);
    for (size_t off = 0; off < size; off += chunk) {
        const char *line;
        size_t len;
        ExtlockLineResult r;

        extlock_linebuf_append(&lb, data + off, MIN(chunk, size - off));
        while ((r = extlock_linebuf_next(&lb, &line, &len)) !=
               EXTLOCK_LINE_NONE) {
            const Expect *e;

            if (got >= want->len) {
                FAIL("line buffer returned more lines than the input has");
            }
            e = &g_array_index(want, Expect, got++);
            if (r == EXTLOCK_LINE_TOO_LONG) {
                if (e->kind != 't') {
                    FAIL("line %zu reported too long (limit %zu)", got,
                         max_line);
                }
                continue;
            }
            if (e->kind != 'o' || len != e->n ||
                memcmp(line, e->p, len)) {
                FAIL("line %zu differs from the input (limit %zu)", got,
                     max_line);
            }
            check_line(line, len);
        }
    }
    if (got != want->len) {
        FAIL("line buffer returned %zu of %u lines (limit %zu, chunk %zu)",
             got, want->len, max_line, chunk);
    }
    extlock_linebuf_destroy(&lb);
    g_array_free(want, TRUE);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size == 0) {
        return 0;
    }
    check_line((const char *)data, size);
    check_linebuf(data, size);
    return 0;
}
