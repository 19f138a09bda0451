/*
 * extlock: lock mode names
 *
 * Copyright (c) 2026 The extlock authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 */
#ifdef EXTLOCK_IN_QEMU
#include "qemu/osdep.h"   /* first, as every QEMU file (block/meson.build) */
#endif
#include <string.h>
#include "extlock/extent.h"

const char *extlock_mode_name(ExtlockMode mode)
{
    switch (mode) {
    case EXTLOCK_MODE_SHARED:
        return "shared";
    case EXTLOCK_MODE_EXCLUSIVE:
        return "exclusive";
    }
    return "invalid";
}

bool extlock_mode_parse(const char *name, ExtlockMode *mode)
{
    if (!name) {
        return false;
    }
    if (strcmp(name, "shared") == 0) {
        *mode = EXTLOCK_MODE_SHARED;
        return true;
    }
    if (strcmp(name, "exclusive") == 0) {
        *mode = EXTLOCK_MODE_EXCLUSIVE;
        return true;
    }
    return false;
}
