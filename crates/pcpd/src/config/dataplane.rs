//! `dataplane:`: where mappings are installed, and what the nftables
//! backend can realise (NAT44 and firewall classes; no NAT64).

use std::path::PathBuf;

use pcp_engine::config::ClassKind;
use pcp_engine::EngineConfig;
use serde::{Deserialize, Serialize};

/// Dataplane selection.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DataplaneConfig {
    /// Backend.
    #[serde(default)]
    pub backend: DataplaneBackend,
    /// Settings of the nftables backend.
    #[serde(default)]
    pub nftables: NftablesConfig,
}

/// Dataplane backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DataplaneBackend {
    /// In memory only: tests and dry runs.
    #[default]
    Memory,
    /// The kernel's NAT through nftables (needs CAP_NET_ADMIN).
    Nftables,
}

/// The nftables backend: pcpd owns one table and nothing else.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NftablesConfig {
    /// Name of the `ip` table pcpd owns (created if missing).
    #[serde(default = "default_nft_table")]
    pub table: String,
    /// The nft program.
    #[serde(default = "default_nft")]
    pub nft: PathBuf,
    /// The firewall part: what happens to unsolicited inbound traffic
    /// toward firewall classes (RFC 6887 §3 pinholes, RFC 6092 policy).
    #[serde(default)]
    pub firewall: FirewallSettings,
}

impl Default for NftablesConfig {
    fn default() -> Self {
        NftablesConfig {
            table: default_nft_table(),
            nft: default_nft(),
            firewall: FirewallSettings::default(),
        }
    }
}

/// How the nftables backend guards firewall classes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FirewallSettings {
    /// `drop` (default): pcpd drops unsolicited inbound traffic to firewall
    /// classes itself. `mark`: pcpd only marks what its pinholes let in,
    /// and the operator's own forward policy must drop the rest.
    #[serde(default)]
    pub unsolicited: UnsolicitedPolicy,
    /// Mark bits set on traffic a pinhole lets in (both policies).
    #[serde(default = "default_fw_mark")]
    pub mark: u32,
}

impl Default for FirewallSettings {
    fn default() -> Self {
        FirewallSettings {
            unsolicited: UnsolicitedPolicy::default(),
            mark: default_fw_mark(),
        }
    }
}

fn default_fw_mark() -> u32 {
    0x0010_0000
}

/// What happens to inbound traffic no pinhole allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum UnsolicitedPolicy {
    /// Dropped by pcpd (safe: protected as soon as pcpd runs).
    #[default]
    Drop,
    /// Marked if let in, otherwise left to the operator's rules.
    Mark,
}

fn default_nft_table() -> String {
    "pcpd".into()
}
fn default_nft() -> PathBuf {
    PathBuf::from("nft")
}

impl DataplaneConfig {
    /// What the nftables backend cannot realise, by YAML path.
    pub(super) fn validate(&self, pcp: &EngineConfig, err: &mut impl FnMut(&str, String)) {
        if self.backend == DataplaneBackend::Nftables {
            let t = &self.nftables.table;
            if t.is_empty() || !t.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
                err(
                    "dataplane.nftables.table",
                    format!("{t:?}: letters, digits and _ only"),
                );
            }
            // What the nftables backend can translate: NAT44 of TCP and UDP.
            for (i, proto) in pcp.protocols.iter().enumerate() {
                if !matches!(proto, 6 | 17) {
                    err(
                        &format!("pcp.protocols[{i}]"),
                        format!(
                            "{proto}: the nftables backend translates TCP (6) and UDP (17) only"
                        ),
                    );
                }
            }
            // NAT44 and firewall classes are realised in nftables; Linux
            // netfilter has no NAT64, so an IPv6 NAT class is not.
            for (i, class) in pcp.subscribers.iter().enumerate() {
                if class.kind == ClassKind::Firewall {
                    continue;
                }
                for (j, prefix) in class.prefixes.iter().enumerate() {
                    if prefix.addr().is_ipv6() {
                        err(
                            &format!("pcp.subscribers[{i}].prefixes[{j}]"),
                            format!("{prefix}: the nftables backend translates IPv4 subscribers (NAT44) only; Linux netfilter has no NAT64 (use the memory backend), and IPv6 pinholes need `kind: firewall`"),
                        );
                    }
                }
            }
            if self.nftables.firewall.mark == 0 {
                err(
                    "dataplane.nftables.firewall.mark",
                    "must have at least one bit set".into(),
                );
            }
        }
    }
}
