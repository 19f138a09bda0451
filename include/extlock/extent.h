/*
 * extlock: byte extents and lock modes shared by the coordinator and clients
 *
 * Copyright (c) 2026 The extlock authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 */
#ifndef EXTLOCK_EXTENT_H
#define EXTLOCK_EXTENT_H

#include <stdbool.h>
#include <stdint.h>

/* Largest byte address + 1 an extent may reach: offset + length <= 2^63 */
#define EXTLOCK_EXTENT_END_MAX (UINT64_C(1) << 63)

typedef enum ExtlockMode {
    EXTLOCK_MODE_SHARED = 0,
    EXTLOCK_MODE_EXCLUSIVE = 1,
} ExtlockMode;

/* Half-open byte range [start, end) */
typedef struct ExtlockExtent {
    uint64_t start;
    uint64_t end;
} ExtlockExtent;

static inline bool extlock_modes_conflict(ExtlockMode a, ExtlockMode b)
{
    return a == EXTLOCK_MODE_EXCLUSIVE || b == EXTLOCK_MODE_EXCLUSIVE;
}

static inline bool extlock_extents_overlap(ExtlockExtent a, ExtlockExtent b)
{
    return a.start < b.end && b.start < a.end;
}

/*
 * True if offset/length describe a valid, non-empty extent:
 * length >= 1 and offset + length <= 2^63 (no overflow).
 */
static inline bool extlock_extent_valid(uint64_t offset, uint64_t length)
{
    return length >= 1 && offset < EXTLOCK_EXTENT_END_MAX &&
           length <= EXTLOCK_EXTENT_END_MAX - offset;
}

const char *extlock_mode_name(ExtlockMode mode);
/* Returns false if @name is neither "shared" nor "exclusive" */
bool extlock_mode_parse(const char *name, ExtlockMode *mode);

#endif /* EXTLOCK_EXTENT_H */
