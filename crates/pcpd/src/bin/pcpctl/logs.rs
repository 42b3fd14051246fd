//! `pcpctl lookup ... --logs FILE...`: "who had this external address and
//! port at time T", answered from NAT event logs (the file sink's JSON
//! lines, rotated files included) instead of pcpd's live state: for a
//! lawful request about a time older than pcpd's retained history
//! (`history_retention_secs`), or about a node that is gone.

use std::net::{IpAddr, SocketAddrV4};
use std::path::PathBuf;

use serde_json::{json, Value};

use crate::Failure;

/// One holding of a port block, from its allocation to its release.
struct Held {
    subscriber: IpAddr,
    addr: String,
    first: u16,
    last: u16,
    from_ms: u64,
    to_ms: Option<u64>,
}

fn rfc3339(ms: u64) -> String {
    crate::rfc3339::format_ms(ms).unwrap_or_default()
}

/// `at` (RFC 3339) in Unix ms; now when absent.
fn at_ms(at: Option<&str>) -> Result<u64, Failure> {
    match at {
        None => Ok(crate::rfc3339::now_ms()),
        Some(s) => crate::rfc3339::parse_ms(s).map_err(|e| Failure::new(2, format!("--at {e}"))),
    }
}

/// Every holding of a block covering `addr:port` in `files`, and how many
/// lines were read.
fn holdings(files: &[PathBuf], addr: &str, port: u16) -> Result<(Vec<Held>, u64), Failure> {
    let mut held: Vec<Held> = Vec::new();
    let mut lines = 0u64;
    for f in files {
        let text = std::fs::read_to_string(f)
            .map_err(|e| Failure::new(2, format!("{}: {e}", f.display())))?;
        for line in text.lines() {
            lines += 1;
            let Ok(e) = serde_json::from_str::<Value>(line) else {
                continue;
            };
            let alloc = match e["event"].as_str() {
                Some("port_block_allocation") => true,
                Some("port_block_deallocation") => false,
                _ => continue,
            };
            let (Some(first), Some(last)) =
                (e["portRangeStart"].as_u64(), e["portRangeEnd"].as_u64())
            else {
                continue;
            };
            if e["postNATSourceIPv4Address"] != addr || !(first..=last).contains(&u64::from(port)) {
                continue;
            }
            let Some(sub) = e["sourceAddress"].as_str().and_then(|s| s.parse().ok()) else {
                continue;
            };
            let ms = e["timeStamp"].as_u64().unwrap_or(0);
            let (first, last) = (first as u16, last as u16);
            if alloc {
                held.push(Held {
                    subscriber: sub,
                    addr: addr.to_string(),
                    first,
                    last,
                    from_ms: ms,
                    to_ms: None,
                });
            } else if let Some(h) = held
                .iter_mut()
                .rev()
                .find(|h| h.subscriber == sub && h.first == first && h.to_ms.is_none())
            {
                h.to_ms = Some(ms);
            }
        }
    }
    Ok((held, lines))
}

/// Who held `external` at `at`, from the port-block events in `files`.
pub(crate) fn lookup(
    external: &str,
    at: Option<&str>,
    files: &[PathBuf],
) -> Result<Value, Failure> {
    let ext: SocketAddrV4 = external
        .parse()
        .map_err(|_| Failure::new(2, format!("{external:?}: give IPv4:PORT")))?;
    let t = at_ms(at)?;
    let (held, lines) = holdings(files, &ext.ip().to_string(), ext.port())?;
    let hit = held
        .iter()
        .rev()
        .find(|h| h.from_ms <= t && h.to_ms.is_none_or(|to| t < to));
    match hit {
        Some(h) => Ok(json!({
            "external": external,
            "at": rfc3339(t),
            "internal_addr": h.subscriber,
            "block": {"addr": h.addr, "first_port": h.first, "last_port": h.last},
            "from": rfc3339(h.from_ms),
            "to": h.to_ms.map(rfc3339),
            "source": "logs",
        })),
        None => Err(Failure::new(
            3,
            format!(
                "no port block held {external} at {} in {lines} lines of {} file(s)",
                rfc3339(t),
                files.len()
            ),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_holder_at_a_time_from_allocation_and_release_events() {
        let dir = std::env::temp_dir().join(format!("pcpctl-logs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ev = |event: &str, sub: &str, ms: u64| {
            format!(
                r#"{{"event":"{event}","natEvent":16,"sourceAddress":"{sub}","postNATSourceIPv4Address":"192.0.2.7","portRangeStart":1024,"portRangeEnd":1535,"timeStamp":{ms}}}"#
            )
        };
        let old = dir.join("nat.jsonl.1");
        let new = dir.join("nat.jsonl");
        std::fs::write(
            &old,
            [
                ev("port_block_allocation", "100.64.0.1", 1_000_000),
                ev("port_block_deallocation", "100.64.0.1", 2_000_000),
            ]
            .join("\n"),
        )
        .unwrap();
        std::fs::write(
            &new,
            ev("port_block_allocation", "100.64.0.2", 3_000_000) + "\n",
        )
        .unwrap();
        let files = [old, new];
        let at = |ms: u64| rfc3339(ms);
        let first = lookup("192.0.2.7:1100", Some(&at(1_500_000)), &files).unwrap();
        assert_eq!(first["internal_addr"], "100.64.0.1");
        assert_eq!(first["to"], at(2_000_000));
        let second = lookup("192.0.2.7:1100", Some(&at(3_500_000)), &files).unwrap();
        assert_eq!(
            (second["internal_addr"].as_str(), &second["to"]),
            (Some("100.64.0.2"), &Value::Null)
        );
        // Between the two holders, and outside the block: nobody.
        assert_eq!(
            lookup("192.0.2.7:1100", Some(&at(2_500_000)), &files)
                .unwrap_err()
                .code,
            3
        );
        assert_eq!(
            lookup("192.0.2.7:2000", Some(&at(1_500_000)), &files)
                .unwrap_err()
                .code,
            3
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
