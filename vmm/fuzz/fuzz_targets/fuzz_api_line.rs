//! One control-API request line (arbitrary bytes) through `api::handle_bytes` against a fake VM:
//! exactly one well-formed reply line, the id echoed, and the VM called at most once, only for a
//! well-formed request (per an independent oracle of the protocol) and with its arguments.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../../tests/parsers/support/mod.rs"]
mod support;

fuzz_target!(|data: &[u8]| {
    support::check_api_line(data);
});
