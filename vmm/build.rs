//! Builds the freestanding test guest (`guest/test-guest`) with a nested `cargo build` and hands
//! its ELF to the VMM crate as `ZAPVM_TEST_GUEST_ELF` (`include_bytes!(env!("ZAPVM_TEST_GUEST_ELF"))`).
//!
//! The guest is its own cargo workspace with its own profiles; it is built for
//! x86_64-unknown-linux-gnu as a static, libc-free ELF at 0x200000 by the flags in [`GUEST_RUSTFLAGS`],
//! into `$OUT_DIR/test-guest`, offline (it has no registry dependencies). Everything the outer build
//! could leak into it (RUSTFLAGS such as `--cfg loom`, wrappers, target dir, profile overrides) is
//! removed from the nested cargo's environment.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The target the guest is built for (no `x86_64-unknown-none` or rust-src on stable here).
const GUEST_TARGET: &str = "x86_64-unknown-linux-gnu";

/// The guest's rustc flags, passed as `CARGO_ENCODED_RUSTFLAGS` (they replace every other source
/// of rustflags): a non-PIC static executable without C start files or libraries, loaded at
/// 2 MiB, without a build-id note (no PT_NOTE for the loader to parse) or RELRO padding, for the
/// baseline x86-64 CPU (SSE2 only: the guest's XCR0 enables no AVX state), without unwind tables
/// (`panic = "abort"`).
const GUEST_RUSTFLAGS: &[&str] = &[
    "-C",
    "relocation-model=static",
    "-C",
    "target-cpu=x86-64",
    "-C",
    "force-unwind-tables=no",
    "-C",
    "link-arg=-nostartfiles",
    "-C",
    "link-arg=-nostdlib",
    "-C",
    "link-arg=-static",
    "-C",
    "link-arg=-Wl,--image-base=0x200000",
    "-C",
    "link-arg=-Wl,--build-id=none",
    "-C",
    "link-arg=-Wl,-z,norelro",
];

/// Environment variables of the outer build that must not reach the nested cargo.
const SCRUBBED_VARS: &[&str] = &[
    "RUSTFLAGS",
    "CARGO_ENCODED_RUSTFLAGS",
    "CARGO_BUILD_RUSTFLAGS",
    "RUSTDOCFLAGS",
    "CARGO_ENCODED_RUSTDOCFLAGS",
    "CARGO_TARGET_DIR",
    "CARGO_BUILD_TARGET_DIR",
    "CARGO_BUILD_TARGET",
    "CARGO_BUILD_RUSTC_WRAPPER",
    "CARGO_BUILD_RUSTC_WORKSPACE_WRAPPER",
    "RUSTC_WRAPPER",
    "RUSTC_WORKSPACE_WRAPPER",
    "CARGO_INCREMENTAL",
    "CARGO_BUILD_INCREMENTAL",
    "CARGO_MANIFEST_DIR",
    "CARGO_MANIFEST_PATH",
    "CARGO_PRIMARY_PACKAGE",
];

/// Prefixes of environment variables removed for the same reason (profile overrides, per-target
/// rustflags/linker settings, the cfgs and features of the outer crate).
const SCRUBBED_PREFIXES: &[&str] = &["CARGO_PROFILE_", "CARGO_TARGET_", "CARGO_CFG_", "CARGO_FEATURE_"];

