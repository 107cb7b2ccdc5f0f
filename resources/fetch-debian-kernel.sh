#!/bin/sh
# Fetches the kernel image of Debian's linux-image-cloud-amd64 metapackage without installing it
# (no maintainer scripts, no initramfs hooks, nothing under /boot): `apt-get download` of the
# versioned package it depends on, `dpkg-deb -x` into a cache directory, and prints the path of the
# bzImage on stdout.
#
#   resources/fetch-debian-kernel.sh [--vmlinux] [CACHE_DIR]     (default: target/debian-kernel)
#
# With --vmlinux it also unpacks the uncompressed kernel ELF from the bzImage's payload
# (Debian ships no vmlinux in that package) and prints that path instead.
#
# Idempotent: once a kernel is cached, later calls print its path at once and need no network.
# Exits non-zero, with the reason on stderr, when the package cannot be had.
set -eu

META=linux-image-cloud-amd64
VMLINUX=0
if [ "${1:-}" = --vmlinux ]; then
    VMLINUX=1
    shift
fi
CACHE=${1:-target/debian-kernel}

die() {
    echo "fetch-debian-kernel: $*" >&2
    exit 1
}

mkdir -p "$CACHE" || die "cannot create the cache directory $CACHE"
CACHE=$(cd "$CACHE" && pwd)
STAMP="$CACHE/bzImage.path"

# Prints the kernel to use: the bzImage, or with --vmlinux the ELF inside it.
finish() {
    if [ "$VMLINUX" = 0 ]; then
        echo "$1"
        exit 0
    fi
    elf="$(dirname "$1")/vmlinux"
    if [ ! -s "$elf" ]; then
        # boot.rst: setup_sects at 0x1f1, payload_offset/payload_length at 0x248/0x24c; the
        # payload starts (setup_sects + 1) * 512 bytes in, and its last 4 bytes are the size.
        u() { od -An -tu"$2" -j "$(($1))" -N "$2" "$3" | tr -d ' \n'; }
        sects=$(u 0x1f1 1 "$1")
        [ "$sects" != 0 ] || sects=4
        off=$(((sects + 1) * 512 + $(u 0x248 4 "$1")))
        len=$(u 0x24c 4 "$1")
        magic=$(od -An -tx1 -j "$off" -N 4 "$1" | tr -d ' \n')
        case $magic in
        02214c18) unpack="lz4 -dc" ;;
        1f8b*) unpack="gzip -dc" ;;
        fd377a58) unpack="xz -dc" ;;
        28b52ffd) unpack="zstd -dc" ;;
        *) die "unknown compression of the payload of $1 (magic $magic)" ;;
        esac
        command -v "${unpack%% *}" >/dev/null 2>&1 || die "${unpack%% *} not found: cannot unpack vmlinux from $1"
        tail -c "+$((off + 1))" "$1" | head -c "$((len - 4))" | $unpack >"$elf.tmp" ||
            die "$unpack of the payload of $1 failed"
        [ "$(head -c 4 "$elf.tmp" | od -An -tx1 | tr -d ' \n')" = 7f454c46 ] ||
            die "the payload of $1 is not an ELF"
        mv "$elf.tmp" "$elf"
    fi
    echo "$elf"
    exit 0
}

# Cached: print and leave, no apt at all.
if [ -s "$STAMP" ]; then
    cached=$(cat "$STAMP")
    if [ -f "$cached" ]; then
        finish "$cached"
    fi
fi

for tool in apt-get apt-cache dpkg-deb; do
    command -v "$tool" >/dev/null 2>&1 || die "$tool not found: $META can only be fetched on a Debian-like host"
done

# The versioned image package the metapackage depends on, e.g. linux-image-6.1.0-56-cloud-amd64.
# One host apt-get update at a time among zapvm's scripts (CI runs some side by side): apt-get
# fails rather than waits when another holds its lock.
host_apt() { flock -w 900 "${ZAPVM_HOST_APT_LOCK:-/tmp/zapvm-host-apt.lock}" apt-get "$@"; }

resolve() {
    apt-cache depends "$META" 2>/dev/null |
        sed -n 's/^ *Depends: *\(linux-image-[0-9][^ ]*-cloud-amd64\) *$/\1/p' | head -n 1
}

pkg=$(resolve || true)
if [ -z "$pkg" ]; then
    echo "fetch-debian-kernel: $META unknown to apt; running apt-get update" >&2
    host_apt update >&2 || die "apt-get update failed (no network or not root?)"
    pkg=$(resolve || true)
fi
[ -n "$pkg" ] || die "$META (or the linux-image-*-cloud-amd64 package it depends on) is not available from apt's sources"
echo "fetch-debian-kernel: $META -> $pkg" >&2

dest="$CACHE/$pkg"
image=$(ls "$dest"/boot/vmlinuz-* 2>/dev/null | head -n 1 || true)
if [ -z "$image" ]; then
    work=$(mktemp -d "$CACHE/.download.XXXXXX")
    trap 'rm -rf "$work"' EXIT
    # apt's download sandbox user must be able to write here.
    chmod 0777 "$work"
    if ! (cd "$work" && apt-get download "$pkg" >&2); then
        echo "fetch-debian-kernel: apt-get download $pkg failed; running apt-get update and retrying" >&2
        host_apt update >&2 || die "apt-get update failed (no network or not root?)"
        (cd "$work" && apt-get download "$pkg" >&2) || die "apt-get download $pkg failed"
    fi
    deb=$(ls "$work"/*.deb 2>/dev/null | head -n 1 || true)
    [ -n "$deb" ] || die "apt-get download $pkg produced no .deb"
    mkdir -p "$work/root"
    dpkg-deb -x "$deb" "$work/root" || die "dpkg-deb -x $deb failed"
    ls "$work"/root/boot/vmlinuz-* >/dev/null 2>&1 || die "$deb holds no /boot/vmlinuz-*"
    rm -rf "$dest"
    mkdir -p "$dest/boot"
    # Only the kernel image (and its config, for reference) is kept, not the modules.
    mv "$work"/root/boot/* "$dest/boot/"
    image=$(ls "$dest"/boot/vmlinuz-* | head -n 1)
fi

echo "$image" >"$STAMP"
finish "$image"
