//! The config parser on arbitrary text: `Config::from_text` (what `load` runs on a file's
//! contents) must return a config or an error naming a key, never panic (a bad file at start or on HUP is an error message, not a
//! crash of the master). The master's config module is a binary-crate module, so it is
//! included here by path with the two modules it calls into.
#![no_main]
#![allow(dead_code)]

#[path = "../../src/cli.rs"]
mod cli;
#[path = "../../src/config.rs"]
mod config;
#[path = "../../src/registry.rs"]
mod registry;
#[path = "../../src/privileges.rs"]
mod privileges;
#[path = "../../src/sockets.rs"]
mod sockets;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Err(e) = config::Config::from_text(text, "fuzz.toml", Vec::new(), &[]) {
        // Every error says where: a key, or the file's syntax.
        assert!(!e.to_string().is_empty());
    }
});
