"""Locate and run extlockd, extlockctl and the QEMU binaries for tests.

SPDX-License-Identifier: GPL-2.0-or-later
Copyright (c) 2026 The extlock authors

Binaries come from the build trees:
  EXTLOCK_BUILD       meson build of extlockd/extlockctl  (default <repo>/build)
  EXTLOCK_QEMU_BUILD  QEMU build with the extlock driver (default
                      <repo>/build/qemu-10.0; QEMU 7.2's is <repo>/build/qemu)

Every long-running process started here (extlockd, qemu-storage-daemon,
qemu-system-x86_64, interactive qemu-io) is registered in a ProcessGroup;
the test fixtures stop the whole group at teardown, also when a test
failed.  Standard error of every process goes to a log file in the test's
directory and is available as text for assertions.
"""

import json
import os
import select
import signal
import socket
import subprocess
import time
from pathlib import Path

from .ganesha import terminate_pid
from .qmp import QMPClient

REPO_ROOT = Path(__file__).resolve().parents[3]


class MissingBinary(Exception):
    """A binary the tests need has not been built."""


# ---------------------------------------------------------------------------
# binaries

def build_dir():
    return Path(os.environ.get("EXTLOCK_BUILD", REPO_ROOT / "build"))


def qemu_build_dir():
    return Path(os.environ.get("EXTLOCK_QEMU_BUILD",
                               REPO_ROOT / "build" / "qemu-10.0"))


_BINARIES = {
    "extlockd": (build_dir, ["contrib/extlockd/extlockd", "extlockd"]),
    "extlockctl": (build_dir, ["contrib/extlockctl/extlockctl", "extlockctl"]),
    "extlock-handoff": (build_dir, ["contrib/extlock-bench/extlock-handoff",
                                    "extlock-handoff"]),
    "qemu-img": (qemu_build_dir, ["qemu-img"]),
    "qemu-io": (qemu_build_dir, ["qemu-io"]),
    "qemu-storage-daemon": (qemu_build_dir, ["storage-daemon/qemu-storage-daemon",
                                             "qemu-storage-daemon"]),
    "qemu-system-x86_64": (qemu_build_dir, ["qemu-system-x86_64"]),
}


def binary(name):
    """Absolute path of a built binary; raises MissingBinary if absent."""
    base_fn, candidates = _BINARIES[name]
    base = base_fn()
    for rel in candidates:
        path = base / rel
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    hint = ("meson setup build && ninja -C build" if base_fn is build_dir
            else "scripts/build-qemu.sh (QEMU 10.0; --qemu 7.2 for "
            "build/qemu)")
    raise MissingBinary(f"{name} not found under {base} (looked for "
                        f"{', '.join(candidates)}); build it first: {hint}")


