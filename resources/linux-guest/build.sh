#!/usr/bin/env bash
# Builds zapvm's Linux guest: a small kernel from Debian's linux-source-6.1 (`make tinyconfig`
# plus resources/linux-guest/config.fragment, with the project's kernel change
# resources/linux-guest/pvm-syscall-from-user-fault.patch) and an initramfs of busybox-static
# whose /init is resources/linux-guest/init, with two memory checkers /init starts on request:
# Debian's memtester (with the shared libraries it links) and seedcheck (seedcheck.c, built
# here), and churn (churn.c, built here), which allocates and frees memory so that free page
# reporting has pages to report.
#
#   resources/linux-guest/build.sh
#
# Prints, on stdout, three lines: `vmlinux=PATH`, `bzimage=PATH`, `initramfs=PATH`; progress and
# errors go to stderr. `zapvm run --linux` and the tests run it; it can be run by hand.
#
# Builds are cached outside the repository, so that every checkout, test run and CI job on the
# machine shares them:
#   ${ZAPVM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/zapvm}/linux-guest/
#     kernel-<key>/      vmlinux, bzImage, config, build.log   (key: fragment, patch, recipe
#                        version, linux-source package version)
#     initramfs-<key>/   initramfs.cpio                        (key: init, seedcheck.c, churn.c, recipe
#                        version, busybox-static, memtester and libc6 package versions)
# A cached build is used at once, with no apt and no network. A lock (flock) makes concurrent
# callers wait for one build instead of building twice. The first kernel build takes minutes
# (2-4 with `make -j2`); it needs apt packages, which it installs (as root, or through sudo).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
FRAGMENT=$HERE/config.fragment
PATCH=$HERE/pvm-syscall-from-user-fault.patch
INIT=$HERE/init
SEEDCHECK=$HERE/seedcheck.c
CHURN=$HERE/churn.c
MEMTESTER=/usr/sbin/memtester
# Bump when the recipe below changes what it produces.
KERNEL_RECIPE=1
INITRAMFS_RECIPE=4
SOURCE_PACKAGE=linux-source-6.1
SOURCE_TARBALL=/usr/src/linux-source-6.1.tar.xz
PACKAGES=("$SOURCE_PACKAGE" busybox-static memtester build-essential bc flex bison libelf-dev libssl-dev cpio xz-utils lz4 util-linux)

say() { echo "linux-guest: $*" >&2; }
die() {
    say "error: $*"
    exit 1
}

CACHE=${ZAPVM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/zapvm}/linux-guest
mkdir -p "$CACHE" || die "cannot create the cache directory $CACHE"

