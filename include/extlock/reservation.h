/*
 * extlock: SCSI-3 persistent reservation state machine (SPC-4 5.13)
 *
 * Copyright (c) 2026 The extlock authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 *
 * One ExtlockPrState per lock-space (one emulated logical unit).  An
 * I_T nexus is named by a string: the coordinator uses the client-id of
 * the session, which is stable across QEMU restarts and migration, as a
 * real initiator port's name is.  The functions here are pure: no I/O,
 * no clock; the coordinator persists and distributes the state.
 *
 * Not supported (reported as ILLEGAL REQUEST, INVALID FIELD IN CDB or IN
 * PARAMETER LIST): REGISTER AND MOVE, REPLACE LOST RESERVATION, READ FULL
 * STATUS, SPEC_I_PT, ALL_TG_PT (there is one target port), scopes other
 * than LU_SCOPE.  Unit attentions to other nexuses are not generated.
 */
#ifndef EXTLOCK_RESERVATION_H
#define EXTLOCK_RESERVATION_H

#include <stdbool.h>
#include <stdint.h>
#include <glib.h>

/* Maximum number of registered I_T nexuses per logical unit */
#define EXTLOCK_PR_MAX_REGISTRANTS 64

/* PERSISTENT RESERVATION TYPE codes (SPC-4 table 169); 0 = none */
typedef enum ExtlockPrType {
    EXTLOCK_PR_TYPE_NONE = 0,
    EXTLOCK_PR_TYPE_WE = 1,         /* Write Exclusive */
    EXTLOCK_PR_TYPE_EA = 3,         /* Exclusive Access */
    EXTLOCK_PR_TYPE_WE_RO = 5,      /* Write Exclusive - Registrants Only */
    EXTLOCK_PR_TYPE_EA_RO = 6,      /* Exclusive Access - Registrants Only */
    EXTLOCK_PR_TYPE_WE_AR = 7,      /* Write Exclusive - All Registrants */
    EXTLOCK_PR_TYPE_EA_AR = 8,      /* Exclusive Access - All Registrants */
} ExtlockPrType;

/* PERSISTENT RESERVE OUT service actions (SPC-4 table 177) */
typedef enum ExtlockPrAction {
    EXTLOCK_PR_REGISTER = 0,
    EXTLOCK_PR_RESERVE = 1,
    EXTLOCK_PR_RELEASE = 2,
    EXTLOCK_PR_CLEAR = 3,
    EXTLOCK_PR_PREEMPT = 4,
    EXTLOCK_PR_PREEMPT_AND_ABORT = 5,
    EXTLOCK_PR_REGISTER_AND_IGNORE = 6,
    EXTLOCK_PR_REGISTER_AND_MOVE = 7,       /* not supported */
    EXTLOCK_PR_REPLACE_LOST = 8,            /* not supported */
} ExtlockPrAction;

/* Outcome of a PERSISTENT RESERVE OUT, with the SCSI status/sense it maps to */
typedef enum ExtlockPrStatus {
    EXTLOCK_PR_OK = 0,              /* GOOD */
    EXTLOCK_PR_CONFLICT,            /* RESERVATION CONFLICT status */
    EXTLOCK_PR_INVALID_FIELD_CDB,   /* ILLEGAL REQUEST, 24h/00h */
    EXTLOCK_PR_INVALID_FIELD_PARAM, /* ILLEGAL REQUEST, 26h/00h */
    EXTLOCK_PR_INVALID_RELEASE,     /* ILLEGAL REQUEST, 26h/04h */
    EXTLOCK_PR_NO_RESOURCES,        /* ILLEGAL REQUEST, 55h/04h */
} ExtlockPrStatus;

typedef struct ExtlockPrRegistrant {
    char *nexus;
    uint64_t key;
} ExtlockPrRegistrant;

typedef struct ExtlockPrState {
    uint32_t generation;        /* PRgeneration */
    bool aptpl;                 /* last REGISTER's APTPL bit */
    GPtrArray *registrants;     /* of ExtlockPrRegistrant, registration order */
    ExtlockPrType type;         /* EXTLOCK_PR_TYPE_NONE: no reservation */
    char *holder;               /* holder's nexus; NULL for the _AR types */
} ExtlockPrState;

/* A PERSISTENT RESERVE OUT command, decoded */
typedef struct ExtlockPrOut {
    ExtlockPrAction action;
    ExtlockPrType type;         /* RESERVE, RELEASE, PREEMPT* */
    uint64_t key;               /* RESERVATION KEY */
    uint64_t sa_key;            /* SERVICE ACTION RESERVATION KEY */
    bool aptpl;                 /* REGISTER* */
} ExtlockPrOut;

void extlock_pr_init(ExtlockPrState *s);
void extlock_pr_destroy(ExtlockPrState *s);
void extlock_pr_copy(ExtlockPrState *dst, const ExtlockPrState *src);

/* The registration of @nexus, or NULL */
const ExtlockPrRegistrant *extlock_pr_find(const ExtlockPrState *s,
                                           const char *nexus);

/* The key READ RESERVATION reports: the holder's, or 0 for _AR types */
uint64_t extlock_pr_reservation_key(const ExtlockPrState *s);

/*
 * Run one PERSISTENT RESERVE OUT for @nexus.  On error nothing changes.
 * @preempted (may be NULL) gets a copy of the nexus name of every
 * registration that PREEMPT / PREEMPT AND ABORT / CLEAR removed (not the
 * caller's), so that the caller can abort their commands.
 */
ExtlockPrStatus extlock_pr_out(ExtlockPrState *s, const char *nexus,
                               const ExtlockPrOut *req, GPtrArray *preempted);

/* May @nexus read (write=false) or write (write=true) the medium? */
bool extlock_pr_allows(const ExtlockPrState *s, const char *nexus,
                       bool write);

/*
 * The same decision from what one node caches: the reservation type,
 * and whether this node is the holder and whether it is registered.
 */
bool extlock_pr_type_allows(ExtlockPrType type, bool is_holder,
                            bool is_registered, bool write);

bool extlock_pr_type_valid(unsigned type);
bool extlock_pr_type_all_registrants(ExtlockPrType type);
const char *extlock_pr_type_name(ExtlockPrType type);
bool extlock_pr_type_parse(const char *name, ExtlockPrType *type);
const char *extlock_pr_action_name(ExtlockPrAction action);
bool extlock_pr_action_parse(const char *name, ExtlockPrAction *action);
const char *extlock_pr_status_name(ExtlockPrStatus status);
bool extlock_pr_status_parse(const char *name, ExtlockPrStatus *status);

#endif
