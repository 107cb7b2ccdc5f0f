//! End to end: `zapvm run --kernel` boots Debian's cloud kernel (a stock bzImage, and the
//! vmlinux ELF inside it) with an initrd and a command line per the x86 64-bit boot protocol, and
//! the kernel's own early messages on the serial console prove that it got them: the "Linux
//! version" banner, the command line we passed, the e820 map of exactly the RAM the VMM gave, and
//! (when it gets that far within the budget) the initrd's "RAMDISK" reservation.
//!
//! On PVM hosts guest ring 0 is emulated (docs/host.md, "PVM"), so the bzImage's decompression alone takes
//! minutes: that test has a budget of minutes ([`BZIMAGE_BUDGET`]; `ZAPVM_LINUX_BOOT_BUDGET`
//! seconds replaces both budgets) and never waits longer. The two tests run one after the other.
//! Each is skipped (through the one skip helper, which `ZAPVM_REQUIRE_ALL=1` turns into a
//! failure), with a message saying why, only when the kernel package cannot be had
//! (`resources/fetch-debian-kernel.sh` fails), the vmlinux one also when its payload cannot be
//! unpacked.

#[path = "support/lines.rs"]
mod lines;
#[path = "support/scratch.rs"]
mod scratch;
#[path = "support/skip.rs"]
mod skip;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Mutex;

use std::time::{Duration, Instant};

use lines::lines_to_channel;
use scratch::{scratch_dir, zapvm_in};
use skip::skip;

/// How long the VM may take to print everything checked here, booting the bzImage (measured on
/// a PVM host: banner after 127-185 s depending on the host's load, RAMDISK line ~3 s later).
const BZIMAGE_BUDGET: Duration = Duration::from_secs(300);
/// The same for the vmlinux, which skips the decompressor (measured: banner after 20-31 s).
const VMLINUX_BUDGET: Duration = Duration::from_secs(120);
/// How long fetching (normally: finding in the cache) the kernel may take.
const FETCH_BUDGET: Duration = Duration::from_secs(300);
/// Guest RAM.
const MEM_MIB: u64 = 256;
/// Where the VMM's e820 map puts the end of low RAM (the EBDA starts there) and high RAM.
const LOW_RAM_END: u64 = 0x9_fc00;
const HIGH_RAM_START: u64 = 0x10_0000;
/// A word on the command line that only this test puts there.
const MARKER: &str = "zapvm.test=linux_boot";

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the zapvm package lives in the workspace")
        .to_path_buf()
}

/// Collects everything a channel still holds or receives within `wait`.
fn drain(rx: &Receiver<String>, wait: Duration) -> Vec<String> {
    let end = Instant::now() + wait;
    let mut out = Vec::new();
    while let Some(left) = end.checked_duration_since(Instant::now()) {
        match rx.recv_timeout(left) {
            Ok(line) => out.push(line),
            Err(_) => break,
        }
    }
    out
}

/// Kills and reaps a child on every path out of the test.
struct Reaped(Child);
impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs the fetch script; `Err` says why the kernel cannot be had.
fn fetch_kernel(root: &Path, vmlinux: bool) -> Result<PathBuf, String> {
    let script = root.join("resources/fetch-debian-kernel.sh");
    let cache = root.join("target/debian-kernel");
    let mut command = Command::new("sh");
    command.arg(&script);
    if vmlinux {
        command.arg("--vmlinux");
    }
    let child = command
        .arg(&cache)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
    let mut child = Reaped(child);
    let out = lines_to_channel(child.0.stdout.take().expect("piped"));
    let err = lines_to_channel(child.0.stderr.take().expect("piped"));
    let deadline = Instant::now() + FETCH_BUDGET;
    let mut stdout = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match out.recv_timeout(left) {
            Ok(line) => stdout.push(line),
            Err(RecvTimeoutError::Disconnected) => break,
            Err(RecvTimeoutError::Timeout) => {
                return Err(format!(
                    "{} did not finish within {} s; its messages:\n{}",
                    script.display(),
                    FETCH_BUDGET.as_secs(),
                    drain(&err, Duration::from_millis(100)).join("\n")
                ))
            }
        }
    }
    let status = child.0.wait().map_err(|e| format!("waiting for the fetch script: {e}"))?;
    let messages = drain(&err, Duration::from_secs(1)).join("\n");
    if !status.success() {
        return Err(format!("{} failed ({status}):\n{messages}", script.display()));
    }
    let path = stdout
        .iter()
        .rev()
        .find(|l| !l.trim().is_empty())
        .map(|l| PathBuf::from(l.trim()))
        .ok_or_else(|| format!("{} printed no path:\n{messages}", script.display()))?;
    if !path.is_file() {
        return Err(format!("{} printed {}, which is not a file", script.display(), path.display()));
    }
    Ok(path)
}

