//! QMP's wire format, as the QEMU Machine Protocol specification defines it: the greeting, a
//! request (`{"execute", "arguments", "id"}`), its reply (`{"return"}` or `{"error": {"class",
//! "desc"}}`, the request's `id` echoed) and an asynchronous event (`{"event", "data",
//! "timestamp"}`). One JSON object per line in each direction (QMP's stream of objects, with
//! each object on its own line, which is what every QMP client sends and reads).
//!
//! [`parse_request`] checks a line whole before anything acts on it: one JSON object with
//! unique member names, `execute` a string, `arguments` (if present) an object with unique
//! member names, no other member than `id` (any JSON, echoed) and `control` (QMP's reserved
//! member, ignored). `exec-oob` is refused: out-of-band execution is not offered.

use std::fmt;

use serde::de::{Deserializer, Error as _, MapAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

/// Longest request line, in bytes, without its `\n`. Longer lines get a `GenericError` reply
/// (the server discards them as they arrive; it never buffers more than this per client).
pub const MAX_LINE: usize = 64 * 1024;

/// QMP's error classes (the `class` of an error reply), those zapvm uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorClass {
    /// Every error without a class of its own: malformed input, a bad argument, a failure.
    GenericError,
    /// An unknown command, or a command out of turn (before or during capabilities negotiation).
    CommandNotFound,
    /// The device the command needs exists but is not active (QEMU: "No balloon device has been
    /// activated").
    DeviceNotActive,
    /// The device the command names does not exist.
    DeviceNotFound,
}

impl fmt::Display for ErrorClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ErrorClass::GenericError => "GenericError",
            ErrorClass::CommandNotFound => "CommandNotFound",
            ErrorClass::DeviceNotActive => "DeviceNotActive",
            ErrorClass::DeviceNotFound => "DeviceNotFound",
        })
    }
}

/// An error reply's `error` member.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{desc} ({class})")]
pub struct QmpError {
    /// Which kind of error.
    pub class: ErrorClass,
    /// What went wrong, for people.
    pub desc: String,
}

impl QmpError {
    /// A `GenericError`.
    pub fn generic(desc: impl Into<String>) -> Self {
        QmpError { class: ErrorClass::GenericError, desc: desc.into() }
    }
    /// A `CommandNotFound`.
    pub fn command_not_found(desc: impl Into<String>) -> Self {
        QmpError { class: ErrorClass::CommandNotFound, desc: desc.into() }
    }
    /// A `DeviceNotActive`.
    pub fn device_not_active(desc: impl Into<String>) -> Self {
        QmpError { class: ErrorClass::DeviceNotActive, desc: desc.into() }
    }
    /// A `DeviceNotFound`.
    pub fn device_not_found(desc: impl Into<String>) -> Self {
        QmpError { class: ErrorClass::DeviceNotFound, desc: desc.into() }
    }
}

/// A request as [`parse_request`] accepted it: the command's name and its arguments (an empty
/// object when absent), not yet checked against the command.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// `execute`.
    pub execute: String,
    /// `arguments`.
    pub arguments: Map<String, Value>,
    /// `id`, echoed by the reply.
    pub id: Option<Value>,
}

impl Request {
    /// A request without arguments or id.
    pub fn new(execute: impl Into<String>) -> Self {
        Request { execute: execute.into(), arguments: Map::new(), id: None }
    }

    /// The same request with `arguments` (an object; anything else is ignored).
    pub fn with_arguments(mut self, arguments: Value) -> Self {
        if let Value::Object(map) = arguments {
            self.arguments = map;
        }
        self
    }

    /// The same request with `id`.
    pub fn with_id(mut self, id: impl Into<Value>) -> Self {
        self.id = Some(id.into());
        self
    }

    /// The request as a line, `\n` included.
    pub fn to_line(&self) -> String {
        let mut object = Map::new();
        object.insert("execute".into(), Value::String(self.execute.clone()));
        if !self.arguments.is_empty() {
            object.insert("arguments".into(), Value::Object(self.arguments.clone()));
        }
        if let Some(id) = &self.id {
            object.insert("id".into(), id.clone());
        }
        let mut line = Value::Object(object).to_string();
        line.push('\n');
        line
    }
}

