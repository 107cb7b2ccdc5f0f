//! The user's keyboard on the guest's serial console: bytes read from the VMM's standard input
//! go into the UART's receive FIFO, so the terminal that shows the console also types into it.
//!
//! On a terminal, standard input is put in raw mode for the VM's lifetime (no line editing, no
//! echo, no signals: Ctrl-C goes to the guest like any other key) and restored exactly as it
//! was when the VM ends. The escape sequence **Ctrl-A x** stops the VM; Ctrl-A Ctrl-A types one
//! Ctrl-A. When standard input is not a terminal (a pipe, a file) its bytes are passed as they
//! are, and its end simply ends the input. A VMM started in the background of a shell (not in
//! its terminal's foreground process group) leaves the terminal alone: reading it would stop the
//! whole process.
//!
//! The reader is one thread that polls standard input with a short timeout, so that it notices
//! the VM's end without a byte arriving; when the guest has not drained the 64-byte FIFO it
//! waits for room instead of dropping what the user typed.

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use vmm_sys_util::eventfd::EventFd;

use crate::devices::serial::SerialDevice;

/// The escape key: Ctrl-A (as in QEMU's and screen's consoles).
pub const ESCAPE: u8 = 0x01;
/// After [`ESCAPE`], the key that stops the VM.
pub const QUIT_KEY: u8 = b'x';
/// How long the reader waits for input before it looks whether the VM has ended.
const POLL_INTERVAL: Duration = Duration::from_millis(100);
/// How long the reader waits for the guest to make room in the FIFO before it tries again.
const FIFO_RETRY: Duration = Duration::from_millis(2);

/// What the escape decoder made of some input.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Decoded {
    /// The bytes for the guest.
    pub bytes: Vec<u8>,
    /// The user asked to stop the VM (the bytes before the request are still for the guest).
    pub quit: bool,
}

/// Decodes the escape sequences of a terminal's input, across reads.
#[derive(Debug, Default)]
pub struct EscapeDecoder {
    /// The previous read ended with [`ESCAPE`].
    pending_escape: bool,
}

impl EscapeDecoder {
    /// Decodes `input`: Ctrl-A x is a quit request (what follows it is dropped), Ctrl-A Ctrl-A
    /// is one Ctrl-A, Ctrl-A followed by any other byte is both bytes.
    pub fn decode(&mut self, input: &[u8]) -> Decoded {
        let mut out = Decoded { bytes: Vec::with_capacity(input.len()), quit: false };
        for &byte in input {
            if self.pending_escape {
                self.pending_escape = false;
                match byte {
                    QUIT_KEY => {
                        out.quit = true;
                        return out;
                    }
                    ESCAPE => out.bytes.push(ESCAPE),
                    other => out.bytes.extend_from_slice(&[ESCAPE, other]),
                }
            } else if byte == ESCAPE {
                self.pending_escape = true;
            } else {
                out.bytes.push(byte);
            }
        }
        out
    }
}

/// A terminal put in raw mode, restored to exactly its previous settings when dropped.
///
/// Written with termios directly rather than vmm-sys-util's `Terminal`: that trait's
/// `set_canon_mode` turns flags on rather than putting back what the user had, and the user's
/// terminal must come back as it was.
struct RawTerminal {
    fd: RawFd,
    saved: libc::termios,
}

impl RawTerminal {
    /// Raw mode on `fd` if it is a terminal; `None` if it is not (or cannot be changed).
    fn enter(fd: RawFd) -> Option<Self> {
        // SAFETY: isatty only inspects the descriptor.
        if unsafe { libc::isatty(fd) } != 1 {
            return None;
        }
        // SAFETY: termios is plain data; tcgetattr fills it or fails without touching memory
        // beyond it.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: `fd` is a terminal and `saved` a valid termios to fill.
        if unsafe { libc::tcgetattr(fd, &mut saved) } != 0 {
            return None;
        }
        let mut raw = saved;
        raw.c_lflag &= !(libc::ICANON | libc::ECHO | libc::ISIG | libc::IEXTEN);
        raw.c_iflag &= !(libc::IXON | libc::ICRNL);
        raw.c_cc[libc::VMIN] = 1;
        raw.c_cc[libc::VTIME] = 0;
        // SAFETY: as above; `raw` is a complete termios derived from the terminal's own.
        if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &raw) } != 0 {
            return None;
        }
        Some(Self { fd, saved })
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        // SAFETY: `saved` is what tcgetattr returned for this terminal.
        unsafe { libc::tcsetattr(self.fd, libc::TCSANOW, &self.saved) };
    }
}

/// The running reader; dropping it stops the thread and restores the terminal.
pub struct ConsoleInput {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl ConsoleInput {
    /// Starts feeding the VMM's standard input to `serial`; Ctrl-A x (on a terminal) writes
    /// `quit`. Returns `None` if the thread cannot be started (the VM then runs without input,
    /// which is logged).
    pub fn start(serial: Arc<Mutex<SerialDevice>>, quit: EventFd) -> Option<Self> {
        Self::start_on(libc::STDIN_FILENO, serial, quit)
    }

