"""A private libvirtd for extlock's libvirt tests.

SPDX-License-Identifier: GPL-2.0-or-later
Copyright (c) 2026 The extlock authors

Debian's libvirt 9.0 (packages libvirt-daemon, libvirt-daemon-driver-qemu,
libvirt-clients, installed by scripts/install-deps.sh) runs in system mode
as root, but in a mount namespace of its own: /etc/libvirt, /run/libvirt,
/var/lib/libvirt, /var/cache/libvirt and /var/log/libvirt are bind mounts
of directories under the test's work directory.  So the test writes its
own libvirtd.conf and qemu.conf, and nothing of it stays on the machine
(no domain, no capability cache, no lock).  virsh reaches the daemon
through the socket in the work directory (qemu:///system?socket=...).

With lock_manager="lockd", virtlockd runs in the same namespace.

EXTLOCK_LIBVIRT_PREFIX=DIR runs another libvirt than the machine's, one
unpacked (dpkg -x) into DIR by tests/libvirt/fetch-libvirt.sh, e.g. 11.3
from bookworm-backports: in libvirtd's mount namespace DIR's libvirtd,
virtlockd, libvirt*.so.0, driver and lock modules (/usr/lib/<triplet>/libvirt),
helpers (/usr/lib/libvirt) and data (/usr/share/libvirt) are bind-mounted
over the machine's, so the paths compiled into that libvirt find its own
files; virsh is DIR's, with LD_LIBRARY_PATH.  Nothing outside the
namespace changes: the machine keeps its libvirt.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path


class LibvirtError(Exception):
    pass


LIBVIRTD = "/usr/sbin/libvirtd"
VIRTLOCKD = "/usr/sbin/virtlockd"
VIRSH = "/usr/bin/virsh"
LIBDIR = "/usr/lib/x86_64-linux-gnu"

# another libvirt in a private prefix (tests/libvirt/fetch-libvirt.sh)
PREFIX = os.environ.get("EXTLOCK_LIBVIRT_PREFIX") or None
if PREFIX:
    PREFIX = str(Path(PREFIX).resolve())


def prefix_env(prefix=PREFIX):
    """The environment for a program of prefix run outside the namespace."""
    env = dict(os.environ)
    if prefix:
        env["LD_LIBRARY_PATH"] = prefix + LIBDIR
    return env


def virsh_binary(prefix=PREFIX):
    return prefix + VIRSH if prefix else VIRSH


def prefix_mounts(prefix=PREFIX):
    """Shell commands that put prefix's libvirt over the machine's."""
    if not prefix:
        return []
    cmds = []
    for rel in (LIBDIR + "/libvirt", "/usr/lib/libvirt", "/usr/share/libvirt",
                LIBVIRTD, VIRTLOCKD):
        src = prefix + rel
        if not os.path.exists(src):
            raise LibvirtError(f"{src} missing: is {prefix} a libvirt prefix "
                               "made by tests/libvirt/fetch-libvirt.sh?")
        if os.path.isdir(src):
            cmds.append(f"mkdir -p {rel}")
        cmds.append(f"mount --bind {src} {rel}")
    # the libraries: a bind mount onto the system's symlink lands on the
    # file it points to, which is what the dynamic loader opens
    for lib in ("libvirt.so.0", "libvirt-qemu.so.0", "libvirt-lxc.so.0",
                "libvirt-admin.so.0"):
        src, dst = prefix + LIBDIR + "/" + lib, LIBDIR + "/" + lib
        if os.path.exists(src) and os.path.exists(dst):
            cmds.append(f"mount --bind {os.path.realpath(src)} {dst}")
    return cmds

# the directories libvirtd uses in system mode, and where they go
PRIVATE_DIRS = {
    "etc": "/etc/libvirt",
    "run": "/run/libvirt",
    "lib": "/var/lib/libvirt",
    "cache": "/var/cache/libvirt",
    "log": "/var/log/libvirt",
}

LIBVIRTD_CONF = """\
# written by tests/libvirt: root only, no polkit
unix_sock_group = "root"
unix_sock_ro_perms = "0700"
unix_sock_rw_perms = "0700"
auth_unix_ro = "none"
auth_unix_rw = "none"
log_outputs = "3:file:/var/log/libvirt/libvirtd.log"
"""

# What an operator sets for the patched QEMU (docs/libvirt.rst): QEMU runs
# as root here because the test's files (kernel, consoles, extlockd's
# socket) are root's; dynamic_ownership off so libvirt does not chown the
# shared image; no security driver (no AppArmor/SELinux on this kernel);
# stdio to files (no virtlogd).
QEMU_CONF = """\
user = "root"
group = "root"
dynamic_ownership = 0
security_driver = "none"
stdio_handler = "file"
lock_manager = "{lock_manager}"
"""

QEMU_LOCKD_CONF = """\
auto_disk_leases = 1
require_lease_for_disks = 1
"""

# lock_manager="sanlock": libvirt's sanlock plugin (not in libvirt-daemon:
# Debian's libvirt-sanlock for 9.0, libvirt-daemon-plugin-sanlock for 11.x,
# unpacked into EXTLOCK_LIBVIRT_PREFIX by fetch-libvirt.sh --sanlock) and
# the sanlock daemon (package sanlock, same prefix).  One host (host_id 1);
# io_timeout 2 s so that joining the lockspace (a delta lease: a few
# io_timeouts) does not take the default 20-60 s.
QEMU_SANLOCK_CONF = """\
auto_disk_leases = 1
disk_lease_dir = "/var/lib/libvirt/sanlock"
host_id = 1
require_lease_for_disks = 1
io_timeout = 2
user = "root"
group = "root"
"""
SANLOCK = "/usr/sbin/sanlock"


# libvirtd daemonizes QEMU (double fork): QEMU's parent becomes the
# nearest "child subreaper" or PID 1.  Inside scripts/isolate.sh PID 1 is
# the test itself, which never reaps strangers, and libvirt waits for a
# zombie QEMU to vanish on destroy (in vain, for 30 s and then fails).  So
# libvirtd runs below this small reaper: it marks itself a subreaper,
# runs the command and reaps every child until none is left; SIGTERM goes
# to the command (the process group), not to the reaper.
REAPER = """
import ctypes, os, signal, sys
ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
signal.signal(signal.SIGTERM, signal.SIG_IGN)
pid = os.fork()
if pid == 0:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.execvp(sys.argv[1], sys.argv[1:])
status = 1
while True:
    try:
        p, st = os.wait()
    except ChildProcessError:
        break
    if p == pid:
        status = os.waitstatus_to_exitcode(st)