def free_tcp_port():
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_unix_socket(path, proc, timeout, what):
    """Wait until a UNIX socket accepts connections (or proc dies)."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with status {proc.returncode} "
                               f"before listening on {path}")
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(str(path))
            return
        except OSError:
            pass
        finally:
            s.close()
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not listen on {path} within {timeout} s")
        time.sleep(0.02)


def wait_tcp_port(port, proc, timeout, what):
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with status {proc.returncode} "
                               f"before listening on 127.0.0.1:{port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not listen on 127.0.0.1:{port} "
                               f"within {timeout} s")
        time.sleep(0.02)


# ---------------------------------------------------------------------------
# block option helpers

def file_child(path):
    """Blockdev options of a local file."""
    return {"driver": "file", "filename": str(path)}


def nfs_child(nfs_path):
    """Blockdev options of a file on the loopback NFS server (NFSv3 path)."""
    return {"driver": "nfs", "server": {"type": "inet", "host": "127.0.0.1"},
            "path": str(nfs_path)}


def blkdebug_child(child):
    """raw -> blkdebug -> child: blkdebug gets the raw driver's read_aio /
    write_aio events, so qemu-io's break/wait_break/resume can suspend a
    request below an extlock node."""
    return {"driver": "raw", "file": {"driver": "blkdebug", "image": child}}


def unix_coordinator(path):
    return {"type": "unix", "path": str(path)}


def inet_coordinator(port):
    return {"type": "inet", "host": "127.0.0.1", "port": str(port)}


def extlock_node(child, coordinator, lock_space, node_name=None, client_id=None,
                 granularity=None, lease_time=None, lock_cache=None, **extra):
    """Blockdev options of an extlock node (a dict, QMP/JSON style).
    Further options (e.g. on-lease-loss) go in `extra`, with '-' spelled
    '_' (lease_loss_timeout=2000)."""
    opts = {"driver": "extlock", "file": child, "coordinator": coordinator,
            "lock-space": lock_space}
    if node_name is not None:
        opts["node-name"] = node_name
    if client_id is not None:
        opts["client-id"] = client_id
    if granularity is not None:
        opts["granularity"] = granularity
    if lease_time is not None:
        opts["lease-time"] = lease_time
    if lock_cache is not None:
        opts["lock-cache"] = lock_cache
    opts.update({k.replace("_", "-"): v for k, v in extra.items()})
    return opts


def dotted(opts, prefix=""):
    """Flatten nested options into QemuOpts 'a.b=c,...' syntax."""
    parts = []
    for key, value in opts.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            parts.append(dotted(value, name + "."))
            continue
        if isinstance(value, list):     # name.0.x=...,name.1.x=...
            parts.append(dotted({str(i): v for i, v in enumerate(value)},
                                name + "."))
            continue
        if isinstance(value, bool):
            value = "on" if value else "off"
        parts.append(f"{name}={str(value).replace(',', ',,')}")
    return ",".join(p for p in parts if p)


# ---------------------------------------------------------------------------
# process bookkeeping

class ProcessGroup:
    """The long-running processes of one test; stop_all() ends them all."""

    def __init__(self, workdir):
        self.workdir = Path(workdir)
        self.procs = []

    def add(self, proc):
        self.procs.append(proc)
        return proc

    def stop_all(self):
        errors = []
        for proc in reversed(self.procs):
            try:
                proc.stop()
            except Exception as e:          # keep stopping the others
                errors.append(f"{proc!r}: {e}")
        self.procs.clear()
        if errors:
            raise RuntimeError("teardown problems: " + "; ".join(errors))

    def extlockd(self, name="extlockd", **kwargs):
        return self.add(Extlockd(self.workdir / name, **kwargs)).start()

    def storage_daemon(self, name="qsd", **kwargs):
        return self.add(StorageDaemon(self.workdir / name, **kwargs)).start()

    def qemu_io(self, image_opts, name="qemu-io", **kwargs):
        return self.add(QemuIOInteractive(image_opts, self.workdir / f"{name}.stderr",
                                          **kwargs)).start()

    def qemu_system(self, name="vm", **kwargs):
        return self.add(QemuSystem(self.workdir / name, **kwargs)).start()


class _Managed:
    """Common bits: a Popen, its stderr log file, stop/kill."""

    what = "process"
    proc = None
    stderr_path = None
    killed = False          # set by kill(): the test ended it on purpose

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def stderr(self):
        try:
            return Path(self.stderr_path).read_text(errors="replace")
        except (OSError, TypeError):
            return ""

    def stop(self, timeout=10.0):
        """SIGTERM, then SIGKILL after `timeout`; returns the exit status."""
        if self.proc is None:
            return None
        terminate_pid(self.proc.pid, self.proc, timeout=timeout)
        self.proc.wait()
        return self.proc.returncode

    def kill(self):
        """SIGKILL at once (simulates a crash)."""
        self.killed = True
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def __repr__(self):
        pid = self.proc.pid if self.proc else None
        return f"<{self.what} pid={pid}>"


class Extlockd(_Managed):
    """The coordinator daemon, listening on a UNIX socket (and TCP)."""

    what = "extlockd"

    def __init__(self, workdir, tcp=False, lease_ms=None, debug_checks=True,
                 extra_args=(), start_timeout=10.0, tls_creds_dir=None):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.socket_path = self.workdir / "extlockd.sock"
        self.state_file = self.workdir / "extlockd.state"
        self.stderr_path = self.workdir / "extlockd.stderr"
        self.tcp_port = free_tcp_port() if tcp else None
        self.lease_ms = lease_ms
        self.debug_checks = debug_checks
        self.extra_args = list(extra_args)
        self.start_timeout = start_timeout
        # With a credential directory (QEMU's layout: ca-cert.pem,
        # server-cert.pem, server-key.pem, keys.psk) the TCP listener
        # speaks TLS; without, it is plain TCP (--insecure)
        self.tls_creds_dir = tls_creds_dir

    @property
    def address(self):
        """'unix:/path' - the form extlockctl and our protocol client take."""
        return f"unix:{self.socket_path}"

    @property
    def tcp_address(self):
        return f"tcp:127.0.0.1:{self.tcp_port}"

    def coordinator(self, inet=False):
        """The driver's coordinator option (QAPI SocketAddress) for us."""
        if inet:
            return inet_coordinator(self.tcp_port)
        return unix_coordinator(self.socket_path)

    def argv(self):
        argv = [binary("extlockd"), "--listen", f"unix:{self.socket_path}",
                "--state-file", str(self.state_file)]
        if self.tcp_port:
            argv += ["--listen", f"tcp:127.0.0.1:{self.tcp_port}"]
            if self.tls_creds_dir:
                argv += ["--tls-creds-dir", str(self.tls_creds_dir)]
            else:
                # Loopback only: plain TCP must be asked for explicitly
                argv.append("--insecure")
        if self.lease_ms:
            argv += ["--lease-ms", str(self.lease_ms)]
        if self.debug_checks:
            argv.append("--debug-checks")
        return argv + self.extra_args

    def start(self):
        self.killed = False
        self.socket_path.unlink(missing_ok=True)
        with open(self.stderr_path, "ab") as err:
            self.proc = subprocess.Popen(self.argv(), stdin=subprocess.DEVNULL,
                                         stdout=err, stderr=err)
        try:
            wait_unix_socket(self.socket_path, self.proc, self.start_timeout,
                             "extlockd")
            if self.tcp_port:
                wait_tcp_port(self.tcp_port, self.proc, self.start_timeout,
                              "extlockd")
        except RuntimeError as e:
            self.stop()
            raise RuntimeError(f"{e}; stderr:\n{self.stderr()}") from None
        return self

    def restart(self):
        self.stop()
        return self.start()

    def ctl(self, *args, timeout=30.0, tcp=False):
        """Run extlockctl against this daemon; return CompletedProcess."""
        return run_extlockctl(self.tcp_address if tcp else self.address, *args,
                              timeout=timeout)


