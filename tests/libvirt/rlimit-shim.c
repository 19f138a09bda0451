/*
 * LD_PRELOAD shim for the sanlock daemon in tests/libvirt only.
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 * Copyright (c) 2026 The extlock authors
 *
 * sanlock's daemon raises RLIMIT_MEMLOCK and RLIMIT_RTPRIO to unlimited at
 * start and exits if it cannot.  Raising a hard limit needs CAP_SYS_RESOURCE, which the
 * machines this project is tested on drop from every process's bounding
 * set, so root cannot get it (a user namespace does not help: rlimits are
 * checked against the initial namespace).  This shim turns these two
 * refusals (setrlimit of RLIMIT_MEMLOCK or RLIMIT_RTPRIO failing with
 * EPERM) into success and leaves every other call alone; the daemon runs
 * with -l 0 (no mlockall) and -h 0 (no real-time scheduling), so it never
 * uses either limit.  See docs/libvirt.rst.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <sys/resource.h>

typedef int (*setrlimit_fn)(__rlimit_resource_t, const struct rlimit *);

int setrlimit(__rlimit_resource_t resource, const struct rlimit *rlim)
{
    setrlimit_fn real = (setrlimit_fn)dlsym(RTLD_NEXT, "setrlimit");
    int ret = real(resource, rlim);

    if (ret < 0 && errno == EPERM &&
        (resource == RLIMIT_MEMLOCK || resource == RLIMIT_RTPRIO)) {
        return 0;
    }
    return ret;
}