sys.exit(status)
"""


def sanlock_prefix():
    """A libvirt prefix with the sanlock plugin and daemon.

    EXTLOCK_LIBVIRT_PREFIX if it has them, else the machine's libvirt
    version unpacked with its sanlock plugin by fetch-libvirt.sh
    --machine-sanlock into ${EXTLOCK_CACHE:-~/.cache/extlock}/
    libvirt-VERSION-sanlock (fetched from the Debian archive once; the
    machine's packages stay as they are)."""
    plugin = LIBDIR + "/libvirt/lock-driver/sanlock.so"
    if PREFIX:
        if os.path.exists(PREFIX + plugin) and os.path.exists(PREFIX + SANLOCK):
            return PREFIX
        raise LibvirtError(f"{PREFIX} has no sanlock plugin or daemon: "
                           "tests/libvirt/fetch-libvirt.sh --sanlock PREFIX")
    script = Path(__file__).resolve().parent / "fetch-libvirt.sh"
    res = subprocess.run(["bash", str(script), "--machine-sanlock"],
                         capture_output=True, text=True,
                         stdin=subprocess.DEVNULL, timeout=600)
    if res.returncode != 0:
        raise LibvirtError(
            f"{script} --machine-sanlock failed (it needs the Debian archive: "
            f"run it before scripts/isolate.sh): {res.stderr.strip()}")
    prefix = res.stdout.split(": ", 1)[1].split(" (")[0].strip()
    return str(prefix)


class Libvirtd:
    def __init__(self, workdir, lock_manager="lockd", host_uuid=None,
                 prefix=PREFIX):
        self.root = Path(workdir).resolve()
        # a libvirt unpacked by fetch-libvirt.sh, or None: the machine's
        self.prefix = str(Path(prefix).resolve()) if prefix else None
        self.lock_manager = lock_manager
        # two libvirtds on one machine migrate between each other only
        # with different host UUIDs (libvirt refuses "the same host")
        self.host_uuid = host_uuid
        self.proc = None
        self.log_path = self.root / "libvirtd.out"

    @property
    def socket(self):
        return self.root / "run" / "libvirt-sock"

    @property
    def uri(self):
        return f"qemu:///system?socket={self.socket}"

    def path(self, system_path):
        """Where a libvirt system path lies in the work directory."""
        for key, target in PRIVATE_DIRS.items():
            if system_path == target or system_path.startswith(target + "/"):
                return self.root / key / system_path[len(target) + 1:]
        raise ValueError(system_path)

    def start(self, timeout=60.0):
        for key in PRIVATE_DIRS:
            (self.root / key).mkdir(parents=True, exist_ok=True)
        etc = self.root / "etc"
        conf = LIBVIRTD_CONF
        if self.host_uuid:
            conf += f'host_uuid = "{self.host_uuid}"\n'
        (etc / "libvirtd.conf").write_text(conf)
        (etc / "qemu.conf").write_text(
            QEMU_CONF.format(lock_manager=self.lock_manager))
        (etc / "qemu-lockd.conf").write_text(QEMU_LOCKD_CONF)
        (etc / "qemu-sanlock.conf").write_text(QEMU_SANLOCK_CONF)
        (self.root / "lib" / "sanlock").mkdir(exist_ok=True)
        mounts = " && ".join(prefix_mounts(self.prefix) + [
            f"mkdir -p {target} && mount --bind {self.root / key} {target}"
            for key, target in PRIVATE_DIRS.items()])
        if self.prefix:
            # the sanlock plugin's client library is not on the machine
            mounts = f"export LD_LIBRARY_PATH={self.prefix + LIBDIR} && {mounts}"
        # both stay in this process group (no --daemon), so stop() ends them
        daemons = f"exec {LIBVIRTD} --pid-file /run/libvirt/libvirtd.pid"
        if self.lock_manager == "lockd":
            daemons = (f"{VIRTLOCKD} --pid-file /run/libvirt/virtlockd.pid & "
                       f"{daemons}")
        elif self.lock_manager == "sanlock":
            sanlock = (self.prefix or "") + SANLOCK
            if not os.access(sanlock, os.X_OK):
                raise LibvirtError(f"{sanlock} missing: tests/libvirt/"
                                   "fetch-libvirt.sh --sanlock PREFIX")
            # no watchdog (wdmd, /dev/watchdog): a test host, not a cluster
            # node that must reset itself when its leases lapse; no
            # mlockall, and the shim for its RLIMIT_MEMLOCK (rlimit-shim.c)
            shim = self.build_rlimit_shim()
            # libvirtd joins its lockspace at start: wait (bounded) for
            # the daemon's socket first
            daemons = (f"mkdir -p /run/sanlock && LD_PRELOAD={shim} {sanlock} "
                       f"daemon -D -w 0 -l 0 -h 0 -U root -G root & "
                       f"for i in $(seq 200); do "
                       f"[ -S /run/sanlock/sanlock.sock ] && break; "
                       f"sleep 0.05; done; {daemons}")
        script = f"set -e; {mounts}; {daemons}"
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", REAPER, "unshare", "--mount",
                 "--propagation", "private", "bash", "-c", script],
                stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise LibvirtError(f"libvirtd exited with {self.proc.returncode}: "
                                   f"{self.log()}")
            if self.socket.exists():
                res = self.virsh("uri", check=False, timeout=10)
                if res.returncode == 0:
                    return self
            if time.monotonic() > deadline:
                self.stop()
                raise LibvirtError(f"libvirtd did not answer within {timeout} s:"
                                   f" {self.log()}")
            time.sleep(0.2)

    def build_rlimit_shim(self):
        out = self.root / "rlimit-shim.so"
        src = Path(__file__).resolve().parent / "rlimit-shim.c"
        res = subprocess.run(["cc", "-shared", "-fPIC", "-O2", "-Wall", "-o",
                              str(out), str(src), "-ldl"],
                             capture_output=True, text=True,
                             stdin=subprocess.DEVNULL)
        if res.returncode != 0:
            raise LibvirtError(f"building {src}: {res.stderr}")
        return out

    def log(self):
        text = ""
        for p in (self.log_path, self.root / "log" / "libvirtd.log"):
            try:
                text += p.read_text(errors="replace")[-3000:]
            except OSError:
                pass
        return text

    def virsh(self, *args, check=True, timeout=120):
        res = subprocess.run([virsh_binary(self.prefix), "-q", "-c", self.uri,
                              *args], capture_output=True, text=True,
                             timeout=timeout, stdin=subprocess.DEVNULL,
                             env=prefix_env(self.prefix))
        if check and res.returncode != 0:
            raise LibvirtError(f"virsh {' '.join(args)}: {res.stderr.strip()}")
        return res

    def virsh_popen(self, *args):
        return subprocess.Popen([virsh_binary(self.prefix), "-q", "-c",
                                 self.uri, *args],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                stdin=subprocess.DEVNULL, text=True,
                                env=prefix_env(self.prefix))

    def version(self):
        """The version of the libvirtd that runs ("9.0.0")."""
        if getattr(self, "_version", None):
            return self._version
        self._version = self._binary_version()
        return self._version

    def _binary_version(self):
        # `virsh version` wants a default emulator, which this machine
        # lacks (the domains name the patched QEMU in <emulator>)
        res = subprocess.run([(self.prefix or "") + LIBVIRTD, "--version"],
                             capture_output=True, text=True,
                             env=prefix_env(self.prefix),
                             stdin=subprocess.DEVNULL, timeout=30)
        if res.returncode != 0:
            raise LibvirtError(f"libvirtd --version: {res.stderr.strip()}")
        return res.stdout.split()[-1]

    def domains(self):
        res = self.virsh("list", "--all", "--name", check=False)
        return [n.strip() for n in res.stdout.splitlines() if n.strip()]

    def state(self, name):
        return self.virsh("domstate", name).stdout.strip()

    def qemu_pid(self, name):
        return int(self.path(f"/run/libvirt/qemu/{name}.pid").read_text())

    def cleanup_domains(self):
        for name in self.domains():
            t0 = time.monotonic()
            self.virsh("destroy", name, check=False)
            self.virsh("undefine", "--managed-save", name, check=False)
            print(f"libvirt_harness: {name} destroyed and undefined in "
                  f"{time.monotonic() - t0:.1f} s", flush=True)

    def stop(self):
        if self.proc is None:
            return
        try:
            self.cleanup_domains()
        except Exception:
            pass
        if self.lock_manager == "sanlock":
            # sanlock ignores SIGTERM while it holds a lockspace
            subprocess.run([(self.prefix or "") + SANLOCK, "client", "shutdown",
                            "-f", "1"], capture_output=True,
                           env=prefix_env(self.prefix),
                           stdin=subprocess.DEVNULL, timeout=30)
        # libvirtd and virtlockd are the session started above
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        t0 = time.monotonic()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        print(f"libvirt_harness: libvirtd stopped in {time.monotonic() - t0:.1f} s",
              flush=True)
        self.proc = None
