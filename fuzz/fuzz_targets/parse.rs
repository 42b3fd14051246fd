//! Fuzz target: parsing any datagram never panics, and whatever parses
//! re-emits to bytes that parse to the same value (parse -> emit -> parse is
//! the identity). Error responses built from any input stay within limits.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pcp_wire::{natpmp, parse_request, pcp, Disposition, Message, Response, ResultCode};

fuzz_target!(|data: &[u8]| {
    let mut out = [0u8; 1100];
    match parse_request(data) {
        Ok(Message::Pcp(req)) => {
            let n = req.emit(&mut out).expect("a parsed request re-emits");
            assert_eq!(n, data.len(), "emit keeps the length");
            let again = parse_request(&out[..n]).expect("re-emitted request parses");
            assert_eq!(again, Message::Pcp(req));
        }
        Ok(Message::NatPmp(req)) => {
            let n = req.emit(&mut out).expect("a parsed NAT-PMP request re-emits");
            assert_eq!(n, data.len(), "emit keeps the length");
            // Reserved octets are ignored on parse and zeroed on emit, so the
            // identity holds on values, not bytes.
            let again = parse_request(&out[..n]).expect("re-emitted request parses");
            assert_eq!(again, Message::NatPmp(req));
        }
        Err(e) => match e.disposition() {
            Disposition::Drop => {}
            Disposition::PcpError(code) => {
                let n = pcp::emit_error_response(data, code, 1800, 1, false, &mut out)
                    .expect("error response fits");
                assert!(n <= 1100 && n % 4 == 0 && n >= 24);
                assert!(n <= data.len().max(24) + 3, "never amplifies");
                let h = pcp_wire::ResponseHeader::parse(&out[..n]).expect("error response parses");
                assert_eq!(h.result, code);
                assert_ne!(code, ResultCode::Success);
            }
            Disposition::NatPmpError(_) => {
                let n = natpmp::emit_unsupported_opcode(data, &mut out).expect("fits");
                assert!(n <= data.len().max(4));
            }
        },
    }
    if let Ok(resp) = Response::parse(data) {
        let n = resp.emit(&mut out).expect("a parsed response re-emits");
        assert_eq!(Response::parse(&out[..n]).expect("re-parses"), resp);
    }
    if let Ok(resp) = natpmp::Response::parse(data) {
        let n = resp.emit(&mut out).expect("fits");
        assert_eq!(natpmp::Response::parse(&out[..n]).expect("re-parses"), resp);
    }
});
