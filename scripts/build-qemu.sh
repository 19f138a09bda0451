#!/bin/bash
# Build QEMU with the extlock block driver compiled in, from Debian's source
# package: QEMU 10.0 (trixie's, the default) or QEMU 7.2 (bookworm's).  The
# same driver source serves both (block/extlock-compat.h).
#
#   scripts/build-qemu.sh [--qemu 10.0|7.2] [--qemu-src DIR] [--build-dir DIR]
#                         [--jobs N] [--tools]
#
# --tools builds qemu-img, qemu-io and qemu-storage-daemon only (no
# qemu-system-x86_64), which most tests need.
#
# Steps (each skipped when already done, so reruns are incremental):
#  1. obtain Debian's qemu source package (apt-get source; the deb-src
#     entries and the low pinning are set up by scripts/install-deps.sh) into
#     a cache dir, with its debian/patches applied by dpkg-source;
#     for 10.0 also meson 1.7 and python3-pycotap from bookworm-backports,
#     unpacked (dpkg -x) into a private dir of the cache, so the system's
#     meson 1.0 stays what QEMU 7.2 is configured with;
#  2. copy it to build/qemu-src (7.2) or build/qemu-10.0-src (10.0) unless
#     --qemu-src names an existing tree, apply
#     patches/qemu-<version>-extlock.patch once;
#  3. install our files into the tree (block/ -> block/extlock/, qapi/,
#     include/extlock/, the shared protocol code) - only files whose content
#     changed are rewritten, so ninja rebuilds only what changed;
#  4. configure (x86_64-softmmu, tools, libnfs, ccache) in build/qemu (7.2)
#     or build/qemu-10.0 (10.0) and build qemu-system-x86_64, qemu-img,
#     qemu-io and qemu-storage-daemon.
#
# Environment: EXTLOCK_CACHE (default ~/.cache/extlock) holds the pristine
# sources and the private meson; CCACHE_DIR as usual (one cache for both
# versions).  EXTLOCK_QEMU_DEB_VERSION picks an exact Debian version of the
# chosen series (default: the newest one apt knows).
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
CACHE=${EXTLOCK_CACHE:-$HOME/.cache/extlock}
SRC=""
BUILD=""
JOBS=$(nproc)
QEMU_SERIES=10.0
TOOLS_ONLY=0

while [ $# -gt 0 ]; do
    case "$1" in
        --qemu) QEMU_SERIES=$2; shift 2 ;;
        --qemu-src) SRC=$2; shift 2 ;;
        --build-dir) BUILD=$2; shift 2 ;;
        --jobs) JOBS=$2; shift 2 ;;
        --tools) TOOLS_ONLY=1; shift ;;
        -h|--help) sed -n '2,33p' "$0"; exit 0 ;;
        *) echo "build-qemu.sh: unknown option $1" >&2; exit 2 ;;
    esac
done

log() { echo "build-qemu: $*"; }

# the steps below change directory: make the given paths absolute
[ -n "$SRC" ] && SRC=$(realpath -m "$SRC")
[ -n "$BUILD" ] && BUILD=$(realpath -m "$BUILD")

case "$QEMU_SERIES" in
    7.2)
        # dpkg-source's directory name; the cache layout predates 10.0
        UPSTREAM="7.2+dfsg"
        SRCCACHE=$CACHE/src
        DEFAULT_SRC=$REPO/build/qemu-src
        DEFAULT_BUILD=$REPO/build/qemu
        ;;
    10.0)
        UPSTREAM="10.0.*+ds"
        SRCCACHE=$CACHE/src-10.0
        DEFAULT_SRC=$REPO/build/qemu-10.0-src
        DEFAULT_BUILD=$REPO/build/qemu-10.0
        ;;
    *) echo "build-qemu.sh: --qemu must be 7.2 or 10.0" >&2; exit 2 ;;
esac
BUILD=${BUILD:-$DEFAULT_BUILD}

# Newest Debian version of the series among the deb-src entries apt knows
# (trixie and bookworm both list qemu; apt-get source without a version
# would take the newest of all)
deb_version() {
    apt-cache showsrc qemu 2>/dev/null |
        sed -n "s/^Version: \(1:$QEMU_SERIES[.+].*\)/\1/p" |
        sort -V | tail -n 1
}

# ccache: relative paths, so a fresh clone elsewhere still hits the cache
export CCACHE_BASEDIR=$REPO
export CCACHE_NOHASHDIR=true

# --- 1. pristine source from Debian ------------------------------------------
pristine=""
for d in "$SRCCACHE"/qemu-$UPSTREAM; do
    [ -f "$d/.extlock-pristine" ] && pristine=$d