/// A reply line (without its `\n`): `{"return": value}` or `{"error": {...}}`, with `id` when
/// the request had one.
pub fn reply_line(id: Option<&Value>, result: Result<Value, QmpError>) -> String {
    let mut object = Map::new();
    match result {
        Ok(value) => {
            object.insert("return".into(), value);
        }
        Err(error) => {
            object.insert("error".into(), json!({ "class": error.class, "desc": error.desc }));
        }
    }
    if let Some(id) = id {
        object.insert("id".into(), id.clone());
    }
    Value::Object(object).to_string()
}

/// A reply as a client reads it.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Reply {
    /// The request's id.
    #[serde(default)]
    pub id: Option<Value>,
    /// What the command returned.
    #[serde(default, rename = "return")]
    pub ret: Option<Value>,
    /// Why it failed.
    #[serde(default)]
    pub error: Option<QmpError>,
}

impl Reply {
    /// `return`, or `error`.
    pub fn into_result(self) -> Result<Value, QmpError> {
        match (self.ret, self.error) {
            (_, Some(error)) => Err(error),
            (Some(value), None) => Ok(value),
            (None, None) => Err(QmpError::generic("a reply with neither \"return\" nor \"error\"")),
        }
    }
}

/// The greeting a server sends first: zapvm's version in QEMU's version object (clients print
/// it), `package` naming zapvm, and no capabilities (out-of-band execution is not offered).
pub fn greeting_line() -> String {
    let (major, minor, micro) = version();
    json!({
        "QMP": {
            "version": {
                "qemu": { "major": major, "minor": minor, "micro": micro },
                "package": concat!("zapvm ", env!("CARGO_PKG_VERSION")),
            },
            "capabilities": [],
        }
    })
    .to_string()
}

/// zapvm's version as (major, minor, micro).
pub fn version() -> (u64, u64, u64) {
    let part = |s: &str| s.parse::<u64>().unwrap_or(0);
    (
        part(env!("CARGO_PKG_VERSION_MAJOR")),
        part(env!("CARGO_PKG_VERSION_MINOR")),
        part(env!("CARGO_PKG_VERSION_PATCH")),
    )
}

/// An event line (without its `\n`): `{"event", "data" (when given), "timestamp": {"seconds",
/// "microseconds"}}`, the time being when the event happened.
pub fn event_line(name: &str, data: Option<&Value>, at: std::time::SystemTime) -> String {
    let since = at.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let mut object = Map::new();
    object.insert("event".into(), Value::String(name.to_string()));
    if let Some(data) = data {
        object.insert("data".into(), data.clone());
    }
    object.insert(
        "timestamp".into(),
        json!({ "seconds": since.as_secs(), "microseconds": since.subsec_micros() }),
    );
    Value::Object(object).to_string()
}

/// Parses a request line (with or without its `\n`). On failure: the id to echo (`None` when
/// none could be read, as for any line that is not a JSON object) and the error.
pub fn parse_request(line: &[u8]) -> Result<Request, (Option<Value>, QmpError)> {
    if line.len() > MAX_LINE {
        return Err((None, too_long()));
    }
    let text = std::str::from_utf8(line)
        .map_err(|e| (None, QmpError::generic(format!("JSON parse error, the line is not UTF-8: {e}"))))?;
    if text.trim().is_empty() {
        return Err((None, QmpError::generic("JSON parse error, empty input (expected a JSON object)")));
    }
    let value: StrictValue = serde_json::from_str(text)
        .map_err(|e| (None, QmpError::generic(format!("JSON parse error, {e}"))))?;
    let StrictValue::Object(mut members) = value else {
        return Err((None, QmpError::generic("QMP input must be a JSON object")));
    };
    let id = members.remove("id");
    let fail = |e: QmpError| (id.clone(), e);
    if members.contains_key("exec-oob") {
        return Err(fail(QmpError::generic(
            "QMP input member 'exec-oob' needs capability 'oob', which zapvm does not offer",
        )));
    }
    let execute = match members.remove("execute") {
        Some(Value::String(name)) => name,
        Some(_) => return Err(fail(QmpError::generic("QMP input member 'execute' must be a string"))),
        None => return Err(fail(QmpError::generic("QMP input lacks member 'execute'"))),
    };
    let arguments = match members.remove("arguments") {
        Some(Value::Object(arguments)) => arguments,
        Some(_) => return Err(fail(QmpError::generic("QMP input member 'arguments' must be an object"))),
        None => Map::new(),
    };
    members.remove("control");
    if let Some(name) = members.keys().next() {
        return Err(fail(QmpError::generic(format!("QMP input member '{}' is unexpected", clip(name)))));
    }
    Ok(Request { execute, arguments, id })
}

