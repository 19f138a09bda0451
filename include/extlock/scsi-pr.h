/*
 * extlock: decoding PERSISTENT RESERVE IN/OUT CDBs and parameter lists,
 * encoding their replies (SPC-4 6.15, 6.16)
 *
 * Copyright (c) 2026 The extlock authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 *
 * Pure C, header only: hw/scsi/scsi-disk-pr.c (in QEMU's tree) uses it,
 * tests/unit/test-reservation.c tests it without QEMU.  Errors are
 * returned as ExtlockScsiPrCheck values, which the caller turns into
 * CHECK CONDITION with the sense data named there.
 */
#ifndef EXTLOCK_SCSI_PR_H
#define EXTLOCK_SCSI_PR_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define EXTLOCK_SCSI_PR_IN              0x5e
#define EXTLOCK_SCSI_PR_OUT             0x5f

#define EXTLOCK_SCSI_PR_IN_READ_KEYS            0x00
#define EXTLOCK_SCSI_PR_IN_READ_RESERVATION     0x01
#define EXTLOCK_SCSI_PR_IN_REPORT_CAPABILITIES  0x02

#define EXTLOCK_SCSI_PR_OUT_REGISTER            0x00
#define EXTLOCK_SCSI_PR_OUT_RESERVE             0x01
#define EXTLOCK_SCSI_PR_OUT_RELEASE             0x02
#define EXTLOCK_SCSI_PR_OUT_CLEAR               0x03
#define EXTLOCK_SCSI_PR_OUT_PREEMPT             0x04
#define EXTLOCK_SCSI_PR_OUT_PREEMPT_AND_ABORT   0x05
#define EXTLOCK_SCSI_PR_OUT_REGISTER_AND_IGNORE 0x06

/* The parameter list of PR OUT without SPEC_I_PT: exactly 24 bytes */
#define EXTLOCK_SCSI_PR_OUT_PARAM_LEN   24

typedef enum ExtlockScsiPrCheck {
    EXTLOCK_SCSI_PR_CHECK_OK = 0,
    /* ILLEGAL REQUEST, INVALID FIELD IN CDB (24h/00h) */
    EXTLOCK_SCSI_PR_CHECK_INVALID_FIELD_CDB,
    /* ILLEGAL REQUEST, INVALID FIELD IN PARAMETER LIST (26h/00h) */
    EXTLOCK_SCSI_PR_CHECK_INVALID_FIELD_PARAM,
    /* ILLEGAL REQUEST, PARAMETER LIST LENGTH ERROR (1Ah/00h) */
    EXTLOCK_SCSI_PR_CHECK_PARAM_LIST_LENGTH,
} ExtlockScsiPrCheck;

/* A decoded PERSISTENT RESERVE OUT */
typedef struct ExtlockScsiPrOut {
    uint8_t service_action;
    uint8_t type;               /* the CDB's TYPE */
    uint64_t key;               /* RESERVATION KEY */
    uint64_t sa_key;            /* SERVICE ACTION RESERVATION KEY */
    bool aptpl;
} ExtlockScsiPrOut;

static inline uint64_t extlock_scsi_ld64(const uint8_t *p)
{
    uint64_t v = 0;

    for (int i = 0; i < 8; i++) {
        v = v << 8 | p[i];
    }
    return v;
}

static inline void extlock_scsi_st64(uint8_t *p, uint64_t v)
{
    for (int i = 7; i >= 0; i--) {
        p[i] = v & 0xff;
        v >>= 8;
    }
}

static inline void extlock_scsi_st32(uint8_t *p, uint32_t v)
{
    for (int i = 3; i >= 0; i--) {
        p[i] = v & 0xff;
        v >>= 8;
    }
}

/*
 * PERSISTENT RESERVE IN: is the service action one we answer?  (READ FULL
 * STATUS is not supported.)
 */
static inline ExtlockScsiPrCheck extlock_scsi_pr_in_check(const uint8_t *cdb)
{
    switch (cdb[1] & 0x1f) {
    case EXTLOCK_SCSI_PR_IN_READ_KEYS:
    case EXTLOCK_SCSI_PR_IN_READ_RESERVATION:
    case EXTLOCK_SCSI_PR_IN_REPORT_CAPABILITIES:
        return EXTLOCK_SCSI_PR_CHECK_OK;
    default:
        return EXTLOCK_SCSI_PR_CHECK_INVALID_FIELD_CDB;
    }
}

