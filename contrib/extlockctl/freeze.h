/*
 * extlockctl freeze (freeze.c)
 *
 * Copyright (c) 2026 The extlock authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 */
#ifndef EXTLOCKCTL_FREEZE_H
#define EXTLOCKCTL_FREEZE_H

#include "extlock/client-sync.h"

/* "freeze" and the arguments after it; returns the exit status */
int freeze_main(const char *address, const ExtlockTlsOptions *tls,
                int argc, char **argv);

#endif /* EXTLOCKCTL_FREEZE_H */
