//! pcpd's YAML configuration: one file, unknown keys rejected, every
//! problem reported at once with its YAML path and line.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use pcp_engine::EngineConfig;
use serde::{Deserialize, Serialize};

mod dataplane;
pub use dataplane::*;

/// The whole configuration file.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// UDP addresses PCP and NAT-PMP are answered on (RFC 6887 §19.1: port 5351).
    #[serde(default = "default_listen")]
    pub listen: Vec<SocketAddr>,
    /// I/O and engine shards; 0 means one per core.
    #[serde(default)]
    pub shards: usize,
    /// Capacity of each shard's hand-off queue; when full, datagrams are
    /// dropped and counted (RFC 6887 §8.2 allows dropping under overload).
    #[serde(default = "default_queue")]
    pub handoff_queue: usize,
    /// The protocol engine: lifetimes, pools, subscribers, quotas, THIRD_PARTY, options.
    pub pcp: EngineConfig,
    /// Where mappings are installed.
    #[serde(default)]
    pub dataplane: DataplaneConfig,
    /// Directory for pcpd's durable state (journal, snapshots, epoch) and,
    /// by default, the NAT event log.
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// Journal size per shard, in MiB, that triggers a snapshot.
    #[serde(default = "default_journal_max_mib")]
    pub journal_max_mib: u64,
    /// Lifetimes beyond the granted one that the journal holds a mapping
    /// for, so that renewals within it write nothing (no client is ever
    /// told an expiry later than the journaled one; after a crash a
    /// mapping lives until its journaled expiry). 0: every renewal is
    /// written. Cluster mode has its own (`cluster.renewal_slack`).
    #[serde(default = "default_journal_renewal_slack")]
    pub journal_renewal_slack: u32,
    /// Admin REST API.
    #[serde(default)]
    pub admin: AdminConfig,
    /// Prometheus metrics endpoint.
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// Logging.
    #[serde(default)]
    pub log: LogConfig,
    /// Cluster mode on etcd (absent: a single node with its local journal).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<crate::cluster::config::ClusterConfig>,
}

fn default_listen() -> Vec<SocketAddr> {
    vec![
        SocketAddr::from(([127, 0, 0, 1], 5351)),
        SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, 5351)),
    ]
}
fn default_queue() -> usize {
    4096
}
fn default_journal_max_mib() -> u64 {
    64
}
fn default_journal_renewal_slack() -> u32 {
    2
}
fn default_state_dir() -> PathBuf {
    PathBuf::from("pcpd-state")
}

/// Admin API settings.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// TCP address of the API.
    #[serde(default = "default_admin_listen")]
    pub listen: SocketAddr,
    /// TLS; required unless the API listens on loopback and
    /// `allow_plaintext_on_loopback` is set.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// Serve plain HTTP when listening on a loopback address.
    #[serde(default)]
    pub allow_plaintext_on_loopback: bool,
    /// Bearer tokens, stored as SHA-256 hashes.
    #[serde(default)]
    pub tokens: Vec<TokenConfig>,
    /// A YAML file with more tokens (a list like `tokens`), e.g. a mounted
    /// Kubernetes Secret; read with the configuration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_file: Option<PathBuf>,
}

fn default_admin_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8351))
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: default_admin_listen(),
            tls: None,
            allow_plaintext_on_loopback: false,
            tokens: Vec::new(),
            tokens_file: None,
        }
    }
}

/// TLS material (PEM files).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// Certificate chain.
    pub cert: PathBuf,
    /// Private key.
    pub key: PathBuf,
    /// When set, clients must present a certificate signed by this CA.
    #[serde(default)]
    pub client_ca: Option<PathBuf>,
}

/// One API token.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    /// Who holds it (for logs).
    pub name: String,
    /// Hex SHA-256 of the token (`printf %s TOKEN | sha256sum`).
    pub sha256: String,
    /// What it may do.
    pub scope: Scope,
}

/// Token scopes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// GET endpoints.
    Read,
    /// Everything.
    Write,
}

/// Metrics endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// TCP address serving `/metrics`.
    #[serde(default = "default_metrics_listen")]
    pub listen: SocketAddr,
}

