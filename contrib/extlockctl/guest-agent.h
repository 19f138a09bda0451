/*
 * extlockctl freeze --guest-agent (guest-agent.c)
 *
 * Copyright (c) 2026 The extlock authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 */
#ifndef EXTLOCKCTL_GUEST_AGENT_H
#define EXTLOCKCTL_GUEST_AGENT_H

#include <stdbool.h>
#include <stdint.h>
#include <json-c/json.h>

/*
 * Run @command (with @args, or none if NULL) on the guest agent whose
 * channel is the unix socket @path, within @timeout_ms: its "return"
 * value (a new reference) in @ret, or false and a message in @err.
 */
bool guest_agent_call(const char *path, const char *command,
                      json_object *args, int timeout_ms, json_object **ret,
                      char **err);

/*
 * guest-fsfreeze-freeze, or guest-fsfreeze-freeze-list of @mountpoints
 * (NULL-terminated) if there are any; the number of filesystems frozen
 */
bool guest_agent_freeze(const char *path, char **mountpoints, int timeout_ms,
                        int64_t *frozen, char **err);

/* guest-fsfreeze-thaw; the number of filesystems thawed */
bool guest_agent_thaw(const char *path, int timeout_ms, int64_t *thawed,
                      char **err);

#endif /* EXTLOCKCTL_GUEST_AGENT_H */
