//! `pcpctl`: the operator's command line over pcpd's admin API
//! (docs/openapi.json): mappings, subscribers, pools, "who had this
//! address and port", drain, reload and health.
//!
//! The token comes from `PCPD_TOKEN`, or from the file named by
//! `--token-file` / `PCPD_TOKEN_FILE`; never from a flag, so it stays out
//! of shell history and `ps`. Output is a table for people, or the API's
//! JSON with `--json`. Exit codes (stable, for scripts):
//!
//! | code | meaning |
//! |---|---|
//! | 0 | done |
//! | 1 | the API refused the request (4xx other than below) |
//! | 2 | bad command line |
//! | 3 | not found (404) |
//! | 4 | no token, or the token was refused (401, 403) |
//! | 5 | pcpd unreachable, TLS failure, or pcpd not able now (5xx, 503): retry later |

mod logs;
mod output;
#[path = "../../rfc3339.rs"]
mod rfc3339;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use serde_json::{json, Value};

/// pcpd's admin API from the command line.
#[derive(Parser, Debug)]
#[command(name = "pcpctl", version, about, after_help = AFTER_HELP)]
struct Cli {
    /// The admin API's base URL.
    #[arg(long, env = "PCPD_URL", default_value = "http://127.0.0.1:8351")]
    url: String,
    /// A file holding the bearer token (else `PCPD_TOKEN`).
    #[arg(long, env = "PCPD_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// PEM CA certificate(s) to trust for an https URL (default: the
    /// system's, /etc/ssl/certs/ca-certificates.crt).
    #[arg(long, env = "PCPD_CA")]
    ca: Option<PathBuf>,
    /// PEM client certificate, when the API requires one (admin.tls.client_ca).
    #[arg(long, env = "PCPD_CERT", requires = "key")]
    cert: Option<PathBuf>,
    /// PEM private key of `--cert`.
    #[arg(long, env = "PCPD_KEY", requires = "cert")]
    key: Option<PathBuf>,
    /// Print the API's JSON instead of a table.
    #[arg(long, global = true)]
    json: bool,
    /// Seconds to wait for an answer.
    #[arg(long, default_value_t = 10)]
    timeout: u64,
    #[command(subcommand)]
    command: Command,
}

const AFTER_HELP: &str = "The token: PCPD_TOKEN, or --token-file / PCPD_TOKEN_FILE.\n\
Exit codes: 0 done, 1 refused, 2 usage, 3 not found, 4 token missing or refused, 5 unreachable or try later.";

#[derive(Subcommand, Debug)]
enum Command {
    /// Mappings: list, get, create static, delete.
    #[command(subcommand)]
    Mappings(MappingsCmd),
    /// One subscriber's usage: blocks, mappings, quota.
    Subscriber {
        /// The subscriber's internal address.
        addr: String,
    },
    /// Pool usage.
    Pools,
    /// Who had external ADDR:PORT (now, or at --at): for lawful requests.
    Lookup {
        /// External address and port, e.g. 192.0.2.7:40123.
        external: String,
        /// A moment in RFC 3339, e.g. 2026-11-30T21:14:05Z (default: now).
        #[arg(long)]
        at: Option<String>,
        /// Answer from these NAT event log files (JSON lines, rotated ones
        /// too) instead of pcpd's live state and retained history.
        #[arg(long, num_args = 1..)]
        logs: Vec<PathBuf>,
    },
    /// Move subscribers off an external address (RFC 6887 §14.2 updates).
    Drain {
        /// The external address.
        addr: String,
    },
    /// Let an address take new blocks again.
    Undrain {
        /// The external address.
        addr: String,
    },
    /// Re-read the configuration file.
    Reload,
    /// Liveness and readiness (no token needed).
    Health,
}

#[derive(Subcommand, Debug)]
enum MappingsCmd {
    /// List mappings, optionally filtered.
    List {
        /// Only this subscriber's.
        #[arg(long)]
        subscriber: Option<String>,
        /// Only those on this external address.
        #[arg(long)]
        external: Option<String>,
        /// Only this protocol (tcp, udp or a number).
        #[arg(long)]
        protocol: Option<String>,
        /// At most this many (1-10000).
        #[arg(long, default_value_t = 100)]
        limit: u32,
        /// Skip this many.
        #[arg(long, default_value_t = 0)]
        offset: u32,
    },
    /// One mapping by id (as `list` shows it).
    Get {
        /// The mapping id, e.g. 6-100.64.0.2-8080.
        id: String,
    },
    /// Create a static mapping (RFC 6887 §11.3 item 2: PCP cannot change it).
    Create {
        /// Internal address and port, e.g. 100.64.0.2:8080 or [2001:db8::5]:22.
        internal: String,
        /// tcp, udp or a protocol number.
        #[arg(long, default_value = "tcp")]
        protocol: String,
        /// The external port wanted (a hint; 0: any).
        #[arg(long, default_value_t = 0)]
        external_port: u16,
    },
    /// Delete a mapping by id.
    Delete {
        /// The mapping id.
        id: String,
    },
}