fn default_metrics_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9351))
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            listen: default_metrics_listen(),
        }
    }
}

/// Logging settings.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// Format of pcpd's own log on stderr.
    #[serde(default)]
    pub format: LogFormat,
    /// NAT event log (RFC 8158 events as JSON lines): a path, `-` for
    /// stdout, or absent for `<state_dir>/nat-events.jsonl`. The one sink
    /// when `nat_sinks` is absent.
    #[serde(default)]
    pub nat_events: Option<PathBuf>,
    /// Where NAT events go, several at once: `file` (JSON lines, rotated),
    /// `syslog` (RFC 5424 over UDP, TCP or TLS), `ipfix` (RFC 7011/8158).
    #[serde(default)]
    pub nat_sinks: Option<Vec<crate::natlog::SinkConfig>>,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Text,
            nat_events: None,
            nat_sinks: None,
        }
    }
}

/// Log formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// JSON lines.
    Json,
}

/// One configuration problem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// YAML path, e.g. `pcp.pools.cgnat.block_size`.
    pub path: String,
    /// 1-based line, when known.
    pub line: Option<usize>,
    /// What is wrong.
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.line {
            Some(l) => write!(f, "line {l}: {}: {}", self.path, self.message),
            None => write!(f, "{}: {}", self.path, self.message),
        }
    }
}

/// The built-in default: loopback only, in-memory dataplane, a local state
/// directory, plaintext admin API on loopback with a development token.
pub const DEFAULT_YAML: &str = include_str!("../default.yaml");

/// The development token of the built-in default (admin API on loopback only).
pub const DEFAULT_DEV_TOKEN: &str = "pcpd-dev-token";

impl Config {
    /// Parses and validates YAML text; `Err` lists every problem found.
    pub fn from_yaml(text: &str) -> Result<Config, Vec<Problem>> {
        let de = serde_yaml::Deserializer::from_str(text);
        let cfg: Config = match serde_path_to_error::deserialize(de) {
            Ok(c) => c,
            Err(e) => {
                let path = e.path().to_string();
                let inner = e.into_inner();
                let line = inner.location().map(|l| l.line());
                let message = inner.to_string();
                // serde_yaml appends " at line N column M"; keep the message short.
                let message = match message.find(" at line ") {
                    Some(i) => message[..i].to_string(),
                    None => message,
                };
                // serde_yaml also prefixes the path it knows.
                let message = match message.split_once(": ") {
                    Some((head, rest))
                        if !head.contains(' ')
                            && path.ends_with(head.rsplit('.').next().unwrap_or(head)) =>
                    {
                        rest.to_string()
                    }
                    _ => message,
                };
                return Err(vec![Problem {
                    path: if path == "." {
                        "(top level)".into()
                    } else {
                        path
                    },
                    line,
                    message,
                }]);
            }
        };
        let mut problems: Vec<Problem> = cfg
            .pcp
            .validate()
            .into_iter()
            .map(|p| Problem {
                path: format!("pcp.{}", p.path),
                line: None,
                message: p.message,
            })
            .collect();
        problems.extend(cfg.validate_daemon());
        let mut cfg = cfg;
        // Cluster mode: the engine sees one class and one pool per partition.
        if problems.is_empty() {
            problems.extend(crate::cluster::config::apply(&mut cfg));
        }
        if let Some(file) = cfg.admin.tokens_file.clone() {
            match read_tokens(&file) {
                Ok(tokens) => cfg.admin.tokens.extend(tokens),
                Err(e) => problems.push(Problem {
                    path: "admin.tokens_file".into(),
                    line: None,
                    message: e.to_string(),
                }),
            }
        }
        for p in &mut problems {
            p.line = line_of(text, &p.path);
        }
        if problems.is_empty() {
            Ok(cfg)
        } else {
            Err(problems)
        }
    }

