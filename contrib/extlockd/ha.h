/*
 * extlockd: high availability through etcd (leader election, durable state)
 *
 * Copyright (c) 2026 The extlock authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 *
 * Several extlockd replicas share one cluster name.  Under
 * /extlock/<cluster>/ etcd holds:
 *
 *   state             the state object of state-file.h (epoch, sessions),
 *                     created once by --create-cluster, then written only
 *                     by the leader, with compare-and-swap
 *   leader            the leader's member id, attached to its etcd lease
 *   members/<id>      {"address":A,"member-id":ID} of every live replica
 *                     (A: the address clients should use), on its lease
 *
 * The HA thread holds the replica's etcd lease (keep-alive every TTL/3),
 * campaigns (txn: create_revision(leader) == 0 -> put leader), and, once
 * elected, bumps the epoch in "state" (txn on its mod_revision and on the
 * leader key still being ours) before the main loop serves anybody.
 *
 * A leader may serve only while it can prove that its etcd lease is alive:
 * until the time it *sent* the last successful keep-alive plus the TTL
 * minus a margin (extlockd_ha_lease_ok()).  When it cannot, it steps down:
 * the process replaces itself (execv) with a fresh follower, so no session,
 * lock or queued grant survives.  docs/design.rst "High availability" has
 * the timing argument.
 */
#ifndef EXTLOCKD_HA_H
#define EXTLOCKD_HA_H

#include <glib.h>
#include <json-c/json.h>
#include <stdbool.h>
#include <stdint.h>

#define EXTLOCKD_HA_DEFAULT_TTL_MS   1000
#define EXTLOCKD_HA_MIN_TTL_MS       1000    /* etcd counts whole seconds */
#define EXTLOCKD_HA_MAX_TTL_MS       60000
/* Set in the environment of the re-executed process after a step-down */
#define EXTLOCKD_HA_RESTART_ENV      "EXTLOCKD_HA_STEPPED_DOWN"

typedef struct ExtlockdHa ExtlockdHa;

typedef struct ExtlockdHaConfig {
    char **endpoints;            /* http(s)://HOST:PORT */
    const char *cluster;
    const char *member_id;
    const char *advertise;       /* the address clients should use */
    uint32_t ttl_ms;             /* the etcd lease (whole seconds) */
    const char *cacert, *cert, *key;   /* TLS to etcd, all optional */
    const char *event_log;       /* path, or NULL */
    char **argv;                 /* to re-execute on step-down */
} ExtlockdHaConfig;

/*
 * Elected (in the main context): @epoch is durable in etcd, @sessions
 * (ExtlockdStateSession, taken over) are those of the previous leaders,
 * @reservations the JSON text of the state's "reservations" member (the
 * persistent reservations, docs/protocol.rst) or NULL, @maintenance that
 * of its "maintenance" member (the maintenance counts) or NULL
 */
typedef void ExtlockdHaElected(uint64_t epoch, GPtrArray *sessions,
                               const char *reservations,
                               const char *maintenance, void *opaque);

/* Check the configuration; NULL with @errp set if it is bad */
ExtlockdHa *extlockd_ha_new(const ExtlockdHaConfig *cfg, GError **errp);

/*
 * At start: wait at most @timeout_ms for etcd to answer and check that the
 * cluster exists (create it with epoch @create_epoch and the
 * ExtlockdStateSession list @create_sessions, may be NULL, if @create).
 * @create_state (@create_state_len bytes, may be NULL) is the text of the
 * single coordinator's state file (--create-cluster-from), already
 * checked: its "maintenance" and "reservations" members go into the
 * created state as they are.  *@created (may be NULL) tells whether this
 * call created the cluster; after a failure, whether it may have (it
 * sent the create to etcd).  Fails with a message that says what is
 * wrong.
 */
bool extlockd_ha_check(ExtlockdHa *ha, bool create, uint64_t create_epoch,
                       GPtrArray *create_sessions, const char *create_state,
                       size_t create_state_len, unsigned timeout_ms,
                       bool *created, GError **errp);

/* Start the HA threads; @elected runs in the main context */
void extlockd_ha_start(ExtlockdHa *ha, ExtlockdHaElected *elected,
                       void *opaque);

/* The state writer's function (state-writer.h): CAS into etcd */
bool extlockd_ha_write_state(const char *text, void *opaque, GError **errp);

/*
 * Before the leader sends anything: true if it is not the leader, or its
 * etcd lease is provably alive; otherwise it steps down (does not return)
 */
void extlockd_ha_assert_lease(ExtlockdHa *ha);

bool extlockd_ha_leading(ExtlockdHa *ha);
/* The leader's client address as a follower knows it (NULL: unknown) */
char *extlockd_ha_leader_address(ExtlockdHa *ha);
/* "cluster" of the status reply (docs/protocol.rst) */
json_object *extlockd_ha_status(ExtlockdHa *ha);

/* Stop the threads and give the etcd lease back (a fast failover) */
void extlockd_ha_free(ExtlockdHa *ha);

#endif /* EXTLOCKD_HA_H */
