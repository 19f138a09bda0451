/*
 * extlock: shared helpers for the integration tests that run extlockd
 *
 * Copyright (c) 2026 The extlock authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 *
 * Every test starts its own daemon(s) in a fresh temporary directory
 * (binary from $EXTLOCKD, with --debug-checks and short leases) and talks
 * to it over UNIX and TCP sockets with the blocking client library.
 * The teardown kills whatever a test left running, even after a failure.
 * The helpers fail the current cmocka test on anything unexpected.
 */
#ifndef EXTLOCKD_HARNESS_H
#define EXTLOCKD_HARNESS_H

#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>
#include <glib.h>
#include <json-c/json.h>

#include "extlock/client-sync.h"
#include "extlock/protocol.h"

#define LEASE_MS        400     /* daemon default lease in these tests */
#define MARGIN_MS       300     /* fence margin in these tests */
#define LONG_LEASE_MS   30000   /* for clients that must not expire */
#define RECV_MS         3000    /* generous wait for an expected message */
/*
 * Wait for a reply that must come and whose timing the test does not
 * check (status): only a hang guard.  A status with thousands of locks
 * over TLS, under ASan on a loaded machine, takes longer than RECV_MS.
 */
#define HANG_MS         60000
#define QUIET_MS        150     /* how long "nothing arrives" is checked */
#define SLACK_MS        800     /* allowed lateness of lease actions */

typedef struct Daemon {
    pid_t pid;                  /* 0 once reaped */
    int status;                 /* wait status once reaped */
    char *sock;
    char *unix_addr;
    char *tcp_addr;
    char *state;
    char *log;
} Daemon;

typedef struct Fixture {
    char *dir;
    GPtrArray *daemons;
    GPtrArray *conns;
    unsigned ndaemons;
} Fixture;

typedef struct Grant {
    uint64_t id;                /* request id */
    uint64_t lock;
    uint64_t token;
} Grant;

/* Set by main() from $EXTLOCKD and $EXTLOCKCTL */
extern const char *extlockd_bin;
extern const char *extlockctl_bin;
/* The current test's temporary directory, daemons and connections */
extern Fixture fx;

/*
 * Daemons.  daemon_spawn() runs extlockd with the test defaults
 * (--lease-ms LEASE_MS, --fence-margin-ms MARGIN_MS, --debug-checks, a
 * UNIX and a TCP listener) plus @extra, with a state file of its own
 * unless @state is given, and does not wait; daemon_start() waits until
 * it accepts connections; daemon_stop() sends SIGTERM and expects a
 * clean exit.
 */
void remove_tree(const char *path);
int free_tcp_port(void);
void dump_log(Daemon *d);
bool daemon_reap(Daemon *d, bool block);
bool daemon_wait_exit(Daemon *d, int ms);
Daemon *daemon_spawn(const char *state, const char *const *extra,
                     const char *const *env);
void daemon_wait_address(Daemon *d, const char *address);
/*
 * SIGSTOP @d and wait (bounded) until it has stopped: what is sent to it
 * next waits in its sockets until SIGCONT
 */
void daemon_pause(Daemon *d);
Daemon *daemon_start(const char *state, const char *const *extra,
                     const char *const *env);
void daemon_stop_with(Daemon *d, int sig);
void daemon_stop_within(Daemon *d, int sig, int ms);
void daemon_stop(Daemon *d);
void daemon_free(gpointer p);
/* cmocka setup/teardown: a fresh directory, everything killed after */
int setup(void **state);
int teardown(void **state);

/*
 * Client helpers: each fails the test if the expected message does not
 * arrive within RECV_MS (or something else arrives first)
 */
ExtlockConn *conn_open(const char *address);
void conn_drop(ExtlockConn *c);
void send_msg(ExtlockConn *c, ExtlockMsg *m);
void send_raw(ExtlockConn *c, const char *text);
void recv_msg(ExtlockConn *c, ExtlockMsg *m, int timeout_ms);
void expect_msg(ExtlockConn *c, ExtlockMsg *m, ExtlockMsgType type,
                uint64_t id);
void expect_error(ExtlockConn *c, bool has_id, uint64_t id,
                  ExtlockErrorCode code);
void expect_quiet(ExtlockConn *c, int ms);
void expect_eof(ExtlockConn *c);
char *hello_full(ExtlockConn *c, const char *client,
                 const char *space, uint32_t lease_ms,
                 uint64_t *epoch);
ExtlockConn *client(const char *address, const char *client_id,
                    uint32_t lease_ms);
uint64_t send_lock(ExtlockConn *c, uint64_t offset, uint64_t length,
                   ExtlockMode mode, bool wait);