    /// Reads and checks a file.
    pub fn load(path: &Path) -> Result<Config, Vec<Problem>> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            vec![Problem {
                path: path.display().to_string(),
                line: None,
                message: format!("cannot read: {e}"),
            }]
        })?;
        Self::from_yaml(&text)
    }

    /// The built-in default configuration.
    pub fn builtin() -> Config {
        match Self::from_yaml(DEFAULT_YAML) {
            Ok(c) => c,
            // The default is checked by a unit test; this cannot happen.
            Err(p) => unreachable!("built-in default config is invalid: {p:?}"),
        }
    }

    fn validate_daemon(&self) -> Vec<Problem> {
        let mut p = Vec::new();
        let mut err = |path: &str, message: String| {
            p.push(Problem {
                path: path.into(),
                line: None,
                message,
            })
        };
        if self.listen.is_empty() {
            err("listen", "at least one address is needed".into());
        }
        if self.shards > 256 {
            err("shards", format!("{} is more than 256", self.shards));
        }
        if self.journal_max_mib == 0 {
            err("journal_max_mib", "must be at least 1".into());
        }
        if self.journal_renewal_slack > 16 {
            err(
                "journal_renewal_slack",
                format!(
                    "{} is more than 16 (a crashed node would keep mappings 16 lifetimes past what was granted)",
                    self.journal_renewal_slack
                ),
            );
        }
        if self.handoff_queue == 0 {
            err("handoff_queue", "must be at least 1".into());
        }
        self.validate_admin(&mut err);
        if self.admin.listen == self.metrics.listen {
            err("metrics.listen", "must differ from admin.listen".into());
        }
        self.dataplane.validate(&self.pcp, &mut err);
        if let Some(sinks) = &self.log.nat_sinks {
            if self.log.nat_events.is_some() {
                err(
                    "log.nat_events",
                    "give the file as a `type: file` entry of log.nat_sinks instead".into(),
                );
            }
            crate::natlog::validate(sinks, &mut err);
        }
        p
    }

    fn validate_admin(&self, err: &mut impl FnMut(&str, String)) {
        let a = &self.admin;
        let loopback = a.listen.ip().is_loopback();
        if a.tls.is_none() && !(loopback && a.allow_plaintext_on_loopback) {
            err(
                "admin.tls",
                "TLS is required (plaintext is allowed only on loopback with allow_plaintext_on_loopback: true)".into(),
            );
        }
        if let Some(tls) = &a.tls {
            for (name, file) in [
                ("cert", Some(&tls.cert)),
                ("key", Some(&tls.key)),
                ("client_ca", tls.client_ca.as_ref()),
            ] {
                if let Some(file) = file {
                    if !file.exists() {
                        err(
                            &format!("admin.tls.{name}"),
                            format!("{} does not exist", file.display()),
                        );
                    }
                }
            }
        }
        for (i, t) in a.tokens.iter().enumerate() {
            if t.sha256.len() != 64 || !t.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
                err(
                    &format!("admin.tokens[{i}].sha256"),
                    "must be 64 hex digits (printf %s TOKEN | sha256sum)".into(),
                );
            }
        }
    }

    /// Whether every listen address is loopback (no packet leaves the host).
    pub fn loopback_only(&self) -> bool {
        self.listen.iter().all(|a| a.ip().is_loopback())
    }

    /// The shard count to run.
    pub fn shard_count(&self) -> usize {
        if self.shards == 0 {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        } else {
            self.shards
        }
    }

    /// Where NAT events go: `log.nat_sinks`, else the one file (or
    /// stdout) of `log.nat_events`.
    pub fn nat_sinks(&self) -> Vec<crate::natlog::SinkConfig> {
        use crate::natlog::{FileSinkConfig, SinkConfig};
        match &self.log.nat_sinks {
            Some(s) => s.clone(),
            None => {
                let path = self.nat_event_path().unwrap_or_else(|| PathBuf::from("-"));
                vec![SinkConfig::File(FileSinkConfig::at(path))]
            }
        }
    }

    /// The NAT event log destination (`None`: stdout).
    pub fn nat_event_path(&self) -> Option<PathBuf> {
        match &self.log.nat_events {
            Some(p) if p.as_os_str() == "-" => None,
            Some(p) => Some(p.clone()),
            None => Some(self.state_dir.join("nat-events.jsonl")),
        }
    }
}

