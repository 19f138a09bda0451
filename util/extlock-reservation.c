/*
 * extlock: SCSI-3 persistent reservation state machine (SPC-4 5.13)
 *
 * Copyright (c) 2026 The extlock authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 *
 * Every service action first checks everything that can fail, then
 * changes the state, so that an error leaves the state as it was.
 */
#ifdef EXTLOCK_IN_QEMU
#include "qemu/osdep.h"   /* first, as every QEMU file (block/meson.build) */
#endif
#include <string.h>
#include "extlock/reservation.h"

static void registrant_free(gpointer p)
{
    ExtlockPrRegistrant *r = p;

    g_free(r->nexus);
    g_free(r);
}

void extlock_pr_init(ExtlockPrState *s)
{
    memset(s, 0, sizeof(*s));
    s->registrants = g_ptr_array_new_with_free_func(registrant_free);
}

void extlock_pr_destroy(ExtlockPrState *s)
{
    if (s->registrants) {
        g_ptr_array_unref(s->registrants);
    }
    g_free(s->holder);
    memset(s, 0, sizeof(*s));
}

void extlock_pr_copy(ExtlockPrState *dst, const ExtlockPrState *src)
{
    extlock_pr_init(dst);
    dst->generation = src->generation;
    dst->aptpl = src->aptpl;
    dst->type = src->type;
    dst->holder = g_strdup(src->holder);
    for (guint i = 0; i < src->registrants->len; i++) {
        const ExtlockPrRegistrant *r = g_ptr_array_index(src->registrants, i);
        ExtlockPrRegistrant *c = g_new0(ExtlockPrRegistrant, 1);

        c->nexus = g_strdup(r->nexus);
        c->key = r->key;
        g_ptr_array_add(dst->registrants, c);
    }
}

const ExtlockPrRegistrant *extlock_pr_find(const ExtlockPrState *s,
                                           const char *nexus)
{
    for (guint i = 0; i < s->registrants->len; i++) {
        const ExtlockPrRegistrant *r = g_ptr_array_index(s->registrants, i);

        if (strcmp(r->nexus, nexus) == 0) {
            return r;
        }
    }
    return NULL;
}

bool extlock_pr_type_valid(unsigned type)
{
    switch (type) {
    case EXTLOCK_PR_TYPE_WE:
    case EXTLOCK_PR_TYPE_EA:
    case EXTLOCK_PR_TYPE_WE_RO:
    case EXTLOCK_PR_TYPE_EA_RO:
    case EXTLOCK_PR_TYPE_WE_AR:
    case EXTLOCK_PR_TYPE_EA_AR:
        return true;
    default:
        return false;
    }
}

bool extlock_pr_type_all_registrants(ExtlockPrType type)
{
    return type == EXTLOCK_PR_TYPE_WE_AR || type == EXTLOCK_PR_TYPE_EA_AR;
}

/* Is @nexus a reservation holder?  (For _AR types: every registrant.) */
static bool is_holder(const ExtlockPrState *s, const char *nexus)
{
    if (s->type == EXTLOCK_PR_TYPE_NONE) {
        return false;
    }
    if (extlock_pr_type_all_registrants(s->type)) {
        return extlock_pr_find(s, nexus) != NULL;
    }
    return s->holder && strcmp(s->holder, nexus) == 0;
}

uint64_t extlock_pr_reservation_key(const ExtlockPrState *s)
{
    const ExtlockPrRegistrant *r;

    if (s->type == EXTLOCK_PR_TYPE_NONE ||
        extlock_pr_type_all_registrants(s->type)) {
        return 0;
    }
    r = extlock_pr_find(s, s->holder);
    return r ? r->key : 0;
}

static void release(ExtlockPrState *s)
{
    s->type = EXTLOCK_PR_TYPE_NONE;
    g_clear_pointer(&s->holder, g_free);
}

static void reserve(ExtlockPrState *s, const char *nexus, ExtlockPrType type)
{
    g_free(s->holder);
    s->type = type;
    s->holder = extlock_pr_type_all_registrants(type) ? NULL
                                                      : g_strdup(nexus);
}