/// The error of a line longer than [`MAX_LINE`].
pub fn too_long() -> QmpError {
    QmpError::generic(format!("JSON parse error, request line longer than {MAX_LINE} bytes"))
}

/// At most 64 characters of `text`, for echoing the client's input in messages.
pub fn clip(text: &str) -> String {
    match text.char_indices().nth(64) {
        Some((i, _)) => format!("{}...", &text[..i]),
        None => text.to_string(),
    }
}

/// A JSON value whose objects, at every depth, have unique member names. serde_json's `Value`
/// keeps the last of duplicates, so `{"execute": "query-status", "execute": "quit"}` would
/// quietly quit; QMP's parser refuses duplicates, and so does this one.
enum StrictValue {
    Object(Map<String, Value>),
    Other,
}

/// A JSON value checked for duplicate member names at every depth, kept as a `Value`.
struct Unique(Value);

impl<'de> Deserialize<'de> for Unique {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Unique;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON value")
            }
            fn visit_bool<E>(self, v: bool) -> Result<Unique, E> {
                Ok(Unique(Value::Bool(v)))
            }
            fn visit_i64<E>(self, v: i64) -> Result<Unique, E> {
                Ok(Unique(v.into()))
            }
            fn visit_u64<E>(self, v: u64) -> Result<Unique, E> {
                Ok(Unique(v.into()))
            }
            fn visit_f64<E>(self, v: f64) -> Result<Unique, E> {
                Ok(Unique(serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Unique, E> {
                Ok(Unique(Value::String(v.to_string())))
            }
            fn visit_string<E>(self, v: String) -> Result<Unique, E> {
                Ok(Unique(Value::String(v)))
            }
            fn visit_unit<E>(self) -> Result<Unique, E> {
                Ok(Unique(Value::Null))
            }
            fn visit_none<E>(self) -> Result<Unique, E> {
                Ok(Unique(Value::Null))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Unique, A::Error> {
                let mut items = Vec::new();
                while let Some(Unique(item)) = seq.next_element()? {
                    items.push(item);
                }
                Ok(Unique(Value::Array(items)))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<Unique, A::Error> {
                let mut members = Map::new();
                while let Some(key) = access.next_key::<String>()? {
                    if members.contains_key(&key) {
                        return Err(A::Error::custom(format_args!("duplicate key '{}'", clip(&key))));
                    }
                    let Unique(value) = access.next_value()?;
                    members.insert(key, value);
                }
                Ok(Unique(Value::Object(members)))
            }
        }
        deserializer.deserialize_any(V)
    }
}

impl<'de> Deserialize<'de> for StrictValue {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Ok(match Unique::deserialize(deserializer)?.0 {
            Value::Object(map) => StrictValue::Object(map),
            _ => StrictValue::Other,
        })
    }
}

/// What [`Framer`] cut from the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// One request's bytes (a JSON object or array, or a line of anything else), whitespace
    /// around it dropped.
    Request(Vec<u8>),
    /// A request longer than [`MAX_LINE`] bytes, dropped as it arrived.
    TooLong,
}

/// Cuts a client's byte stream into requests, as QMP's JSON streamer does: a JSON object (or
/// array) ends where its outermost brace closes, whatever the newlines — QMP clients need not
/// end a request with a newline, and `qemu.qmp` does not — while input that does not start
/// an object or array (`hello`, `42`) ends at the next newline, so that garbage costs one
/// error reply per line. Braces inside strings, and escaped quotes, do not count.
///
/// At most [`MAX_LINE`] bytes of one request are kept; a longer one is followed to its end
/// without being stored and reported as [`Frame::TooLong`].
#[derive(Debug, Default)]
pub struct Framer {
    buf: Vec<u8>,
    /// Whether a request has started (a non-whitespace byte was seen since the last one).
    started: bool,
    /// It started with `{` or `[`: it ends when `depth` is back to 0.
    composite: bool,
    depth: u64,
    in_string: bool,
    escaped: bool,
    /// Its bytes beyond [`MAX_LINE`] are being dropped.
    overlong: bool,
    /// Bytes in the current request (kept or not).
    len: usize,
}

impl Framer {
    /// A framer at the start of a stream.
    pub fn new() -> Self {
        Framer::default()
    }