/// Why a command failed, and its exit code.
#[derive(Debug)]
pub(crate) struct Failure {
    pub(crate) code: u8,
    message: String,
}

impl Failure {
    fn new(code: u8, message: impl Into<String>) -> Self {
        Failure {
            code,
            message: message.into(),
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("pcpctl: {}", f.message);
            ExitCode::from(f.code)
        }
    }
}

/// One API call a command makes.
struct Plan {
    method: &'static str,
    path: String,
    body: Option<Value>,
}

impl Plan {
    fn get(path: String) -> Self {
        Plan {
            method: "GET",
            path,
            body: None,
        }
    }

    fn post(path: &str, body: Option<Value>) -> Self {
        Plan {
            method: "POST",
            path: path.into(),
            body,
        }
    }
}

/// The call a command (other than `health`) makes.
fn plan(command: &Command) -> Result<Plan, Failure> {
    Ok(match command {
        Command::Health => Plan::get("/healthz".into()),
        Command::Mappings(MappingsCmd::List {
            subscriber,
            external,
            protocol,
            limit,
            offset,
        }) => {
            let mut q = format!("/v1/mappings?limit={limit}&offset={offset}");
            for (k, v) in [
                ("subscriber", subscriber),
                ("external", external),
                ("protocol", protocol),
            ] {
                if let Some(v) = v {
                    q += &format!("&{k}={}", encode(v));
                }
            }
            Plan::get(q)
        }
        Command::Mappings(MappingsCmd::Get { id }) => {
            Plan::get(format!("/v1/mappings/{}", encode(id)))
        }
        Command::Mappings(MappingsCmd::Create {
            internal,
            protocol,
            external_port,
        }) => {
            let sock: std::net::SocketAddr = internal.parse().map_err(|_| {
                Failure::new(
                    2,
                    format!("{internal:?}: give ADDR:PORT, [IPv6]:PORT for IPv6"),
                )
            })?;
            let body = json!({
                "internal_addr": sock.ip(), "internal_port": sock.port(),
                "protocol": protocol, "external_port": external_port,
            });
            Plan::post("/v1/mappings", Some(body))
        }
        Command::Mappings(MappingsCmd::Delete { id }) => Plan {
            method: "DELETE",
            path: format!("/v1/mappings/{}", encode(id)),
            body: None,
        },
        Command::Subscriber { addr } => Plan::get(format!("/v1/subscribers/{}", encode(addr))),
        Command::Pools => Plan::get("/v1/pools".into()),
        Command::Lookup { external, at, .. } => {
            let mut p = format!("/v1/lookup?external={}", encode(external));
            if let Some(at) = at {
                p += &format!("&at={}", encode(at));
            }
            Plan::get(p)
        }
        Command::Drain { addr } => Plan::post("/v1/pools/drain", Some(json!({ "address": addr }))),
        Command::Undrain { addr } => {
            Plan::post("/v1/pools/undrain", Some(json!({ "address": addr })))
        }
        Command::Reload => Plan::post("/v1/reload", None),
    })
}

fn run(cli: &Cli) -> Result<(), Failure> {
    if let Command::Lookup { external, at, logs } = &cli.command {
        if !logs.is_empty() {
            let v = logs::lookup(external, at.as_deref(), logs)?;
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
            } else {
                print!("{}", output::human("/v1/lookup", &v));
            }
            return Ok(());
        }
    }
    let api = Api::new(cli)?;
    if let Command::Health = cli.command {
        return health(&api, cli.json);
    }
    let p = plan(&cli.command)?;
    let body = api.call(p.method, &p.path, p.body)?;
    if let Command::Mappings(MappingsCmd::Delete { id }) = &cli.command {
        if !cli.json {
            println!("deleted {id}");
        }
        return Ok(());
    }
    if cli.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&body).unwrap_or_default()
        );
    } else {
        print!("{}", output::human(&p.path, &body));
    }
    Ok(())
}

/// `/healthz` and `/readyz`: exit 0 only when pcpd is ready.
fn health(api: &Api, as_json: bool) -> Result<(), Failure> {
    let live = api.call_public("/healthz")?;
    let (status, ready) = api.raw("GET", "/readyz", None, false)?;
    if as_json {
        let v = json!({ "healthz": live, "readyz": ready, "ready": status == 200 });
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
    } else {
        println!("live:  {}", live["status"].as_str().unwrap_or("?"));
        println!("ready: {}", if status == 200 { "yes" } else { "no" });
        if status != 200 {
            println!("why:   {}", output::error_text(&ready));
        }
    }
    if status == 200 {
        Ok(())
    } else {
        Err(Failure::new(5, "pcpd is live but not ready (see `why`)"))
    }
}

/// Percent-encodes a path segment or query value.
fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out += &format!("%{b:02X}");
        }
    }
    out
}

/// The admin API: base URL, token, TLS.
struct Api {
    base: String,
    token: Option<String>,
    agent: ureq::Agent,
}