/*
 * Remove registration @i.  Losing the last registration of an _AR
 * reservation, or the holder's registration, releases the reservation.
 */
static void unregister_index(ExtlockPrState *s, guint i)
{
    ExtlockPrRegistrant *r = g_ptr_array_index(s->registrants, i);

    if (s->type != EXTLOCK_PR_TYPE_NONE &&
        !extlock_pr_type_all_registrants(s->type) &&
        strcmp(s->holder, r->nexus) == 0) {
        release(s);
    }
    g_ptr_array_remove_index(s->registrants, i);
    if (extlock_pr_type_all_registrants(s->type) &&
        s->registrants->len == 0) {
        release(s);
    }
}

static void note_preempted(GPtrArray *preempted, const char *nexus)
{
    if (preempted) {
        g_ptr_array_add(preempted, g_strdup(nexus));
    }
}

/* Remove every registration with @key except @nexus's; how many? */
static guint remove_key(ExtlockPrState *s, uint64_t key, const char *nexus,
                        GPtrArray *preempted)
{
    guint n = 0;

    for (guint i = s->registrants->len; i-- > 0;) {
        ExtlockPrRegistrant *r = g_ptr_array_index(s->registrants, i);

        if (r->key == key && strcmp(r->nexus, nexus) != 0) {
            note_preempted(preempted, r->nexus);
            unregister_index(s, i);
            n++;
        }
    }
    return n;
}

static guint count_key(const ExtlockPrState *s, uint64_t key,
                       const char *nexus)
{
    guint n = 0;

    for (guint i = 0; i < s->registrants->len; i++) {
        ExtlockPrRegistrant *r = g_ptr_array_index(s->registrants, i);

        n += r->key == key && strcmp(r->nexus, nexus) != 0;
    }
    return n;
}

static ExtlockPrStatus do_register(ExtlockPrState *s, const char *nexus,
                                   const ExtlockPrOut *req, bool ignore)
{
    ExtlockPrRegistrant *r = NULL;
    guint i;

    for (i = 0; i < s->registrants->len; i++) {
        r = g_ptr_array_index(s->registrants, i);
        if (strcmp(r->nexus, nexus) == 0) {
            break;
        }
        r = NULL;
    }
    if (!r) {
        if (!ignore && req->key != 0) {
            return EXTLOCK_PR_CONFLICT;
        }
        if (req->sa_key == 0) {
            return EXTLOCK_PR_OK;       /* nothing to do, no new generation */
        }
        if (s->registrants->len >= EXTLOCK_PR_MAX_REGISTRANTS) {
            return EXTLOCK_PR_NO_RESOURCES;
        }
        r = g_new0(ExtlockPrRegistrant, 1);
        r->nexus = g_strdup(nexus);
        r->key = req->sa_key;
        g_ptr_array_add(s->registrants, r);
    } else {
        if (!ignore && req->key != r->key) {
            return EXTLOCK_PR_CONFLICT;
        }
        if (req->sa_key == 0) {
            unregister_index(s, i);
        } else {
            r->key = req->sa_key;
        }
    }
    s->aptpl = req->aptpl;
    s->generation++;
    return EXTLOCK_PR_OK;
}