/// Why `admin.tokens_file` was refused.
#[derive(Debug, thiserror::Error)]
enum TokensFileError {
    #[error("{0}: {1}")]
    Read(String, std::io::Error),
    #[error("{0}: {1}")]
    Parse(String, serde_yaml::Error),
    #[error("{0}: [{1}].sha256 must be 64 hex digits (printf %s TOKEN | sha256sum)")]
    BadHash(String, usize),
}

/// Tokens from `admin.tokens_file`, checked like inline ones.
fn read_tokens(file: &Path) -> Result<Vec<TokenConfig>, TokensFileError> {
    let name = || file.display().to_string();
    let text = std::fs::read_to_string(file).map_err(|e| TokensFileError::Read(name(), e))?;
    let tokens: Vec<TokenConfig> =
        serde_yaml::from_str(&text).map_err(|e| TokensFileError::Parse(name(), e))?;
    for (i, t) in tokens.iter().enumerate() {
        if t.sha256.len() != 64 || !t.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(TokensFileError::BadHash(name(), i));
        }
    }
    Ok(tokens)
}

/// Best-effort line of a dotted YAML path in block-style text: follows keys
/// by indentation, ignoring list indices.
fn line_of(text: &str, path: &str) -> Option<usize> {
    let keys: Vec<&str> = path
        .split('.')
        .map(|k| k.split('[').next().unwrap_or(k))
        .filter(|k| !k.is_empty())
        .collect();
    let mut want = 0;
    let mut found = None;
    let mut min_indent = 0;
    for (n, line) in text.lines().enumerate() {
        if want == keys.len() {
            break;
        }
        let trimmed = line.trim_start_matches([' ', '-']);
        let indent = line.len() - trimmed.len();
        if trimmed.starts_with('#') || trimmed.is_empty() {
            continue;
        }
        if found.is_some() && indent < min_indent {
            break;
        }
        let key = trimmed
            .split(':')
            .next()
            .unwrap_or("")
            .trim()
            .trim_matches('"');
        if key == keys[want] && indent >= min_indent {
            found = Some(n + 1);
            want += 1;
            min_indent = indent + 1;
        }
    }
    found
}