    /// As [`Self::start`], reading `fd` (which must stay open while the reader runs).
    pub fn start_on(fd: RawFd, serial: Arc<Mutex<SerialDevice>>, quit: EventFd) -> Option<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let stop_reader = stop.clone();
        let thread = std::thread::Builder::new().name("console-input".into()).spawn(move || {
            // SAFETY: isatty only inspects the descriptor.
            let tty = unsafe { libc::isatty(fd) } == 1;
            // SAFETY: tcgetpgrp and getpgrp only query process groups.
            if tty && unsafe { libc::tcgetpgrp(fd) != libc::getpgrp() } {
                // A background job (`zapvm run ... &`) that read its terminal or changed its mode
                // would be stopped by SIGTTIN/SIGTTOU, and the VM with it.
                eprintln!("zapvm: running in the background: the console takes no keyboard input");
                return;
            }
            let terminal = RawTerminal::enter(fd);
            if terminal.is_some() {
                eprintln!("zapvm: the console takes your keyboard; Ctrl-A x stops the VM\r");
            }
            read_loop(fd, terminal.is_some(), &serial, &quit, &stop_reader);
            drop(terminal);
        });
        match thread {
            Ok(thread) => Some(Self { stop, thread: Some(thread) }),
            Err(e) => {
                tracing::warn!("console input: cannot start its thread: {e}");
                None
            }
        }
    }
}

impl Drop for ConsoleInput {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Whether `fd` has input within [`POLL_INTERVAL`] (or an error/hang-up to read).
fn readable(fd: RawFd) -> bool {
    let mut pfd = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
    // SAFETY: one valid pollfd for the duration of the call.
    let n = unsafe { libc::poll(&mut pfd, 1, POLL_INTERVAL.as_millis() as i32) };
    n > 0
}

fn read_loop(fd: RawFd, terminal: bool, serial: &Mutex<SerialDevice>, quit: &EventFd, stop: &AtomicBool) {
    let mut decoder = EscapeDecoder::default();
    let mut buf = [0u8; 256];
    while !stop.load(Ordering::Relaxed) {
        if !readable(fd) {
            continue;
        }
        // SAFETY: `buf` is valid for writes of its length.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            tracing::warn!("console input: reading standard input: {e}");
            return;
        }
        if n == 0 {
            // End of input (a pipe or file that ended): the guest keeps running.
            return;
        }
        let input = &buf[..n as usize];
        let decoded =
            if terminal { decoder.decode(input) } else { Decoded { bytes: input.to_vec(), quit: false } };
        let mut rest = &decoded.bytes[..];
        while !rest.is_empty() && !stop.load(Ordering::Relaxed) {
            let taken = serial.lock().unwrap_or_else(|e| e.into_inner()).enqueue_input(rest);
            rest = &rest[taken..];
            if !rest.is_empty() {
                std::thread::sleep(FIFO_RETRY);
            }
        }
        if decoded.quit {
            let _ = quit.write(1);
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_bytes_pass_through() {
        let mut d = EscapeDecoder::default();
        assert_eq!(d.decode(b"ls -l\r"), Decoded { bytes: b"ls -l\r".to_vec(), quit: false });
    }

    #[test]
    fn ctrl_a_x_quits_and_keeps_what_came_before() {
        let mut d = EscapeDecoder::default();
        assert_eq!(d.decode(b"ab\x01xcd"), Decoded { bytes: b"ab".to_vec(), quit: true });
    }

    #[test]
    fn escape_split_across_reads() {
        let mut d = EscapeDecoder::default();
        assert_eq!(d.decode(b"a\x01"), Decoded { bytes: b"a".to_vec(), quit: false });
        assert_eq!(d.decode(b"x"), Decoded { bytes: vec![], quit: true });
        let mut d = EscapeDecoder::default();
        assert_eq!(d.decode(b"\x01"), Decoded::default());
        assert_eq!(d.decode(b"\x01b"), Decoded { bytes: b"\x01b".to_vec(), quit: false });
    }

    #[test]
    fn escape_then_other_key_sends_both() {
        let mut d = EscapeDecoder::default();
        assert_eq!(d.decode(b"\x01c"), Decoded { bytes: b"\x01c".to_vec(), quit: false });
    }

    /// A pipe's bytes reach the UART's receive FIFO in order, more than the FIFO holds at once,
    /// as the guest drains it; the end of the pipe ends the reader.
    #[test]
    fn pipe_input_reaches_the_uart_with_backpressure() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let serial = Arc::new(Mutex::new(SerialDevice::new(irq, Box::new(std::io::sink()))));
        let quit = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut fds = [0; 2];
        // SAFETY: `fds` has room for the two descriptors pipe returns.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        let message: Vec<u8> = (0..200u32).map(|i| b'a' + (i % 26) as u8).collect();
        // SAFETY: writes `message` (less than a pipe's capacity) to the pipe's write end.
        assert_eq!(unsafe { libc::write(fds[1], message.as_ptr().cast(), message.len()) }, 200);
        // SAFETY: closes our write end, so the reader sees the end after the message.
        unsafe { libc::close(fds[1]) };
        let input = ConsoleInput::start_on(fds[0], serial.clone(), quit.try_clone().unwrap()).unwrap();
        // The guest's driver: read the receive buffer while the line status says data is ready.
        let mut got = Vec::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while got.len() < message.len() && std::time::Instant::now() < deadline {
            let mut s = serial.lock().unwrap();
            let mut lsr = [0u8];
            crate::devices::BusDevice::read(&mut *s, 5, &mut lsr);
            if lsr[0] & 1 != 0 {
                let mut rbr = [0u8];
                crate::devices::BusDevice::read(&mut *s, 0, &mut rbr);
                got.push(rbr[0]);
            } else {
                drop(s);
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        drop(input);
        // SAFETY: closes the read end we created.
        unsafe { libc::close(fds[0]) };
        assert_eq!(got, message);
        assert!(quit.read().is_err(), "a pipe's input never quits the VM");
    }
}