/* lock that may grow within [limit_offset, +limit_length); waits */
uint64_t send_lock_limit(ExtlockConn *c, uint64_t offset, uint64_t length,
                         ExtlockMode mode, uint64_t limit_offset,
                         uint64_t limit_length);
Grant expect_granted(ExtlockConn *c, uint64_t id, uint64_t offset,
                     uint64_t length, ExtlockMode mode);
Grant lock_now(ExtlockConn *c, uint64_t offset, uint64_t length,
               ExtlockMode mode);
uint64_t lock_waits(ExtlockConn *c, uint64_t offset, uint64_t length,
                    ExtlockMode mode, ExtlockMsg *waiting);
const ExtlockBlocker *find_blocker(ExtlockMsg *waiting,
                                   const char *client_id);
void unlock_part(ExtlockConn *c, uint64_t lock, uint64_t offset,
                 uint64_t length, ExtlockMsg *reply);
void unlock_all(ExtlockConn *c, uint64_t lock);
uint64_t send_simple(ExtlockConn *c, ExtlockMsgType type);
void renew(ExtlockConn *c);
void bye(ExtlockConn *c);
int64_t now_ms(void);

/* Resume secrets from the welcomes the helpers saw (NULL: none) */
void secret_remember(const char *session, const char *secret);
char *secret_of(const char *session);
char *secret_sha256(const char *session);
/*
 * The address of @d on the transport @session was created on: sessions
 * belong to the identity that made them ("uid:N" on UNIX, "anonymous" on
 * plain TCP), so they are resumed on the same transport
 */
const char *session_home(Daemon *d, const char *session);

/* Status helpers */
json_object *status_get(ExtlockConn *c);
json_object *jget(json_object *obj, const char *key);
int64_t jint(json_object *obj, const char *key);
const char *jstr(json_object *obj, const char *key);
void del_each(json_object *arr, const char *key);
char *status_stable(ExtlockConn *c, int64_t *errors);
json_object *find_session(json_object *st, const char *id);
json_object *first_space(json_object *st);
json_object *wait_session_state(ExtlockConn *mon, const char *id,
                                const char *state);

/*
 * extlockd must refuse to start with @extra: exit @status, nothing
 * listening, @log_needle in its log
 */
void daemon_refused(const char *state_path, const char *const *extra,
                    int status, const char *log_needle);

/* CLOCK_MONOTONIC in ns, the clock of the event log's "ts" */
int64_t now_ns(void);
/* The event log (--event-log) as an array of objects (new reference) */
json_object *event_log_read(const char *path);
/*
 * The first event named @event of @client_id (NULL: anyone) with @token
 * (-1: any), borrowed from @events, or NULL
 */
json_object *event_find(json_object *events, const char *event,
                        const char *client_id, int64_t token);
/*
 * Poll the log until such an event is there (fails the test after @ms);
 * returns it (new reference) and, if @all, every event read (new ref.)
 */
json_object *event_wait(const char *path, const char *event,
                        const char *client_id, int64_t token, int ms,
                        json_object **all);

/* Persistent reservations */
/* Send a pr-out (with a "request" number, 0: none); its id */
uint64_t pr_out_request(ExtlockConn *c, ExtlockPrAction action,
                        unsigned type, uint64_t key, uint64_t sa_key,
                        uint64_t request);
uint64_t pr_out(ExtlockConn *c, ExtlockPrAction action, unsigned type,
                uint64_t key, uint64_t sa_key);
/* The next message on @c is a pr-update (in @m, cleared by the caller) */
uint64_t pr_expect_update(ExtlockConn *c, ExtlockMsg *m);
/* pr-ack @seq, and its pr-acked */
void pr_ack(ExtlockConn *c, uint64_t seq);
/* The next message on @c is the pr-result of @id: @want, @generation */
void pr_expect_result(ExtlockConn *c, uint64_t id, ExtlockPrStatus want,
                      uint32_t generation);
/* pr-in: subscribe and get the state (the caller clears @m) */
void pr_in(ExtlockConn *c, ExtlockMsg *m);
/*
 * A change by @from that every one of @others must acknowledge: the
 * reply comes only after the last ack.  Returns the new seq.
 */
uint64_t pr_change(ExtlockConn *from, ExtlockConn **others, int n,
                   ExtlockPrAction action, unsigned type, uint64_t key,
                   uint64_t sa_key, uint32_t generation);
/* extlockctl -c ADDR A1 A2: its stdout (g_free), exit status 0 checked */
char *ctl_output(const char *addr, const char *a1, const char *a2);

#endif /* EXTLOCKD_HARNESS_H */
