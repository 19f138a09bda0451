#!/bin/bash
# Install everything extlock needs on Debian 12 (bookworm): build tools,
# libraries, the NFS test server and QEMU's build dependencies, and enable
# deb-src so that Debian's qemu source package can be fetched.
# Idempotent: packages already present are not reinstalled.
set -euo pipefail

PKGS=(
    # extlock itself
    build-essential meson ninja-build pkg-config ccache
    libglib2.0-dev libjson-c-dev libcmocka-dev libnfs-dev
    # TLS for extlockd and its tools; certtool for the security tests
    libgnutls28-dev gnutls-bin
    # extlockd --metrics-listen (optional), and promtool/prometheus for
    # tests/monitoring
    libmicrohttpd-dev prometheus
    # extlockctl freeze --guest-agent: a real qemu-ga for tests/monitoring
    qemu-guest-agent
    # QEMU 7.2 build dependencies (x86_64-softmmu + tools + libnfs)
    dpkg-dev libpixman-1-dev libslirp-dev flex bison libfdt-dev zlib1g-dev
    python3 python3-venv python3-pytest python3-pytest-timeout
    # runtime: firmware for qemu-system, NFS server, tools used by tests
    seabios qemu-system-data ipxe-qemu
    nfs-ganesha nfs-ganesha-vfs rpcbind libnfs-utils
    iproute2 procps psmisc socat
    # ASan/UBSan test build and libFuzzer harnesses (tests/fuzz)
    clang libfuzzer-14-dev
    # HA coordinator (docs/design.rst "High availability"): etcd v3 through
    # its HTTP/JSON gateway with libcurl; etcd itself for tests/ha
    libcurl4-gnutls-dev etcd-server etcd-client
    # extlock-virt and the libvirt tests (tests/libvirt): libvirtd with the
    # QEMU driver and virtlockd, virsh; not libvirt-daemon-system, which
    # would pull in systemd and start services (the tests start their own)
    libxml2-dev libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients
)

SRC=/etc/apt/sources.list.d/extlock-deb-src.sources
if ! grep -rqs '^Types:.*deb-src' /etc/apt/sources.list.d/ /etc/apt/sources.list 2>/dev/null &&
   ! grep -qs '^deb-src ' /etc/apt/sources.list 2>/dev/null; then
    cat > "$SRC" <<'EOT'
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb-src
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOT
    NEED_UPDATE=1
fi

# QEMU 10.0 (scripts/build-qemu.sh --qemu 10.0): trixie's qemu source
# package through a deb-src-only entry (no binary package can come from
# trixie), and bookworm-backports for meson 1.7 and python3-pycotap, which
# build-qemu.sh only downloads and unpacks into a private directory
# (`apt-get download` + `dpkg -x`), so the system meson 1.0 used for QEMU 7.2
# stays.  Both suites are pinned low so that nothing installed on the
# machine is ever upgraded from them.
SRC10=/etc/apt/sources.list.d/extlock-qemu10.sources
PIN10=/etc/apt/preferences.d/extlock-qemu10.pref
if [ ! -f "$SRC10" ]; then
    cat > "$SRC10" <<'EOT'
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: trixie
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOT
    NEED_UPDATE=1
fi
if [ ! -f "$PIN10" ]; then
    cat > "$PIN10" <<'EOT'
# extlock: never upgrade anything from these suites; build-qemu.sh fetches
# exact versions from them explicitly
Package: *
Pin: release n=trixie
Pin-Priority: 1

Package: *
Pin: release n=bookworm-backports
Pin-Priority: 1
EOT
fi

missing=()
for p in "${PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ -n "${NEED_UPDATE:-}" ] || [ ${#missing[@]} -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
fi
if [ ${#missing[@]} -gt 0 ]; then
    echo "install-deps: installing ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -q --no-install-recommends "${missing[@]}"
fi

# libvirt 9.0 resolves its default QEMU user before reading qemu.conf;
# libvirt-daemon-system would create it, we do not install that
if ! getent passwd libvirt-qemu >/dev/null; then
    useradd --system --user-group --no-create-home --home-dir /var/lib/libvirt \
        --shell /usr/sbin/nologin libvirt-qemu
fi