/// Hex SHA-256 of a token.
pub fn token_hash(token: &str) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(token.as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_default_is_valid_and_loopback_only() {
        let cfg = Config::from_yaml(DEFAULT_YAML).unwrap();
        assert!(cfg.loopback_only());
        assert!(cfg.admin.listen.ip().is_loopback());
        assert_eq!(cfg.admin.tokens[0].sha256, token_hash(DEFAULT_DEV_TOKEN));
        assert!(
            cfg.pcp.unsolicited.announce_targets.is_empty(),
            "no multicast from the loopback default"
        );
    }

    #[test]
    fn unknown_keys_are_rejected_everywhere() {
        // Add a stray key to every table of the default and expect rejection
        // naming that table (hickory-dns' config test).
        let base: serde_yaml::Value = serde_yaml::from_str(DEFAULT_YAML).unwrap();
        let mut tables = Vec::new();
        fn walk(v: &serde_yaml::Value, path: Vec<String>, out: &mut Vec<Vec<String>>) {
            if let serde_yaml::Value::Mapping(m) = v {
                out.push(path.clone());
                for (k, child) in m {
                    let key = k.as_str().unwrap_or_default().to_string();
                    let mut p = path.clone();
                    p.push(key);
                    walk(child, p, out);
                }
            }
        }
        walk(&base, Vec::new(), &mut tables);
        assert!(tables.len() > 10, "{tables:?}");
        for table in tables {
            // Map-of-name tables (pools, profiles) take any key as a name.
            if matches!(table.last().map(String::as_str), Some("pools" | "profiles")) {
                continue;
            }
            let mut v = base.clone();
            let mut cur = &mut v;
            for k in &table {
                cur = cur.get_mut(k.as_str()).unwrap();
            }
            cur.as_mapping_mut()
                .unwrap()
                .insert("bogus_key".into(), 1.into());
            let text = serde_yaml::to_string(&v).unwrap();
            let errs = Config::from_yaml(&text).unwrap_err();
            assert!(errs[0].message.contains("bogus_key"), "{table:?}: {errs:?}");
            assert!(errs[0].line.is_some(), "{table:?}: {errs:?}");
        }
    }

    #[test]
    fn every_problem_is_reported_with_path_and_line() {
        let text = DEFAULT_YAML
            .replace("block_size: 512", "block_size: 0")
            .replace("max_blocks: 4", "max_blocks: 0");
        let errs = Config::from_yaml(&text).unwrap_err();
        let paths: Vec<&str> = errs.iter().map(|p| p.path.as_str()).collect();
        assert!(paths.contains(&"pcp.pools.default.block_size"), "{errs:?}");
        assert!(
            paths.contains(&"pcp.profiles.residential.max_blocks"),
            "{errs:?}"
        );
        let block = errs
            .iter()
            .find(|p| p.path == "pcp.pools.default.block_size")
            .unwrap();
        let line = block.line.unwrap();
        assert!(text
            .lines()
            .nth(line - 1)
            .unwrap()
            .contains("block_size: 0"));
        // Type errors carry the path too.
        let errs = Config::from_yaml(&DEFAULT_YAML.replace("block_size: 512", "block_size: big"))
            .unwrap_err();
        assert_eq!(errs[0].path, "pcp.pools.default.block_size");
        assert!(errs[0].line.is_some());
    }

    #[test]
    fn overlapping_prefixes_and_plaintext_admin_are_refused() {
        let text = DEFAULT_YAML.replace(
            "- 100.64.0.0/10",
            "- 100.64.0.0/10\n        - 100.64.1.0/24",
        );
        let errs = Config::from_yaml(&text).unwrap_err();
        assert!(
            errs.iter().any(|p| p.message.contains("overlaps")),
            "{errs:?}"
        );
        let text = DEFAULT_YAML.replace("listen: 127.0.0.1:8351", "listen: 0.0.0.0:8351");
        let errs = Config::from_yaml(&text).unwrap_err();
        assert!(errs.iter().any(|p| p.path == "admin.tls"), "{errs:?}");
    }

    #[test]
    fn reload_refuses_pool_changes() {
        let a = Config::builtin();
        let mut b = a.clone();
        b.pcp.lifetimes.max = 3600;
        assert_eq!(a.reload_conflict(&b), None);
        b.pcp.pools.get_mut("default").unwrap().block_size = 256;
        assert!(a
            .reload_conflict(&b)
            .unwrap()
            .to_string()
            .contains("pcp.pools"));
        // The NAT log's sinks are open: a change needs a restart.
        let mut c = a.clone();
        c.log.nat_events = Some("/var/log/elsewhere.jsonl".into());
        assert_eq!(
            a.reload_conflict(&c),
            Some(crate::reload::ReloadConflict::NatLog)
        );
    }
}

#[cfg(test)]
mod doc_tests {
    /// docs/configuration.md names every key of the built-in default.
    #[test]
    fn configuration_reference_covers_every_key() {
        let doc = include_str!("../../../../docs/configuration.md");
        let v: serde_yaml::Value =
            serde_yaml::from_str(super::DEFAULT_YAML).expect("default parses");
        fn keys(v: &serde_yaml::Value, out: &mut Vec<String>) {
            match v {
                serde_yaml::Value::Mapping(m) => {
                    for (k, child) in m {
                        out.push(k.as_str().unwrap_or_default().to_string());
                        keys(child, out);
                    }
                }
                serde_yaml::Value::Sequence(s) => s.iter().for_each(|c| keys(c, out)),
                _ => {}
            }
        }
        let mut all = Vec::new();
        keys(&v, &mut all);
        // Names an operator chooses, not keys of the schema.
        let chosen = ["default", "residential", "dev"];
        // Every word inside backticks, split on the path separators.
        let words: std::collections::BTreeSet<&str> = doc
            .split('`')
            .skip(1)
            .step_by(2)
            .flat_map(|span| span.split(['.', '[', ']', '<', '>', ' ', ',', '{', '}', ':']))
            .collect();
        for k in all.iter().filter(|k| !chosen.contains(&k.as_str())) {
            assert!(
                words.contains(k.as_str()),
                "docs/configuration.md lacks `{k}`"
            );
        }
    }
}