/*
 * PERSISTENT RESERVE OUT, before its data: the service action, the scope
 * (LU_SCOPE only, where it matters) and the PARAMETER LIST LENGTH
 * (@param_len, from the CDB).  REGISTER AND MOVE and REPLACE LOST
 * RESERVATION are not supported.
 */
static inline ExtlockScsiPrCheck extlock_scsi_pr_out_check(const uint8_t *cdb,
                                                           uint32_t param_len)
{
    uint8_t sa = cdb[1] & 0x1f;
    uint8_t scope = cdb[2] >> 4;

    switch (sa) {
    case EXTLOCK_SCSI_PR_OUT_REGISTER:
    case EXTLOCK_SCSI_PR_OUT_REGISTER_AND_IGNORE:
    case EXTLOCK_SCSI_PR_OUT_CLEAR:
        break;                  /* scope and type are ignored */
    case EXTLOCK_SCSI_PR_OUT_RESERVE:
    case EXTLOCK_SCSI_PR_OUT_RELEASE:
    case EXTLOCK_SCSI_PR_OUT_PREEMPT:
    case EXTLOCK_SCSI_PR_OUT_PREEMPT_AND_ABORT:
        if (scope != 0) {
            return EXTLOCK_SCSI_PR_CHECK_INVALID_FIELD_CDB;
        }
        break;
    default:
        return EXTLOCK_SCSI_PR_CHECK_INVALID_FIELD_CDB;
    }
    if (param_len != EXTLOCK_SCSI_PR_OUT_PARAM_LEN) {
        return EXTLOCK_SCSI_PR_CHECK_PARAM_LIST_LENGTH;
    }
    return EXTLOCK_SCSI_PR_CHECK_OK;
}

/*
 * PERSISTENT RESERVE OUT with its 24-byte parameter list @param, after
 * extlock_scsi_pr_out_check(): fill @out.  SPEC_I_PT and ALL_TG_PT (one
 * target port here) are not supported.
 */
static inline ExtlockScsiPrCheck extlock_scsi_pr_out_decode(
    const uint8_t *cdb, const uint8_t *param, ExtlockScsiPrOut *out)
{
    uint8_t flags = param[20];

    memset(out, 0, sizeof(*out));
    if (flags & 0x0c) {         /* SPEC_I_PT, ALL_TG_PT */
        return EXTLOCK_SCSI_PR_CHECK_INVALID_FIELD_PARAM;
    }
    out->service_action = cdb[1] & 0x1f;
    out->type = cdb[2] & 0x0f;
    out->key = extlock_scsi_ld64(param);
    out->sa_key = extlock_scsi_ld64(param + 8);
    out->aptpl = flags & 0x01;
    return EXTLOCK_SCSI_PR_CHECK_OK;
}

/*
 * READ KEYS parameter data into @buf (@buf_len bytes): the generation, the
 * ADDITIONAL LENGTH of all @total keys (SPC-4: it reports the true length,
 * whatever fits), and the first @n of them, @keys (n <= total), as far as
 * they fit.  Returns the bytes to transfer: at most @alloc_len (the
 * CDB's ALLOCATION LENGTH) and @buf_len.
 */
static inline uint32_t extlock_scsi_pr_read_keys(uint8_t *buf, uint32_t buf_len,
                                                 uint32_t alloc_len,
                                                 uint32_t generation,
                                                 const uint64_t *keys,
                                                 uint32_t n, uint32_t total)
{
    uint64_t full = 8 + 8 * (uint64_t)total;
    uint32_t len;

    if (buf_len < 8) {
        return 0;
    }
    extlock_scsi_st32(buf, generation);
    extlock_scsi_st32(buf + 4, (uint32_t)(8 * (uint64_t)total > UINT32_MAX ?
                                          UINT32_MAX & ~7u : 8 * total));
    for (uint32_t i = 0; i < n && i < total && 16 + 8 * i <= buf_len; i++) {
        extlock_scsi_st64(buf + 8 + 8 * i, keys[i]);
    }
    len = full < buf_len ? (uint32_t)full : buf_len;
    /* only whole keys of what we hold */
    if (len > 8 + 8 * n) {
        len = 8 + 8 * n;
    }
    return len < alloc_len ? len : alloc_len;
}

#endif /* EXTLOCK_SCSI_PR_H */