fn main() {
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let repo = manifest_dir.parent().expect("vmm/ has a parent").to_path_buf();
    let guest = repo.join("guest/test-guest");
    let abi = repo.join("guest/abi");
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR"));
    let target_dir = out_dir.join("test-guest");
    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());

    // Only the sources and manifests: not the guest's Cargo.lock or any target directory, which
    // the nested build itself writes (watching them would rerun this script on every build).
    println!("cargo:rerun-if-changed=build.rs");
    for path in [
        guest.join("src"),
        guest.join("Cargo.toml"),
        abi.join("src"),
        abi.join("Cargo.toml"),
        // The ABI crate inherits its package fields from the workspace manifest.
        repo.join("Cargo.toml"),
    ] {
        println!("cargo:rerun-if-changed={}", path.display());
    }

    let mut cmd = Command::new(&cargo);
    cmd.arg("build")
        .arg("--release")
        .arg("--offline")
        .arg("--manifest-path")
        .arg(guest.join("Cargo.toml"))
        .arg("--target")
        .arg(GUEST_TARGET)
        .arg("--target-dir")
        .arg(&target_dir)
        .current_dir(&guest);
    for (key, _) in env::vars_os() {
        let Some(name) = key.to_str() else { continue };
        if SCRUBBED_VARS.contains(&name) || SCRUBBED_PREFIXES.iter().any(|p| name.starts_with(p)) {
            cmd.env_remove(&key);
        }
    }
    cmd.env("CARGO_ENCODED_RUSTFLAGS", GUEST_RUSTFLAGS.join("\x1f"));
    // Colour codes in the captured output would only garble the panic message below.
    cmd.env("CARGO_TERM_COLOR", "never");

    let output = match cmd.output() {
        Ok(output) => output,
        Err(err) => panic!("zapvm: could not run {cargo:?} to build the test guest: {err}"),
    };
    if !output.status.success() {
        panic!(
            "zapvm: building the test guest ({}) failed with {}:\n{}{}",
            guest.display(),
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr),
        );
    }
    // Keep the nested cargo's output (warnings) in the build script's log (`cargo build -vv`).
    eprint!("{}", String::from_utf8_lossy(&output.stderr));

    let elf = target_dir.join(GUEST_TARGET).join("release").join("zapvm-test-guest");
    check_elf(&elf);
    println!("cargo:rustc-env=ZAPVM_TEST_GUEST_ELF={}", elf.display());
}

/// Fails the build if the guest is not the kind of ELF the VMM's loader and page tables expect:
/// a little-endian x86-64 ET_EXEC whose loadable segments all sit at or above 2 MiB and whose
/// entry point is inside one of them, with no PT_INTERP, PT_DYNAMIC or PT_TLS.
fn check_elf(path: &Path) {
    let bytes = std::fs::read(path)
        .unwrap_or_else(|err| panic!("zapvm: test guest ELF {} unreadable: {err}", path.display()));
    let fail = |why: &str| -> ! { panic!("zapvm: test guest ELF {}: {why}", path.display()) };
    let u16_at = |at: usize| u16::from_le_bytes(bytes[at..at + 2].try_into().unwrap());
    let u32_at = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap());
    let u64_at = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap());

    if bytes.len() < 64 || &bytes[..4] != b"\x7fELF" || bytes[4] != 2 || bytes[5] != 1 {
        fail("not a little-endian ELF64 file");
    }
    if u16_at(16) != 2 || u16_at(18) != 62 {
        fail("not an x86-64 ET_EXEC");
    }
    let entry = u64_at(24);
    let (phoff, phentsize, phnum) = (u64_at(32) as usize, u16_at(54) as usize, u16_at(56) as usize);
    if phentsize < 56 || phoff + phentsize * phnum > bytes.len() {
        fail("program headers out of bounds");
    }
    let mut entry_loaded = false;
    for i in 0..phnum {
        let ph = phoff + i * phentsize;
        let (p_type, p_flags) = (u32_at(ph), u32_at(ph + 4));
        let (p_paddr, p_memsz) = (u64_at(ph + 24), u64_at(ph + 40));
        match p_type {
            1 => {
                if p_paddr < 0x20_0000 {
                    fail(&format!("PT_LOAD at {p_paddr:#x}, below 2 MiB"));
                }
                if p_flags & 1 != 0 && (p_paddr..p_paddr + p_memsz).contains(&entry) {
                    entry_loaded = true;
                }
            }
            2 => fail("has a PT_DYNAMIC segment"),
            3 => fail("has a PT_INTERP segment"),
            7 => fail("has a PT_TLS segment"),
            _ => {}
        }
    }
    if !entry_loaded {
        fail(&format!("entry point {entry:#x} is not in an executable PT_LOAD segment"));
    }
}