impl Api {
    fn new(cli: &Cli) -> Result<Self, Failure> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let token = match (&cli.token_file, std::env::var("PCPD_TOKEN")) {
            (Some(path), _) => Some(
                std::fs::read_to_string(path)
                    .map_err(|e| Failure::new(4, format!("--token-file {}: {e}", path.display())))?
                    .trim()
                    .to_string(),
            ),
            (None, Ok(t)) if !t.trim().is_empty() => Some(t.trim().to_string()),
            _ => None,
        };
        let tls = tls_config(cli)?;
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(cli.timeout.max(1))))
            .tls_config(tls)
            .build()
            .into();
        Ok(Api {
            base: cli.url.trim_end_matches('/').to_string(),
            token,
            agent,
        })
    }

    /// A call that needs the token; the body of a 2xx answer.
    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value, Failure> {
        if self.token.is_none() {
            return Err(Failure::new(
                4,
                "no token: set PCPD_TOKEN, or --token-file / PCPD_TOKEN_FILE to a file holding one of admin.tokens",
            ));
        }
        let (status, v) = self.raw(method, path, body, true)?;
        match status {
            200..=299 => Ok(v),
            401 | 403 => Err(Failure::new(
                4,
                format!(
                    "{} ({status}): check that the token is one of admin.tokens{}",
                    output::error_text(&v),
                    if status == 403 {
                        ", with scope write"
                    } else {
                        ""
                    }
                ),
            )),
            404 => Err(Failure::new(3, output::error_text(&v))),
            500..=599 => Err(Failure::new(
                5,
                format!("{} ({status}): try again later", output::error_text(&v)),
            )),
            _ => Err(Failure::new(
                1,
                format!("{} ({status})", output::error_text(&v)),
            )),
        }
    }

    fn call_public(&self, path: &str) -> Result<Value, Failure> {
        let (status, v) = self.raw("GET", path, None, false)?;
        if status == 200 {
            Ok(v)
        } else {
            Err(Failure::new(5, format!("{path}: {status}")))
        }
    }

    /// One request: the status and the JSON body (`null` when empty).
    fn raw(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
        auth: bool,
    ) -> Result<(u16, Value), Failure> {
        let url = format!("{}{path}", self.base);
        let bearer = self
            .token
            .as_ref()
            .filter(|_| auth)
            .map(|t| format!("Bearer {t}"));
        let unreachable = |e: ureq::Error| {
            Failure::new(
                5,
                format!(
                    "cannot reach {}: {e} (is pcpd running, and is --url / PCPD_URL right?)",
                    self.base
                ),
            )
        };
        let response = match (method, body) {
            ("GET", _) => {
                let mut r = self.agent.get(&url);
                if let Some(b) = &bearer {
                    r = r.header("Authorization", b);
                }
                r.call()
            }
            ("DELETE", _) => {
                let mut r = self.agent.delete(&url);
                if let Some(b) = &bearer {
                    r = r.header("Authorization", b);
                }
                r.call()
            }
            (_, body) => {
                let mut r = self.agent.post(&url);
                if let Some(b) = &bearer {
                    r = r.header("Authorization", b);
                }
                r.send_json(body.unwrap_or(Value::Null))
            }
        };
        let mut response = response.map_err(unreachable)?;
        let status = response.status().as_u16();
        let text = response.body_mut().read_to_string().unwrap_or_default();
        let v = if text.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        Ok((status, v))
    }
}

/// Trust anchors (the given CA, else the system's) and the client
/// certificate, if any.
fn tls_config(cli: &Cli) -> Result<ureq::tls::TlsConfig, Failure> {
    use ureq::tls::{parse_pem, ClientCert, PemItem, RootCerts, TlsConfig};
    let read = |p: &PathBuf| {
        std::fs::read(p).map_err(|e| Failure::new(2, format!("{}: {e}", p.display())))
    };
    let system = PathBuf::from("/etc/ssl/certs/ca-certificates.crt");
    let ca_pem = match &cli.ca {
        Some(p) => read(p)?,
        None => std::fs::read(&system).unwrap_or_default(),
    };
    let roots: Vec<_> = parse_pem(&ca_pem)
        .filter_map(|i| match i {
            Ok(PemItem::Certificate(c)) => Some(c),
            _ => None,
        })
        .collect();
    let mut tls = TlsConfig::builder().root_certs(RootCerts::new_with_certs(&roots));
    if let (Some(cert), Some(key)) = (&cli.cert, &cli.key) {
        let chain: Vec<_> = parse_pem(&read(cert)?)
            .filter_map(|i| match i {
                Ok(PemItem::Certificate(c)) => Some(c),
                _ => None,
            })
            .collect();
        let key = parse_pem(&read(key)?)
            .find_map(|i| match i {
                Ok(PemItem::PrivateKey(k)) => Some(k),
                _ => None,
            })
            .ok_or_else(|| Failure::new(2, format!("{}: no private key in it", key.display())))?;
        tls = tls.client_cert(Some(ClientCert::new_with_certs(&chain, key)));
    }
    Ok(tls.build())
}
