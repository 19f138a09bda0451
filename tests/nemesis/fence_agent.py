#!/usr/bin/python3
"""A fence agent for the nemesis NFS fault points (fence-agents stdin format).

SPDX-License-Identifier: GPL-2.0-or-later
Copyright (c) 2026 The extlock authors

A stand-in for contrib/fence-agents/fence_extlock_cut (same contract, used
when that is not in the tree): extlockd --fence-agent=tests/nemesis/
fence_agent.py --fence-arg=ctl-dir=DIR runs it with
"action=off\nplug=<client-id>\nctl-dir=DIR\n" on stdin.  It
connects to DIR/<plug>.ctl (served by nfs_relay.NfsFaultPoint), writes the
action, reads one line and exits 0 when the port is in the requested state
(off/on: "ok"; status: "on"/"off" - exit 0 for on, 2 for off, as the
fence-agents convention has it), 1 on any error.
"""

import socket
import sys


def main():
    args = {}
    for line in sys.stdin.read().splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        k, v = line.split("=", 1)
        args[k.strip()] = v.strip()
    action = args.get("action", args.get("option", ""))
    plug = args.get("plug", args.get("port", ""))
    ctl_dir = args.get("ctl-dir", args.get("ctl_dir", ""))
    if action not in ("off", "on", "status", "monitor") or not plug or not ctl_dir:
        print(f"fence_agent: need action=off|on|status, plug=, ctl-dir= "
              f"(got {args})", file=sys.stderr)
        return 1
    if action == "monitor":
        return 0
    if "/" in plug:
        print(f"fence_agent: bad plug {plug!r}", file=sys.stderr)
        return 1
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(10)
            s.connect(f"{ctl_dir}/{plug}.ctl")
            s.sendall(action.encode() + b"\n")
            reply = b""
            while not reply.endswith(b"\n"):
                chunk = s.recv(256)
                if not chunk:
                    break
                reply += chunk
    except OSError as e:
        print(f"fence_agent: {plug}: {e}", file=sys.stderr)
        return 1
    reply = reply.decode(errors="replace").strip()
    if action == "status":
        return {"on": 0, "off": 2}.get(reply, 1)
    if reply == "ok":
        return 0
    print(f"fence_agent: {plug}: {reply or 'no reply'}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