def run_extlockctl(address, *args, timeout=30.0):
    """extlockctl -c ADDRESS ARGS... (stdout/stderr captured)."""
    argv = [binary("extlockctl"), "-c", address, *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


class StorageDaemon(_Managed):
    """qemu-storage-daemon with a QMP monitor, optionally an NBD server.

    blockdevs: list of blockdev option dicts (passed as JSON --blockdev).
    exports:   list of (export_id, node_name, writable) served over NBD on
               the UNIX socket self.nbd_path (export name = export_id).
    """

    what = "qemu-storage-daemon"

    def __init__(self, workdir, blockdevs=(), exports=(), extra_args=(),
                 start_timeout=20.0, expect_failure=False, objects=()):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.qmp_path = self.workdir / "qmp.sock"
        self.nbd_path = self.workdir / "nbd.sock"
        self.stderr_path = self.workdir / "qsd.stderr"
        self.blockdevs = list(blockdevs)
        self.exports = list(exports)
        self.extra_args = list(extra_args)
        self.objects = list(objects)    # --object, before the blockdevs
        self.start_timeout = start_timeout
        self.expect_failure = expect_failure
        self.qmp = None

    def argv(self):
        argv = [binary("qemu-storage-daemon"),
                "--chardev", f"socket,id=qmp0,path={self.qmp_path},server=on,wait=off",
                "--monitor", "chardev=qmp0"]
        for obj in self.objects:
            argv += ["--object", obj]
        for bd in self.blockdevs:
            argv += ["--blockdev", json.dumps(bd)]
        if self.exports:
            argv += ["--nbd-server", f"addr.type=unix,addr.path={self.nbd_path}"]
        for export_id, node, writable in self.exports:
            argv += ["--export", f"type=nbd,id={export_id},node-name={node},"
                     f"name={export_id},writable={'on' if writable else 'off'}"]
        return argv + self.extra_args

    def start(self):
        for p in (self.qmp_path, self.nbd_path):
            p.unlink(missing_ok=True)
        with open(self.stderr_path, "ab") as err:
            self.proc = subprocess.Popen(self.argv(), stdin=subprocess.DEVNULL,
                                         stdout=err, stderr=err)
        if self.expect_failure:
            return self
        try:
            self.qmp = QMPClient(self.qmp_path, connect_timeout=self.start_timeout)
            self.qmp.connect(alive=self.alive)
            if self.exports:
                wait_unix_socket(self.nbd_path, self.proc, self.start_timeout,
                                 "qemu-storage-daemon NBD server")
        except Exception as e:
            self.stop()
            raise RuntimeError(f"qemu-storage-daemon failed to start: {e}; "
                               f"stderr:\n{self.stderr()}") from None
        return self

    def wait_exit(self, timeout=20.0):
        """For expect_failure: wait for the exit status."""
        return self.proc.wait(timeout)

    def nbd_opts(self, export_id):
        """Blockdev options of an NBD client of one of our exports."""
        return {"driver": "nbd", "export": export_id,
                "server": {"type": "unix", "path": str(self.nbd_path)}}

    def stop(self, timeout=10.0):
        if self.qmp is not None:
            self.qmp.close()
            self.qmp = None
        return super().stop(timeout)


class QemuSystem(_Managed):
    """qemu-system-x86_64 -M none without guest, only a QMP monitor and
    block nodes (HMP qemu-io drives I/O without blocking the monitor)."""

    what = "qemu-system-x86_64"

    def __init__(self, workdir, blockdevs=(), extra_args=(), start_timeout=30.0):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.qmp_path = self.workdir / "qmp.sock"
        self.stderr_path = self.workdir / "qemu.stderr"
        self.blockdevs = list(blockdevs)
        self.extra_args = list(extra_args)
        self.start_timeout = start_timeout
        self.qmp = None

    def argv(self):
        argv = [binary("qemu-system-x86_64"), "-M", "none", "-nodefaults",
                "-display", "none", "-S",
                "-chardev", f"socket,id=qmp0,path={self.qmp_path},server=on,wait=off",
                "-mon", "chardev=qmp0,mode=control"]
        for bd in self.blockdevs:
            argv += ["-blockdev", json.dumps(bd)]
        return argv + self.extra_args

    def start(self):
        self.qmp_path.unlink(missing_ok=True)
        with open(self.stderr_path, "ab") as err:
            self.proc = subprocess.Popen(self.argv(), stdin=subprocess.DEVNULL,
                                         stdout=err, stderr=err)
        try:
            self.qmp = QMPClient(self.qmp_path, connect_timeout=self.start_timeout)
            self.qmp.connect(alive=self.alive)
        except Exception as e:
            self.stop()
            raise RuntimeError(f"qemu-system-x86_64 failed to start: {e}; "
                               f"stderr:\n{self.stderr()}") from None
        return self

    def stop(self, timeout=10.0):
        if self.qmp is not None:
            self.qmp.close()
            self.qmp = None
        return super().stop(timeout)


# ---------------------------------------------------------------------------
# qemu-io and qemu-img

def qemu_io_argv(image_opts, commands=(), extra_args=()):
    """qemu-io --image-opts argv; image_opts is a dict or a dotted string."""
    if isinstance(image_opts, dict):
        image_opts = dotted(image_opts)
    argv = [binary("qemu-io"), *extra_args]
    for c in commands:
        argv += ["-c", c]
    return argv + ["--image-opts", image_opts]


def run_qemu_io(image_opts, commands, timeout=120.0, extra_args=()):
    """Run qemu-io non-interactively; return CompletedProcess (text)."""
    return subprocess.run(qemu_io_argv(image_opts, commands, extra_args),
                          capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def start_qemu_io(image_opts, commands, stdout_path, stderr_path, extra_args=()):
    """Start qemu-io non-interactively in the background (a Popen)."""
    with open(stdout_path, "wb") as out, open(stderr_path, "wb") as err:
        return subprocess.Popen(qemu_io_argv(image_opts, commands, extra_args),
                                stdin=subprocess.DEVNULL, stdout=out, stderr=err)


def run_qemu_img(*args, timeout=120.0):
    return subprocess.run([binary("qemu-img"), *args], capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


class QemuIOError(Exception):
    pass


class QemuIOInteractive(_Managed):
    """qemu-io reading commands from a pipe, one at a time.

    qemu-io prints the prompt "qemu-io> " (and flushes stdout) whenever it
    is ready for the next command, so cmd() writes one line and returns the
    output printed before the next prompt.  Commands must be sent one at a
    time: qemu-io reads stdin with stdio, and lines already buffered there
    would only be seen once more input arrives.  The main loop keeps
    running while qemu-io waits for input, so aio_read/aio_write requests
    progress in the background.
    """

    what = "qemu-io"
    PROMPT = b"qemu-io> "

    def __init__(self, image_opts, stderr_path, extra_args=(), timeout=60.0):
        self.image_opts = image_opts
        self.stderr_path = Path(stderr_path)
        self.extra_args = list(extra_args)
        self.timeout = timeout
        self._buf = b""

    def start(self):
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                qemu_io_argv(self.image_opts, (), self.extra_args),
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err)
        try:
            self._read_prompt(self.timeout)
        except QemuIOError:
            self.stop()
            raise
        return self

    def _read_prompt(self, timeout):
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while self.PROMPT not in self._buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise QemuIOError(f"qemu-io: no prompt within {timeout} s; "
                                  f"output so far: {self._buf!r}")
            ready, _, _ = select.select([fd], [], [], remaining)
            if not ready:
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                self.proc.wait()
                raise QemuIOError(
                    f"qemu-io exited (status {self.proc.returncode}); output: "
                    f"{self._buf.decode(errors='replace')!r}; stderr: {self.stderr()}")
            self._buf += chunk
        out, self._buf = self._buf.split(self.PROMPT, 1)
        return out.decode(errors="replace")

    def cmd(self, line, timeout=None):
        """Send one command; return what qemu-io printed for it."""
        assert "\n" not in line
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()
        return self._read_prompt(timeout or self.timeout)

    def quit(self, timeout=60.0):
        """Send 'quit'; qemu-io drains outstanding requests, then exits."""
        if not self.alive():
            return self.proc.returncode
        self.proc.stdin.write(b"quit\n")
        self.proc.stdin.flush()
        try:
            rest, _ = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            raise QemuIOError("qemu-io did not exit after quit") from None
        self._buf += rest or b""
        return self.proc.returncode

    def stop(self, timeout=10.0):
        if self.proc is not None and self.proc.stdin and not self.proc.stdin.closed:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
        return super().stop(timeout)


def wait_until(predicate, timeout=10.0, interval=0.05, what="condition"):
    """Poll predicate() until it returns a true value; return that value.

    Raises TimeoutError naming `what` (and the last value) after `timeout`.
    """
    deadline = time.monotonic() + timeout
    last = None
    while True:
        last = predicate()
        if last:
            return last
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}"
                               f" (last value: {last!r})")
        time.sleep(interval)
