//! Fuzz target: any YAML as the engine's configuration. Parsing and
//! validation never panic, every problem names its YAML path, and a
//! configuration that validates compiles (and its pools can be built).
#![no_main]

use libfuzzer_sys::fuzz_target;
use pcp_engine::{BlockAllocator, Compiled, EngineConfig};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(cfg) = serde_yaml::from_str::<EngineConfig>(text) else {
        return;
    };
    let problems = cfg.validate();
    for p in &problems {
        assert!(!p.path.is_empty(), "a problem without a path: {p:?}");
        assert!(!p.message.is_empty(), "a problem without a message: {p:?}");
    }
    if problems.is_empty() {
        let pools = BlockAllocator::new(&cfg);
        Compiled::new(cfg, &pools).expect("a valid configuration compiles");
    }
});