static ExtlockPrStatus do_preempt(ExtlockPrState *s, const char *nexus,
                                  const ExtlockPrOut *req,
                                  GPtrArray *preempted)
{
    bool ar = extlock_pr_type_all_registrants(s->type);

    if (s->type != EXTLOCK_PR_TYPE_NONE &&
        ((ar && req->sa_key == 0) ||
         (!ar && req->sa_key == extlock_pr_reservation_key(s)))) {
        /* Take the reservation over, with the type of this command */
        if (!extlock_pr_type_valid(req->type)) {
            return EXTLOCK_PR_INVALID_FIELD_CDB;
        }
        if (ar) {
            /* Every other registration goes */
            for (guint i = s->registrants->len; i-- > 0;) {
                ExtlockPrRegistrant *r = g_ptr_array_index(s->registrants, i);

                if (strcmp(r->nexus, nexus) != 0) {
                    note_preempted(preempted, r->nexus);
                    g_ptr_array_remove_index(s->registrants, i);
                }
            }
        } else {
            remove_key(s, req->sa_key, nexus, preempted);
        }
        reserve(s, nexus, req->type);
        s->generation++;
        return EXTLOCK_PR_OK;
    }
    /* Only remove registrations; the reservation, if any, stays */
    if (req->sa_key == 0) {
        return EXTLOCK_PR_INVALID_FIELD_PARAM;
    }
    if (count_key(s, req->sa_key, nexus) == 0) {
        return EXTLOCK_PR_CONFLICT;
    }
    remove_key(s, req->sa_key, nexus, preempted);
    s->generation++;
    return EXTLOCK_PR_OK;
}

ExtlockPrStatus extlock_pr_out(ExtlockPrState *s, const char *nexus,
                               const ExtlockPrOut *req, GPtrArray *preempted)
{
    const ExtlockPrRegistrant *me;

    switch (req->action) {
    case EXTLOCK_PR_REGISTER:
        return do_register(s, nexus, req, false);
    case EXTLOCK_PR_REGISTER_AND_IGNORE:
        return do_register(s, nexus, req, true);
    case EXTLOCK_PR_RESERVE:
    case EXTLOCK_PR_RELEASE:
    case EXTLOCK_PR_CLEAR:
    case EXTLOCK_PR_PREEMPT:
    case EXTLOCK_PR_PREEMPT_AND_ABORT:
        break;
    default:
        return EXTLOCK_PR_INVALID_FIELD_CDB;
    }

    /* The others need a registration with the right key */
    me = extlock_pr_find(s, nexus);
    if (!me || me->key != req->key) {
        return EXTLOCK_PR_CONFLICT;
    }

    switch (req->action) {
    case EXTLOCK_PR_RESERVE:
        if (!extlock_pr_type_valid(req->type)) {
            return EXTLOCK_PR_INVALID_FIELD_CDB;
        }
        if (s->type == EXTLOCK_PR_TYPE_NONE) {
            reserve(s, nexus, req->type);
            return EXTLOCK_PR_OK;
        }
        /* Reserving again what one holds is GOOD; anything else conflicts */
        if (is_holder(s, nexus) && s->type == req->type) {
            return EXTLOCK_PR_OK;
        }
        return EXTLOCK_PR_CONFLICT;

    case EXTLOCK_PR_RELEASE:
        if (!is_holder(s, nexus)) {
            return EXTLOCK_PR_OK;       /* no reservation, or not ours */
        }
        if (s->type != req->type) {
            return EXTLOCK_PR_INVALID_RELEASE;
        }
        release(s);
        return EXTLOCK_PR_OK;

    case EXTLOCK_PR_CLEAR:
        for (guint i = s->registrants->len; i-- > 0;) {
            ExtlockPrRegistrant *r = g_ptr_array_index(s->registrants, i);

            if (strcmp(r->nexus, nexus) != 0) {
                note_preempted(preempted, r->nexus);
            }
            g_ptr_array_remove_index(s->registrants, i);
        }
        release(s);
        s->generation++;
        return EXTLOCK_PR_OK;

    default:
        return do_preempt(s, nexus, req, preempted);
    }
}

bool extlock_pr_type_allows(ExtlockPrType type, bool is_holder,
                            bool is_registered, bool write)
{
    switch (type) {
    case EXTLOCK_PR_TYPE_NONE:
        return true;
    case EXTLOCK_PR_TYPE_WE:
        return !write || is_holder;
    case EXTLOCK_PR_TYPE_EA:
        return is_holder;
    case EXTLOCK_PR_TYPE_WE_RO:
    case EXTLOCK_PR_TYPE_WE_AR:
        return !write || is_registered;
    case EXTLOCK_PR_TYPE_EA_RO:
    case EXTLOCK_PR_TYPE_EA_AR:
        return is_registered;
    }
    return false;
}