# Installs the packages that are missing (dpkg's view), once.
ensure_packages() {
    local missing=() p
    for p in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    ((${#missing[@]})) || return 0
    command -v apt-get >/dev/null || die "missing ${missing[*]} and no apt-get: build on a Debian-like host"
    local sudo=""
    if [ "$(id -u)" -ne 0 ]; then
        command -v sudo >/dev/null || die "missing ${missing[*]}: install them as root (no sudo here)"
        sudo=sudo
    fi
    say "installing ${missing[*]} (apt-get)"
    # One host apt at a time among zapvm's scripts (CI runs some side by side): apt-get fails
    # rather than waits when another holds its lock.
    local lock="${ZAPVM_HOST_APT_LOCK:-/tmp/zapvm-host-apt.lock}"
    $sudo flock -w 900 "$lock" apt-get update -qq >&2 || die "apt-get update failed"
    DEBIAN_FRONTEND=noninteractive $sudo flock -w 900 "$lock" apt-get install -y -qq "${missing[@]}" >&2 ||
        die "apt-get install ${missing[*]} failed"
}

package_version() { dpkg-query -W -f='${Version}' "$1" 2>/dev/null || true; }
hash_of() { { printf '%s\n' "$@"; } | sha256sum | cut -c1-16; }
file_hash() { sha256sum "$1" | cut -d' ' -f1; }

# The keys need the package versions; before the packages exist a key cannot be known, so look
# for them first (a cached build must not need apt).
source_version=$(package_version "$SOURCE_PACKAGE")
busybox_version=$(package_version busybox-static)
memtester_version=$(package_version memtester)
libc_version=$(package_version libc6)
if [ -z "$source_version" ] || [ -z "$busybox_version" ] || [ -z "$memtester_version" ] ||
    [ ! -f "$SOURCE_TARBALL" ] || [ ! -x /bin/busybox ] || [ ! -x "$MEMTESTER" ]; then
    ensure_packages
    source_version=$(package_version "$SOURCE_PACKAGE")
    busybox_version=$(package_version busybox-static)
    memtester_version=$(package_version memtester)
    libc_version=$(package_version libc6)
    [ -f "$SOURCE_TARBALL" ] || die "$SOURCE_PACKAGE is installed but $SOURCE_TARBALL is missing"
fi
kernel_key=$(hash_of kernel "$KERNEL_RECIPE" "$source_version" "$(file_hash "$FRAGMENT")" "$(file_hash "$PATCH")")
initramfs_key=$(hash_of initramfs "$INITRAMFS_RECIPE" "$busybox_version" "$memtester_version" "$libc_version" \
    "$(file_hash "$INIT")" "$(file_hash "$SEEDCHECK")" "$(file_hash "$CHURN")")
KERNEL_DIR=$CACHE/kernel-$kernel_key
INITRAMFS_DIR=$CACHE/initramfs-$initramfs_key

finish() {
    echo "vmlinux=$KERNEL_DIR/vmlinux"
    echo "bzimage=$KERNEL_DIR/bzImage"
    echo "initramfs=$INITRAMFS_DIR/initramfs.cpio"
    exit 0
}
built() { [ -s "$KERNEL_DIR/vmlinux" ] && [ -s "$KERNEL_DIR/bzImage" ] && [ -s "$INITRAMFS_DIR/initramfs.cpio" ]; }
built && finish

# One builder at a time; the others wait, then find the build done.
exec 9>"$CACHE/.lock"
if ! flock -n 9; then
    say "another build of the guest holds $CACHE/.lock; waiting for it"
    flock 9
fi
built && finish
ensure_packages

WORK=$(mktemp -d "$CACHE/.work.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

# Runs `make "$@"` in the source tree, its output to build.log, with a progress line every 15 s.
make_with_progress() {
    local src=$1 log=$2 started=$SECONDS pid
    shift 2
    make -C "$src" "$@" >>"$log" 2>&1 &
    pid=$!
    while kill -0 "$pid" 2>/dev/null; do
        sleep 15 &
        wait $! || true
        kill -0 "$pid" 2>/dev/null &&
            say "  ... $((SECONDS - started)) s, $(grep -c '^ *\(CC\|AS\|LD\|AR\)' "$log" || true) steps done"
    done
    wait "$pid" || {
        tail -n 30 "$log" >&2
        die "make $* failed; the whole log is $log"
    }
}

build_kernel() {
    local started=$SECONDS src=$WORK/linux log=$WORK/build.log jobs
    jobs=$(nproc)
    say "building the guest kernel ($SOURCE_PACKAGE $source_version, make -j$jobs; takes minutes) into $KERNEL_DIR"
    say "  unpacking $SOURCE_TARBALL"
    mkdir -p "$src"
    tar -xJf "$SOURCE_TARBALL" -C "$src" --strip-components=1 || die "cannot unpack $SOURCE_TARBALL"
    say "  applying $(basename "$PATCH")"
    patch -d "$src" -p1 --forward --quiet <"$PATCH" >&2 || die "$(basename "$PATCH") does not apply to $SOURCE_PACKAGE $source_version"
    say "  configuring: tinyconfig + $(basename "$FRAGMENT")"
    : >"$log"
    make -C "$src" tinyconfig >>"$log" 2>&1 || die "make tinyconfig failed (see $log)"
    (cd "$src" && scripts/kconfig/merge_config.sh -m .config "$FRAGMENT") >>"$log" 2>&1 ||
        die "merging $FRAGMENT failed"
    make -C "$src" olddefconfig >>"$log" 2>&1 || die "make olddefconfig failed"
    # Every option of the fragment must have survived Kconfig's dependency resolution.
    local line option value got bad=()
    while IFS= read -r line; do
        [[ $line =~ ^(CONFIG_[A-Z0-9_]+)=(.*)$ ]] || continue
        option=${BASH_REMATCH[1]}
        value=${BASH_REMATCH[2]}
        got=$(grep -E "^$option=" "$src/.config" || true)
        if [ "$value" = n ]; then
            [ -z "$got" ] || bad+=("$option=n (got $got)")
        elif [ "$got" != "$option=$value" ]; then
            bad+=("$option=$value (got ${got:-unset})")
        fi
    done <"$FRAGMENT"
    ((${#bad[@]} == 0)) || die "Kconfig did not take these options of $(basename "$FRAGMENT"): ${bad[*]}"
    say "  compiling vmlinux and bzImage"
    make_with_progress "$src" "$log" -j"$jobs" vmlinux bzImage
    local out=$WORK/kernel
    mkdir -p "$out"
    cp "$src/vmlinux" "$src/arch/x86/boot/bzImage" "$out/"
    cp "$src/.config" "$out/config"
    cp "$log" "$out/build.log"
    rm -rf "$KERNEL_DIR"
    mv "$out" "$KERNEL_DIR"
    say "guest kernel built in $((SECONDS - started)) s: $KERNEL_DIR (bzImage $(stat -c %s "$KERNEL_DIR/bzImage") bytes)"
}

build_initramfs() {
    local started=$SECONDS gen=$WORK/gen_init_cpio list=$WORK/initramfs.list
    say "packing the initramfs (busybox-static $busybox_version, memtester $memtester_version, /init = $(basename "$INIT")) into $INITRAMFS_DIR"
    # The kernel's own cpio writer: it makes /dev/console (needed before /init runs) without root.
    tar -xJf "$SOURCE_TARBALL" -O linux-source-6.1/usr/gen_init_cpio.c >"$WORK/gen_init_cpio.c" ||
        die "cannot extract usr/gen_init_cpio.c from $SOURCE_TARBALL"
    cc -O2 -o "$gen" "$WORK/gen_init_cpio.c" || die "cannot compile gen_init_cpio"
    cc -O2 -o "$WORK/seedcheck" "$SEEDCHECK" || die "cannot compile $(basename "$SEEDCHECK")"
    cc -O2 -o "$WORK/churn" "$CHURN" || die "cannot compile $(basename "$CHURN")"
    # The checkers' shared libraries (glibc's) and their ELF interpreter, at the paths their
    # dynamic linker looks for them (as ldd names them), from the host's files. Shared, not
    # static: every byte of the initramfs is unpacked by the guest kernel (emulated ring 0 on PVM
    # hosts).
    local libs
    libs=$(ldd "$MEMTESTER" "$WORK/seedcheck" "$WORK/churn" |
        awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// && $1 !~ /:$/ { print $1 }' | sort -u)
    [ -n "$libs" ] || die "ldd found no libraries for $MEMTESTER"
    {
        echo "dir /dev 0755 0 0"
        echo "nod /dev/console 0600 0 0 c 5 1"
        echo "dir /proc 0755 0 0"
        echo "dir /sys 0755 0 0"
        echo "dir /tmp 01777 0 0"
        echo "dir /bin 0755 0 0"
        echo "file /bin/busybox /bin/busybox 0755 0 0"
        # Debian's busybox-static shell runs applets without links; a link per applet would
        # cost the kernel's unpacking seconds of emulated ring 0 on PVM hosts.
        echo "slink /bin/sh busybox 0777 0 0"
        echo "file /init $INIT 0755 0 0"
        echo "file /bin/memtester $MEMTESTER 0755 0 0"
        echo "file /bin/seedcheck $WORK/seedcheck 0755 0 0"
        echo "file /bin/churn $WORK/churn 0755 0 0"
        local lib dir made=" /bin /dev /proc /sys /tmp "
        for lib in $libs; do
            dir=
            while IFS= read -r part; do
                [ -n "$part" ] || continue
                dir=$dir/$part
                case $made in *" $dir "*) continue ;; esac
                echo "dir $dir 0755 0 0"
                made="$made$dir "
            done < <(dirname "$lib" | tr / '\n')
            echo "file $lib $(readlink -f "$lib") 0755 0 0"
        done
    } >"$list"
    local out=$WORK/initramfs
    mkdir -p "$out"
    # Uncompressed: decompression would be guest ring-0 work, emulated on PVM hosts.
    "$gen" "$list" >"$out/initramfs.cpio" || die "gen_init_cpio failed"
    rm -rf "$INITRAMFS_DIR"
    mv "$out" "$INITRAMFS_DIR"
    say "initramfs packed in $((SECONDS - started)) s: $INITRAMFS_DIR/initramfs.cpio ($(stat -c %s "$INITRAMFS_DIR/initramfs.cpio") bytes)"
}

[ -s "$KERNEL_DIR/vmlinux" ] && [ -s "$KERNEL_DIR/bzImage" ] || build_kernel
[ -s "$INITRAMFS_DIR/initramfs.cpio" ] || build_initramfs
finish
