//! Tables and lines for people; scripts use `--json`.

use serde_json::Value;

/// The API's error body (`{"error": {"code", "message"}}`) as one line.
pub(crate) fn error_text(v: &Value) -> String {
    match (v["error"]["code"].as_str(), v["error"]["message"].as_str()) {
        (Some(c), Some(m)) => format!("{m} [{c}]"),
        _ if v.is_null() => "no answer body".into(),
        _ => v.to_string(),
    }
}

/// A value as a cell: strings without quotes, null as `-`.
fn cell(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Left-aligned columns, two spaces apart.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut width: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (w, c) in width.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let mut s = String::new();
        for (i, (c, w)) in cells.iter().zip(&width).enumerate() {
            if i + 1 == cells.len() {
                s += c;
            } else {
                s += &format!("{c:<w$}  ");
            }
        }
        s.trim_end().to_string() + "\n"
    };
    let mut out = line(header.iter().map(|h| h.to_string()).collect());
    for r in rows {
        out += &line(r.clone());
    }
    out
}

fn protocol(v: &Value) -> String {
    match v.as_u64() {
        Some(6) => "tcp".into(),
        Some(17) => "udp".into(),
        _ => cell(v),
    }
}

fn endpoint(addr: &Value, port: &Value) -> String {
    let a = cell(addr);
    if a.contains(':') {
        format!("[{a}]:{}", cell(port))
    } else {
        format!("{a}:{}", cell(port))
    }
}

fn mapping_row(m: &Value) -> Vec<String> {
    let ports = m["port_count"].as_u64().unwrap_or(1);
    let mut external = endpoint(&m["external_addr"], &m["external_port"]);
    if ports > 1 {
        external += &format!(" (+{})", ports - 1);
    }
    let mut kind = cell(&m["kind"]["type"]);
    if m["firewall"] == true {
        kind += " pinhole";
    }
    vec![
        cell(&m["id"]),
        kind,
        protocol(&m["protocol"]),
        endpoint(&m["internal_addr"], &m["internal_port"]),
        external,
        if m["expires"].is_null() {
            "never".into()
        } else {
            cell(&m["expires"])
        },
    ]
}

fn mapping_detail(m: &Value) -> String {
    let mut rows = vec![
        ("id", cell(&m["id"])),
        ("kind", mapping_row(m)[1].clone()),
        ("protocol", protocol(&m["protocol"])),
        (
            "internal",
            endpoint(&m["internal_addr"], &m["internal_port"]),
        ),
        (
            "external",
            endpoint(&m["external_addr"], &m["external_port"]),
        ),
        ("ports", cell(&m["port_count"])),
        ("created", cell(&m["created"])),
        (
            "expires",
            if m["expires"].is_null() {
                "never (static)".into()
            } else {
                cell(&m["expires"])
            },
        ),
    ];
    if let Some(extra) = m["extra"].as_object() {
        if let Some(d) = extra.get("description").filter(|d| !d.is_null()) {
            rows.push(("description", cell(d)));
        }
        if let Some(f) = extra
            .get("filters")
            .and_then(Value::as_array)
            .filter(|f| !f.is_empty())
        {
            rows.push(("filters", f.iter().map(cell).collect::<Vec<_>>().join(", ")));
        }
        if let Some(t) = extra.get("manager").filter(|t| !t.is_null()) {
            rows.push(("third party", cell(t)));
        }
    }
    rows.iter().map(|(k, v)| format!("{k:<12} {v}\n")).collect()
}

fn mappings_table(v: &Value) -> String {
    let items = v["items"].as_array().cloned().unwrap_or_default();
    let rows: Vec<Vec<String>> = items.iter().map(mapping_row).collect();
    let header = ["ID", "KIND", "PROTO", "INTERNAL", "EXTERNAL", "EXPIRES"];
    let mut out = table(&header, &rows);
    out += &format!(
        "{} of {} (offset {})\n",
        rows.len(),
        cell(&v["total"]),
        cell(&v["offset"])
    );
    out
}