done
if [ -z "$SRC" ] && [ -z "$pristine" ]; then
    command -v dpkg-source >/dev/null || { echo "dpkg-dev missing: run scripts/install-deps.sh" >&2; exit 1; }
    ver=${EXTLOCK_QEMU_DEB_VERSION:-$(deb_version)}
    [ -n "$ver" ] || { echo "no qemu $QEMU_SERIES source package known to apt: run scripts/install-deps.sh" >&2; exit 1; }
    log "fetching Debian's qemu $ver source package into $SRCCACHE"
    rm -rf "$SRCCACHE"; mkdir -p "$SRCCACHE"
    (cd "$SRCCACHE" && apt-get source -q "qemu=$ver")
    for d in "$SRCCACHE"/qemu-$UPSTREAM; do
        [ -f "$d/debian/patches/series" ] && pristine=$d
    done
    [ -n "$pristine" ] || { echo "unexpected source layout in $SRCCACHE" >&2; exit 1; }
    # dpkg-source applies debian/patches (quilt format 3.0) on extraction
    [ -d "$pristine/.pc" ] || { echo "debian/patches were not applied" >&2; exit 1; }
    touch "$pristine/.extlock-pristine"
fi

# QEMU 10 needs meson >= 1.5 and pycotap; bookworm has meson 1.0.  Unpack
# bookworm-backports' packages privately (never installed system-wide).
TOOLS=""
if [ "$QEMU_SERIES" = 10.0 ]; then
    TOOLS=$CACHE/tools-10.0
    if [ ! -f "$TOOLS/.extlock-tools" ]; then
        log "unpacking meson and python3-pycotap from bookworm-backports into $TOOLS"
        rm -rf "$TOOLS"; mkdir -p "$TOOLS/debs"
        (cd "$TOOLS/debs" &&
         apt-get download -q "meson/bookworm-backports" "python3-pycotap/bookworm-backports")
        for deb in "$TOOLS"/debs/*.deb; do
            dpkg -x "$deb" "$TOOLS/root"
        done
        touch "$TOOLS/.extlock-tools"
    fi
    export PATH=$TOOLS/root/usr/bin:$PATH
    export PYTHONPATH=$TOOLS/root/usr/lib/python3/dist-packages${PYTHONPATH:+:$PYTHONPATH}
fi

# --- 2. working tree + our patch ------------------------------------------------
if [ -z "$SRC" ]; then
    SRC=$DEFAULT_SRC
    if [ ! -f "$SRC/.extlock-copied" ]; then
        log "copying source to $SRC"
        rm -rf "$SRC"; mkdir -p "$(dirname "$SRC")"
        cp -a "$pristine" "$SRC"
        rm -f "$SRC/.extlock-pristine"
        touch "$SRC/.extlock-copied"
    fi
fi
[ -f "$SRC/VERSION" ] || { echo "$SRC is not a QEMU source tree" >&2; exit 1; }

PATCH=$REPO/patches/qemu-$QEMU_SERIES-extlock.patch
stamp=$SRC/.extlock-patch.sha256
want=$(sha256sum "$PATCH" | cut -d' ' -f1)
if [ ! -f "$stamp" ]; then
    log "applying $(basename "$PATCH")"
    patch -d "$SRC" -p1 --forward --no-backup-if-mismatch < "$PATCH"
    echo "$want" > "$stamp"
elif [ "$(cat "$stamp")" != "$want" ]; then
    log "patch changed: reverting the old one and applying the new one"
    patch -d "$SRC" -p1 -R --no-backup-if-mismatch < "$SRC/.extlock-applied.patch"
    patch -d "$SRC" -p1 --forward --no-backup-if-mismatch < "$PATCH"
    echo "$want" > "$stamp"
fi
cp "$PATCH" "$SRC/.extlock-applied.patch"

# --- 3. our files ---------------------------------------------------------------
install_file() { # src dst: rewrite only when the content differs
    mkdir -p "$(dirname "$2")"
    cmp -s "$1" "$2" || cp "$1" "$2"
}
for f in "$REPO"/block/*; do
    install_file "$f" "$SRC/block/extlock/$(basename "$f")"
done
# files since removed or renamed in block/ must not linger in the tree
for f in "$SRC"/block/extlock/*; do
    case "$(basename "$f")" in
        extent.c|interval-tree.c|protocol.c|reservation.c) ;;
        *) [ -e "$REPO/block/$(basename "$f")" ] || rm -f "$f" ;;
    esac
done
install_file "$REPO/util/extent.c" "$SRC/block/extlock/extent.c"
install_file "$REPO/util/interval-tree.c" "$SRC/block/extlock/interval-tree.c"
install_file "$REPO/util/extlock-protocol.c" "$SRC/block/extlock/protocol.c"
install_file "$REPO/util/extlock-reservation.c" "$SRC/block/extlock/reservation.c"
# persistent reservations of scsi-hd (built by the patch's hw/scsi hunk)
install_file "$REPO/hw/scsi/scsi-disk-pr.c" "$SRC/hw/scsi/scsi-disk-pr.c"
install_file "$REPO/hw/scsi/scsi-disk-pr.h" "$SRC/include/hw/scsi/scsi-disk-pr.h"
for f in "$REPO"/include/extlock/*.h; do
    install_file "$f" "$SRC/include/extlock/$(basename "$f")"
done
for f in "$REPO"/qapi/*.json; do
    install_file "$f" "$SRC/qapi/$(basename "$f")"
done

# --- 4. configure and build -----------------------------------------------------
if [ ! -f "$BUILD/build.ninja" ]; then
    log "configuring in $BUILD"
    mkdir -p "$BUILD"
    cc="cc"
    command -v ccache >/dev/null && cc="ccache cc"
    # 10.0: Debian's interpreter, for which the private meson is unpacked
    # (7.2's configure takes --python only with its embedded meson)
    pyopt=()
    [ "$QEMU_SERIES" = 10.0 ] && pyopt=(--python=/usr/bin/python3)
    # 10.0 makes vmdk a feature that --without-default-features turns
    # off; Debian's QEMU has it, and the tests check that it is refused
    # below extlock
    [ "$QEMU_SERIES" = 10.0 ] && pyopt+=(--enable-vmdk)
    (cd "$BUILD" && "$SRC/configure" \
        --cc="$cc" ${pyopt[@]+"${pyopt[@]}"} \
        --target-list=x86_64-softmmu \
        --enable-tools --enable-libnfs --enable-kvm --enable-tcg \
        --enable-slirp --enable-fdt=system \
        --disable-docs --disable-user --disable-werror --disable-install-blobs \
        --without-default-features --enable-gnutls --enable-extlock \
        --enable-trace-backends=log)
fi
# 10.0: the build's pyvenv finds the private meson also when ninja
# re-runs meson by itself (outside this script, without PYTHONPATH)
if [ -n "$TOOLS" ]; then
    for site in "$BUILD"/pyvenv/lib/python3*/site-packages; do
        [ -d "$site" ] &&
            echo "$TOOLS/root/usr/lib/python3/dist-packages" > "$site/extlock-meson.pth"
    done