    /// Takes `data`, appending each request it completes to `out`.
    pub fn push(&mut self, data: &[u8], out: &mut Vec<Frame>) {
        for &byte in data {
            if !self.started {
                if byte.is_ascii_whitespace() {
                    continue;
                }
                self.started = true;
                self.composite = byte == b'{' || byte == b'[';
            }
            if !self.composite && byte == b'\n' {
                out.push(self.take());
                continue;
            }
            self.len += 1;
            if self.len > MAX_LINE && !self.overlong {
                self.overlong = true;
                self.buf = Vec::new();
            }
            if !self.overlong {
                self.buf.push(byte);
            }
            let done = self.composite && {
                if self.in_string {
                    match (self.escaped, byte) {
                        (true, _) => self.escaped = false,
                        (false, b'\\') => self.escaped = true,
                        (false, b'"') => self.in_string = false,
                        _ => {}
                    }
                    false
                } else {
                    match byte {
                        b'"' => self.in_string = true,
                        b'{' | b'[' => self.depth += 1,
                        b'}' | b']' => self.depth = self.depth.saturating_sub(1),
                        _ => {}
                    }
                    self.depth == 0
                }
            };
            if done {
                out.push(self.take());
            }
        }
    }

    /// The end of the stream: what is left, if anything, as a last request.
    pub fn finish(&mut self) -> Option<Frame> {
        self.started.then(|| self.take())
    }

    fn take(&mut self) -> Frame {
        let frame = if self.overlong {
            Frame::TooLong
        } else {
            let mut bytes = std::mem::take(&mut self.buf);
            while bytes.last().is_some_and(u8::is_ascii_whitespace) {
                bytes.pop();
            }
            Frame::Request(bytes)
        };
        *self = Framer { buf: std::mem::take(&mut self.buf), ..Framer::default() };
        self.buf.clear();
        frame
    }
}

#[cfg(test)]
mod framer_tests {
    use super::*;

    fn frames(chunks: &[&[u8]]) -> Vec<Frame> {
        let mut f = Framer::new();
        let mut out = Vec::new();
        for c in chunks {
            f.push(c, &mut out);
        }
        out.extend(f.finish());
        out
    }

    fn req(s: &str) -> Frame {
        Frame::Request(s.as_bytes().to_vec())
    }

    #[test]
    fn objects_end_at_their_closing_brace_whatever_the_newlines() {
        assert_eq!(
            frames(&[
                br#"{"execute":"a"}{"execute":"b","arguments":{"x":"}{\"]"}}  "#,
                b"\n{\n\"execute\"",
                b":\"c\"}"
            ]),
            [
                req(r#"{"execute":"a"}"#),
                req(r#"{"execute":"b","arguments":{"x":"}{\"]"}}"#),
                req("{\n\"execute\":\"c\"}")
            ]
        );
        assert_eq!(frames(&[b"[1,[2]]\n"]), [req("[1,[2]]")]);
    }

    #[test]
    fn anything_else_ends_at_a_newline_or_the_end() {
        assert_eq!(
            frames(&[b"hello world\n42\n\n  \"x\"\n}\nlast"]),
            [req("hello world"), req("42"), req("\"x\""), req("}"), req("last")]
        );
        assert_eq!(frames(&[b"   \n\n"]), []);
        assert_eq!(frames(&[br#"{"execute":"unfinished""#]), [req(r#"{"execute":"unfinished""#)]);
    }

    #[test]
    fn a_request_longer_than_the_limit_is_dropped_and_the_next_one_kept() {
        let mut long = br#"{"execute":"x","pad":""#.to_vec();
        long.resize(MAX_LINE + 10, b'a');
        long.extend_from_slice(b"\"}");
        let mut f = Framer::new();
        let mut out = Vec::new();
        for piece in long.chunks(4096) {
            f.push(piece, &mut out);
            assert!(f.buf.len() <= MAX_LINE);
        }
        f.push(br#"{"execute":"next"}"#, &mut out);
        assert_eq!(out, [Frame::TooLong, req(r#"{"execute":"next"}"#)]);
        let exactly = vec![b'x'; MAX_LINE];
        let got = frames(&[&exactly, b"\n"]);
        assert!(
            matches!(&got[..], [Frame::Request(r)] if *r == exactly),
            "a request of exactly MAX_LINE bytes is kept"
        );
    }
}