fn subscriber_text(v: &Value) -> String {
    let blocks: Vec<String> = v["blocks"]
        .as_array()
        .map(|b| {
            b.iter()
                .map(|b| {
                    format!(
                        "{} {}-{}",
                        cell(&b["addr"]),
                        cell(&b["first_port"]),
                        cell(&b["last_port"])
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    let kind = if v["firewall"] == true {
        "firewall (pinholes)"
    } else {
        "nat"
    };
    let pool = match v["pool"].as_str() {
        Some("") | None => "-".to_string(),
        Some(p) => p.to_string(),
    };
    let blocks = if blocks.is_empty() {
        "-".to_string()
    } else {
        blocks.join(", ")
    };
    format!(
        "subscriber   {}\nkind         {kind}\npool         {pool}\nprofile      {}\nexternal     {}\nblocks       {blocks}\nmappings     {} of {}\n",
        cell(&v["internal_addr"]),
        cell(&v["profile"]),
        cell(&v["external_addr"]),
        cell(&v["mappings"]),
        cell(&v["max_mappings"]),
    )
}

fn pools_table(v: &Value) -> String {
    let rows: Vec<Vec<String>> = v["pools"]
        .as_array()
        .map(|p| {
            p.iter()
                .map(|p| {
                    let total = p["blocks_total"].as_f64().unwrap_or(0.0);
                    let used = p["blocks_allocated"].as_f64().unwrap_or(0.0);
                    let pct = if total > 0.0 {
                        100.0 * used / total
                    } else {
                        0.0
                    };
                    vec![
                        cell(&p["name"]),
                        cell(&p["mode"]),
                        cell(&p["addresses"]),
                        format!(
                            "{}/{}",
                            cell(&p["blocks_allocated"]),
                            cell(&p["blocks_total"])
                        ),
                        format!("{pct:.1}%"),
                        cell(&p["block_size"]),
                        cell(&p["draining_addresses"]),
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    let header = [
        "POOL",
        "MODE",
        "ADDRESSES",
        "BLOCKS",
        "USED",
        "BLOCK",
        "DRAINING",
    ];
    table(&header, &rows)
}

fn lookup_text(v: &Value) -> String {
    let b = &v["block"];
    let from = if v["from"].is_null() {
        "always (deterministic)".into()
    } else {
        cell(&v["from"])
    };
    let to = if v["to"].is_null() {
        "now".into()
    } else {
        cell(&v["to"])
    };
    format!(
        "{} at {}: {}\n  block {} {}-{}, held from {from} to {to}\n",
        cell(&v["external"]),
        cell(&v["at"]),
        cell(&v["internal_addr"]),
        cell(&b["addr"]),
        cell(&b["first_port"]),
        cell(&b["last_port"]),
    )
}

/// The human form of the answer to `path`.
pub(crate) fn human(path: &str, v: &Value) -> String {
    let route = path.split('?').next().unwrap_or(path);
    match route {
        "/v1/mappings" if v["items"].is_array() => mappings_table(v),
        r if r.starts_with("/v1/mappings") => mapping_detail(v),
        r if r.starts_with("/v1/subscribers/") => subscriber_text(v),
        "/v1/pools" => pools_table(v),
        "/v1/lookup" => lookup_text(v),
        "/v1/pools/drain" => format!(
            "{} draining: {} mappings moved\n",
            cell(&v["address"]),
            cell(&v["moved_mappings"])
        ),
        "/v1/pools/undrain" => format!("{} takes new blocks again\n", cell(&v["address"])),
        "/v1/reload" => format!("reloaded: {}\n", cell(&v["message"])),
        _ => format!("{v:#}\n"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_mapping_list_is_a_table_with_its_count() {
        let v = json!({"total": 2, "offset": 0, "limit": 100, "items": [
            {"id": "6-100.64.0.2-8080", "kind": {"type": "map"}, "protocol": 6,
             "internal_addr": "100.64.0.2", "internal_port": 8080,
             "external_addr": "192.0.2.1", "external_port": 40000, "port_count": 1,
             "expires": "2026-12-02T10:00:00Z", "firewall": false},
            {"id": "17-2001:db8::5-3478", "kind": {"type": "static"}, "protocol": 17,
             "internal_addr": "2001:db8::5", "internal_port": 3478,
             "external_addr": "2001:db8::5", "external_port": 3478, "port_count": 4,
             "expires": null, "firewall": true}
        ]});
        let t = human("/v1/mappings?limit=100", &v);
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].starts_with("ID"));
        assert!(lines[1].contains("tcp") && lines[1].contains("192.0.2.1:40000"));
        assert!(
            lines[2].contains("static pinhole") && lines[2].contains("[2001:db8::5]:3478 (+3)")
        );
        assert!(lines[2].ends_with("never"), "{t}");
        assert_eq!(lines[3], "2 of 2 (offset 0)");
    }

    #[test]
    fn errors_read_as_message_and_code() {
        let v = json!({"error": {"code": "not_found", "message": "mapping not found"}});
        assert_eq!(error_text(&v), "mapping not found [not_found]");
        assert_eq!(error_text(&Value::Null), "no answer body");
    }
}
