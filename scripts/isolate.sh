#!/bin/bash
# Run a command in private network and mount namespaces: its own loopback
# (so several test runs can each start the NFS server on 127.0.0.1:2049) and
# its own /run (rpcbind's socket) and its own PID namespace (the NFS harness
# refuses to start while it sees another ganesha.nfsd).  A veth pair with a
# link-local address makes getaddrinfo(AI_ADDRCONFIG), which nfs-ganesha uses, work.
#   scripts/isolate.sh COMMAND [ARGS...]
exec unshare --net --mount --pid --mount-proc --fork bash -c 'ip link set lo up; ip link add xl0 type veth peer name xl1; ip addr add 169.254.77.1/32 dev xl0; ip -6 addr add fd77::1/128 dev xl0; ip link set xl0 up; ip link set xl1 up; mount -t tmpfs tmpfs /run; mkdir -p /run/rpcbind /run/lock; exec "$@"' isolate "$@"