bool extlock_pr_allows(const ExtlockPrState *s, const char *nexus,
                       bool write)
{
    return extlock_pr_type_allows(s->type, is_holder(s, nexus),
                                  extlock_pr_find(s, nexus) != NULL, write);
}

static const char *const type_names[] = {
    [EXTLOCK_PR_TYPE_NONE] = "none",
    [EXTLOCK_PR_TYPE_WE] = "write-exclusive",
    [EXTLOCK_PR_TYPE_EA] = "exclusive-access",
    [EXTLOCK_PR_TYPE_WE_RO] = "write-exclusive-registrants-only",
    [EXTLOCK_PR_TYPE_EA_RO] = "exclusive-access-registrants-only",
    [EXTLOCK_PR_TYPE_WE_AR] = "write-exclusive-all-registrants",
    [EXTLOCK_PR_TYPE_EA_AR] = "exclusive-access-all-registrants",
};

static const char *const action_names[] = {
    [EXTLOCK_PR_REGISTER] = "register",
    [EXTLOCK_PR_RESERVE] = "reserve",
    [EXTLOCK_PR_RELEASE] = "release",
    [EXTLOCK_PR_CLEAR] = "clear",
    [EXTLOCK_PR_PREEMPT] = "preempt",
    [EXTLOCK_PR_PREEMPT_AND_ABORT] = "preempt-and-abort",
    [EXTLOCK_PR_REGISTER_AND_IGNORE] = "register-and-ignore",
};

static const char *const status_names[] = {
    [EXTLOCK_PR_OK] = "ok",
    [EXTLOCK_PR_CONFLICT] = "reservation-conflict",
    [EXTLOCK_PR_INVALID_FIELD_CDB] = "invalid-field-in-cdb",
    [EXTLOCK_PR_INVALID_FIELD_PARAM] = "invalid-field-in-parameter-list",
    [EXTLOCK_PR_INVALID_RELEASE] = "invalid-release",
    [EXTLOCK_PR_NO_RESOURCES] = "insufficient-registration-resources",
};

static const char *name_of(const char *const *names, size_t n, unsigned v)
{
    return v < n && names[v] ? names[v] : NULL;
}

static bool parse_name(const char *const *names, size_t n, const char *name,
                       unsigned *v)
{
    if (!name) {
        return false;
    }
    for (size_t i = 0; i < n; i++) {
        if (names[i] && strcmp(names[i], name) == 0) {
            *v = i;
            return true;
        }
    }
    return false;
}

const char *extlock_pr_type_name(ExtlockPrType type)
{
    const char *n = name_of(type_names, G_N_ELEMENTS(type_names), type);

    return n ? n : "invalid";
}

bool extlock_pr_type_parse(const char *name, ExtlockPrType *type)
{
    unsigned v;

    if (!parse_name(type_names, G_N_ELEMENTS(type_names), name, &v)) {
        return false;
    }
    *type = v;
    return true;
}

const char *extlock_pr_action_name(ExtlockPrAction action)
{
    const char *n = name_of(action_names, G_N_ELEMENTS(action_names), action);

    return n ? n : "invalid";
}

bool extlock_pr_action_parse(const char *name, ExtlockPrAction *action)
{
    unsigned v;

    if (!parse_name(action_names, G_N_ELEMENTS(action_names), name, &v)) {
        return false;
    }
    *action = v;
    return true;
}

const char *extlock_pr_status_name(ExtlockPrStatus status)
{
    const char *n = name_of(status_names, G_N_ELEMENTS(status_names), status);

    return n ? n : "invalid";
}

bool extlock_pr_status_parse(const char *name, ExtlockPrStatus *status)
{
    unsigned v;

    if (!parse_name(status_names, G_N_ELEMENTS(status_names), name, &v)) {
        return false;
    }
    *status = v;
    return true;
}