/// A cpio "newc" archive (the initramfs format) holding one regular file.
fn newc_archive(name: &str, data: &[u8]) -> Vec<u8> {
    fn entry(out: &mut Vec<u8>, ino: u32, mode: u32, name: &str, data: &[u8]) {
        let namesize = name.len() + 1;
        let fields = [ino, mode, 0, 0, 1, 0, data.len() as u32, 0, 0, 0, 0, namesize as u32, 0];
        out.extend_from_slice(b"070701");
        for f in fields {
            out.extend_from_slice(format!("{f:08X}").as_bytes());
        }
        out.extend_from_slice(name.as_bytes());
        out.push(0);
        while !out.len().is_multiple_of(4) {
            out.push(0);
        }
        out.extend_from_slice(data);
        while !out.len().is_multiple_of(4) {
            out.push(0);
        }
    }
    let mut out = Vec::new();
    entry(&mut out, 1, 0o100644, name, data);
    entry(&mut out, 0, 0, "TRAILER!!!", &[]);
    while out.len() % 512 != 0 {
        out.push(0);
    }
    out
}

/// `[mem 0x...-0x...]` in a kernel line, as an inclusive range.
fn mem_range(line: &str) -> Option<(u64, u64)> {
    let rest = &line[line.find("[mem ")? + 5..];
    let rest = &rest[..rest.find(']')?];
    let (a, b) = rest.split_once('-')?;
    let hex = |s: &str| u64::from_str_radix(s.trim().trim_start_matches("0x"), 16).ok();
    Some((hex(a)?, hex(b)?))
}

/// What the console has shown so far.
#[derive(Default)]
struct Seen {
    banner: Option<Duration>,
    cmdline: Option<Duration>,
    /// Usable ranges of the "BIOS-e820" lines, and when the last one came.
    e820_usable: Vec<(u64, u64)>,
    e820_other: Vec<String>,
    e820: Option<Duration>,
    /// The kernel's "RAMDISK: [mem ...]" line.
    ramdisk: Option<((u64, u64), Duration)>,
}

/// The two tests each run a VM that wants a whole CPU; they take turns.
static ONE_VM_AT_A_TIME: Mutex<()> = Mutex::new(());

#[test]
fn debian_cloud_bzimage_boots_with_initrd_and_cmdline() {
    boot_debian_kernel(false, BZIMAGE_BUDGET);
}

#[test]
fn debian_cloud_vmlinux_boots_with_initrd_and_cmdline() {
    boot_debian_kernel(true, VMLINUX_BUDGET);
}

