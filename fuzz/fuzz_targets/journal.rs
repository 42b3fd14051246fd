//! Fuzz target: any bytes as a snapshot or journal file. Decoding never
//! panics; it either yields records or names the offset of the damage.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (kind, bytes) = match data.split_first() {
        Some((k, rest)) => (*k, rest),
        None => return,
    };
    let journal = kind & 1 == 1;
    // Half the inputs get a valid header, so the records themselves are
    // reached; the other half test the header checks.
    let mut file = Vec::new();
    if kind & 2 == 2 {
        file.extend_from_slice(match (journal, kind & 4 == 4) {
            (true, false) => b"PCPJRNL1",
            (true, true) => b"PCPJRNL2",
            (false, _) => b"PCPSNAP1",
        });
        file.extend_from_slice(&7u64.to_be_bytes());
    }
    file.extend_from_slice(bytes);
    match pcp_store::decode_file(&file, journal) {
        Ok(decoded) => {
            if let Some(at) = decoded.torn_at {
                assert!(journal, "only a journal has a torn tail");
                assert!(at <= file.len() as u64);
            }
        }
        Err((offset, reason)) => {
            assert!(offset <= file.len() as u64, "damage past the end");
            assert!(!reason.is_empty());
        }
    }
});
