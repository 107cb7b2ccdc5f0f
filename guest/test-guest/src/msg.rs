//! Fixed-size message formatting: there is no allocator, so ucall messages are formatted with
//! `core::fmt` into a [`MAX_MESSAGE_LEN`]-byte buffer on the stack and truncated (at a character
//! boundary, so the result stays UTF-8) if they do not fit.

use core::fmt;

use guest_abi::MAX_MESSAGE_LEN;

/// A message being formatted; [`MsgBuf::as_bytes`] is what the ucall points at.
pub struct MsgBuf {
    buf: [u8; MAX_MESSAGE_LEN],
    len: usize,
}

impl MsgBuf {
    /// An empty message.
    pub const fn new() -> Self {
        Self {
            buf: [0; MAX_MESSAGE_LEN],
            len: 0,
        }
    }

    /// Formats `args` into a new buffer (truncated to [`MAX_MESSAGE_LEN`] bytes).
    pub fn format(args: fmt::Arguments<'_>) -> Self {
        let mut msg = Self::new();
        // Our `write_str` never fails (it truncates), and a `Display` impl that fails only
        // shortens the message.
        let _ = fmt::write(&mut msg, args);
        msg
    }

    /// The formatted bytes (valid UTF-8).
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl fmt::Write for MsgBuf {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let room = MAX_MESSAGE_LEN - self.len;
        let mut take = s.len().min(room);
        while !s.is_char_boundary(take) {
            take -= 1;
        }
        self.buf[self.len..self.len + take].copy_from_slice(&s.as_bytes()[..take]);
        self.len += take;
        Ok(())
    }
}