fi
# The extlock driver's tls-creds needs QEMU's TLS code (GnuTLS); trees
# configured before that was added are switched over once
if ! grep -qE '^#define CONFIG_GNUTLS( |$)' "$BUILD/config-host.h" 2>/dev/null; then
    log "enabling gnutls in $BUILD"
    (cd "$BUILD" && meson configure -Dgnutls=enabled)
fi
# The driver is a configure option (-Dextlock, on when json-c is found);
# --without-default-features turns it off, so ask for it (also in trees
# configured before the option existed)
if ! grep -qE '^#define CONFIG_EXTLOCK( |$)' "$BUILD/config-host.h" 2>/dev/null; then
    log "enabling extlock in $BUILD"
    (cd "$BUILD" && meson configure -Dextlock=enabled)
fi
# vmdk in 10.0 trees configured before it was asked for (see above)
if [ "$QEMU_SERIES" = 10.0 ] && [ ! -f "$BUILD/.extlock-vmdk" ]; then
    if ! /usr/bin/python3 - "$BUILD/meson-info/intro-buildoptions.json" <<'PY'
import json, sys
opts = {o["name"]: o["value"] for o in json.load(open(sys.argv[1]))}
sys.exit(0 if opts.get("vmdk") == "enabled" else 1)
PY
    then
        log "enabling vmdk in $BUILD"
        (cd "$BUILD" && meson configure -Dvmdk=enabled)
    fi
    touch "$BUILD/.extlock-vmdk"
fi
log "building"
targets=(qemu-img qemu-io storage-daemon/qemu-storage-daemon)
[ "$TOOLS_ONLY" = 1 ] || targets+=(qemu-system-x86_64)
ninja -C "$BUILD" -j "$JOBS" ${NINJA_ARGS:-} "${targets[@]}"
log "done: $BUILD/{qemu-img,qemu-io,storage-daemon/qemu-storage-daemon,qemu-system-x86_64}"
