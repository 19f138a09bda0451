#!/bin/bash
# Build QEMU 7.2 (Debian bookworm's source package) with the extlock block
# driver compiled in.
#
#   scripts/build-qemu.sh [--qemu-src DIR] [--build-dir DIR] [--jobs N]
#
# Steps (each skipped when already done, so reruns are incremental):
#  1. obtain Debian's qemu source package (apt-get source qemu; enables a
#     bookworm deb-src entry via scripts/install-deps.sh) into a cache dir,
#     with its debian/patches applied by dpkg-source;
#  2. copy it to build/qemu-src (unless --qemu-src names an existing tree),
#     apply patches/qemu-7.2-extlock.patch once;
#  3. install our files into the tree (block/ -> block/extlock/, qapi/,
#     include/extlock/, the shared protocol code) - only files whose content
#     changed are rewritten, so ninja rebuilds only what changed;
#  4. configure (x86_64-softmmu, tools, libnfs, ccache) and build
#     qemu-system-x86_64, qemu-img, qemu-io and qemu-storage-daemon.
#
# Environment: EXTLOCK_CACHE (default ~/.cache/extlock) holds the pristine
# source; CCACHE_DIR as usual.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
CACHE=${EXTLOCK_CACHE:-$HOME/.cache/extlock}
SRC=""
BUILD=$REPO/build/qemu
JOBS=$(nproc)
DEB_VERSION="7.2+dfsg"

while [ $# -gt 0 ]; do
    case "$1" in
        --qemu-src) SRC=$2; shift 2 ;;
        --build-dir) BUILD=$2; shift 2 ;;
        --jobs) JOBS=$2; shift 2 ;;
        -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
        *) echo "build-qemu.sh: unknown option $1" >&2; exit 2 ;;
    esac
done

log() { echo "build-qemu: $*"; }

# ccache: relative paths, so a fresh clone elsewhere still hits the cache
export CCACHE_BASEDIR=$REPO
export CCACHE_NOHASHDIR=true

# --- 1. pristine source from Debian ------------------------------------------
pristine=$CACHE/src/qemu-$DEB_VERSION
if [ -z "$SRC" ] && [ ! -f "$pristine/.extlock-pristine" ]; then
    command -v dpkg-source >/dev/null || { echo "dpkg-dev missing: run scripts/install-deps.sh" >&2; exit 1; }
    log "fetching Debian's qemu source package into $CACHE/src"
    rm -rf "$CACHE/src"; mkdir -p "$CACHE/src"
    (cd "$CACHE/src" && apt-get source -q qemu)
    [ -f "$pristine/debian/patches/series" ] || { echo "unexpected source layout in $CACHE/src" >&2; exit 1; }
    # dpkg-source applies debian/patches (quilt format 3.0) on extraction
    [ -d "$pristine/.pc" ] || { echo "debian/patches were not applied" >&2; exit 1; }
    touch "$pristine/.extlock-pristine"
fi

# --- 2. working tree + our patch ------------------------------------------------
if [ -z "$SRC" ]; then
    SRC=$REPO/build/qemu-src
    if [ ! -f "$SRC/.extlock-copied" ]; then
        log "copying source to $SRC"
        rm -rf "$SRC"; mkdir -p "$(dirname "$SRC")"
        cp -a "$pristine" "$SRC"
        rm -f "$SRC/.extlock-pristine"
        touch "$SRC/.extlock-copied"
    fi
fi
[ -f "$SRC/VERSION" ] || { echo "$SRC is not a QEMU source tree" >&2; exit 1; }

PATCH=$REPO/patches/qemu-7.2-extlock.patch
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
install_file "$REPO/util/extent.c" "$SRC/block/extlock/extent.c"
install_file "$REPO/util/interval-tree.c" "$SRC/block/extlock/interval-tree.c"
install_file "$REPO/util/extlock-protocol.c" "$SRC/block/extlock/protocol.c"
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
    (cd "$BUILD" && "$SRC/configure" \
        --cc="$cc" \
        --target-list=x86_64-softmmu \
        --enable-tools --enable-libnfs --enable-kvm --enable-tcg \
        --enable-slirp --enable-fdt=system \
        --disable-docs --disable-user --disable-werror \
        --without-default-features --enable-gnutls --enable-extlock \
        --enable-trace-backends=log)
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
log "building"
ninja -C "$BUILD" -j "$JOBS" ${NINJA_ARGS:-} qemu-img qemu-io storage-daemon/qemu-storage-daemon \
    qemu-system-x86_64
log "done: $BUILD/{qemu-img,qemu-io,storage-daemon/qemu-storage-daemon,qemu-system-x86_64}"