fn boot_debian_kernel(vmlinux: bool, budget: Duration) {
    let _turn = ONE_VM_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let name = if vmlinux { "vmlinux" } else { "bzImage" };
    let root = workspace_root();
    let kernel = match fetch_kernel(&root, vmlinux) {
        Ok(path) => path,
        Err(why) => {
            return skip(
                &format!("debian_cloud_{}_boots_with_initrd_and_cmdline", name.to_lowercase()),
                &format!(
                    "Debian's linux-image-cloud-amd64 cannot be had{}, so there is no stock kernel to \
                     boot: {why}",
                    if vmlinux { " or its vmlinux cannot be unpacked" } else { "" }
                ),
            )
        }
    };
    let budget = std::env::var("ZAPVM_LINUX_BOOT_BUDGET")
        .ok()
        .and_then(|s| s.parse().ok())
        .map(Duration::from_secs)
        .unwrap_or(budget);

    // The initrd, and the control socket of the VM (which is killed), go with this directory.
    let scratch = scratch_dir(&format!("linux-boot-{name}"));
    let initrd_data = newc_archive("zapvm-linux-boot", b"hello from the zapvm linux_boot test\n");
    let initrd = scratch.path().join("initrd.cpio");
    std::fs::write(&initrd, &initrd_data).expect("write the initrd");

    let cmdline = format!("{} {MARKER}", vmm::boot::linux::default_cmdline());
    let mut command = zapvm_in(scratch.path());
    command
        .arg("run")
        .arg("--kernel")
        .arg(&kernel)
        .arg("--initrd")
        .arg(&initrd)
        .arg("--cmdline")
        .arg(&cmdline)
        .arg("--mem")
        .arg(format!("{MEM_MIB}M"))
        // The VMM stops itself a little after the test gives up, should the kill be lost.
        .arg("--timeout")
        .arg((budget.as_secs() + 30).to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    eprintln!("linux_boot ({name}): {command:?}");
    let started = Instant::now();
    let mut vm = Reaped(command.spawn().expect("spawn zapvm"));
    let console = lines_to_channel(vm.0.stdout.take().expect("piped"));
    let stderr = lines_to_channel(vm.0.stderr.take().expect("piped"));
    let deadline = started + budget;

    let mut log: Vec<String> = Vec::new();
    let mut seen = Seen::default();
    let mut in_e820 = false;
    // The end of the run: Ok when everything was seen, Err(why) otherwise.
    let verdict: Result<(), String> = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = match console.recv_timeout(left) {
            Ok(line) => line,
            Err(RecvTimeoutError::Timeout) => {
                break Err(format!("the budget of {} s ran out", budget.as_secs()))
            }
            Err(RecvTimeoutError::Disconnected) => {
                break Err("zapvm ended (closed its standard output)".into())
            }
        };
        let at = started.elapsed();
        eprintln!("[{:7.1} s] {line}", at.as_secs_f64());
        if seen.banner.is_none() && line.contains("Linux version ") {
            seen.banner = Some(at);
        }
        if seen.cmdline.is_none() && line.contains("Command line: ") {
            seen.cmdline = Some(at);
            let got = &line[line.find("Command line: ").unwrap() + 14..];
            // zapvm appends the virtio-mmio devices it gives the guest (its balloon).
            let expected = format!(
                "{} virtio_mmio.device={:#x}@{:#x}:{}",
                cmdline.trim(),
                vmm::devices::virtio::mmio::MMIO_WINDOW_SIZE,
                vmm::machine::VIRTIO_MMIO_BASE,
                vmm::machine::VIRTIO_FIRST_GSI
            );
            if got.trim() != expected {
                break Err(format!("the kernel got the command line {got:?}, expected {expected:?}"));
            }
        }
        if line.contains("BIOS-provided physical RAM map") {
            in_e820 = true;
        } else if in_e820 && line.contains("BIOS-e820: ") {
            let range = mem_range(&line);
            match range {
                Some(r) if line.trim_end().ends_with("usable") => seen.e820_usable.push(r),
                Some(_) => seen.e820_other.push(line.clone()),
                None => break Err(format!("cannot parse the e820 line {line:?}")),
            }
        } else if in_e820 {
            in_e820 = false;
            seen.e820 = Some(at);
        }
        if seen.ramdisk.is_none() && line.contains("RAMDISK: [mem ") {
            if let Some(r) = mem_range(&line) {
                seen.ramdisk = Some((r, at));
            }
        }
        log.push(line);
        if seen.banner.is_some() && seen.cmdline.is_some() && seen.e820.is_some() && seen.ramdisk.is_some() {
            break Ok(());
        }
    };
    drop(vm);
    let vmm_messages = drain(&stderr, Duration::from_secs(1));
    let dump = || {
        format!(
            "--- console ({} lines) ---\n{}\n--- zapvm stderr ---\n{}",
            log.len(),
            log.join("\n"),
            vmm_messages.join("\n")
        )
    };

    let secs = |d: Option<Duration>| d.map(|d| format!("{:.1} s", d.as_secs_f64())).unwrap_or("-".into());
    eprintln!(
        "linux_boot ({name}): banner after {}, command line after {}, e820 map after {}, RAMDISK line after {}",
        secs(seen.banner),
        secs(seen.cmdline),
        secs(seen.e820),
        secs(seen.ramdisk.map(|(_, at)| at))
    );

    // What must be seen: the banner, our command line, the e820 map.
    if let Err(why) = &verdict {
        if seen.banner.is_none() || seen.cmdline.is_none() || seen.e820.is_none() {
            panic!("{why} before the kernel printed its banner, command line and e820 map\n{}", dump());
        }
        // The RAMDISK line comes later in setup_arch; without it the initrd is checked less.
        if seen.ramdisk.is_some() || !why.starts_with("the budget") {
            panic!("{why}\n{}", dump());
        }
        eprintln!("linux_boot ({name}): {why} before the kernel's RAMDISK line; the initrd was not checked by the kernel's own words");
    }
    let mem = MEM_MIB << 20;
    let want = vec![(0, LOW_RAM_END - 1), (HIGH_RAM_START, mem - 1)];
    assert_eq!(
        seen.e820_usable,
        want,
        "the kernel's e820 map is not the {MEM_MIB} MiB zapvm gave it (other e820 lines: {:?})\n{}",
        seen.e820_other,
        dump()
    );
    let usable: u64 = seen.e820_usable.iter().map(|(a, b)| b + 1 - a).sum();
    assert_eq!(usable, mem - (HIGH_RAM_START - LOW_RAM_END), "{}", dump());
    if let Some(((start, end), _)) = seen.ramdisk {
        // reserve_initrd prints [image, PAGE_ALIGN(image + size) - 1].
        let size = initrd_data.len() as u64;
        assert!(
            end + 1 - start == size.div_ceil(4096) * 4096 && start % 4096 == 0 && end < mem,
            "the kernel's RAMDISK range [{start:#x}, {end:#x}] is not the {size}-byte initrd within RAM\n{}",
            dump()
        );
    }
}
