//! # pcpd: a carrier-grade PCP server
//!
//! Answers PCP (RFC 6887) and NAT-PMP (RFC 6886) on UDP 5351 with one I/O
//! shard per core, and serves an admin REST API and Prometheus metrics.
//! The only crate of the workspace that knows tokio.
//!
//! ```text
//!  config ─▶ Shared pools ─▶ shard threads (socket + engine + dataplane each)
//!                 │                ▲ control messages
//!                 └── admin API ───┘      metrics ◀── per-shard counters
//! ```

// A binary: `pub` marks what modules offer each other, not an exported API.
#![allow(unreachable_pub)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use anyhow::Context;
use clap::{Parser, Subcommand};
use pcp_dataplane::{Dataplane, MemoryDataplane, NftablesDataplane};
use pcp_engine::{Compiled, Shared};

mod admin;
mod config;
mod metrics;
mod natlog;
mod shard;
mod steer;

use config::{Config, LogFormat};

/// A carrier-grade PCP (RFC 6887) and NAT-PMP (RFC 6886) server.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Configuration file (YAML). Without it, the built-in loopback default.
    #[arg(long, short, global = true)]
    config: Option<PathBuf>,
    /// Start with a fresh epoch, moving damaged or unwanted state aside
    /// (into <state_dir>/discarded-<time>/) instead of loading it.
    #[arg(long, global = true)]
    discard_state: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server (the default).
    Run,
    /// Check a configuration file and print the verdict.
    CheckConfig {
        /// The file.
        file: PathBuf,
    },
    /// Print the built-in default configuration.
    PrintDefaultConfig,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Run) {
        Command::PrintDefaultConfig => {
            print!("{}", config::DEFAULT_YAML);
            ExitCode::SUCCESS
        }
        Command::CheckConfig { file } => match Config::load(&file) {
            Ok(cfg) => {
                println!(
                    "{}: OK ({} pools, {} subscriber classes, {} listen addresses, {} shards)",
                    file.display(),
                    cfg.pcp.pools.len(),
                    cfg.pcp.subscribers.len(),
                    cfg.listen.len(),
                    cfg.shard_count()
                );
                ExitCode::SUCCESS
            }
            Err(problems) => {
                for p in &problems {
                    eprintln!("{}: {p}", file.display());
                }
                eprintln!("{}: {} problem(s)", file.display(), problems.len());
                ExitCode::from(1)
            }
        },
        Command::Run => {
            let (cfg, path) = match &cli.config {
                Some(p) => match Config::load(p) {
                    Ok(c) => (c, Some(p.clone())),
                    Err(problems) => {
                        for pr in &problems {
                            eprintln!("{}: {pr}", p.display());
                        }
                        return ExitCode::from(2);
                    }
                },
                None => (Config::builtin(), None),
            };
            init_logging(cfg.log.format);
            match run(cfg, path, cli.discard_state) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e:#}");
                    eprintln!("pcpd: {e:#}");
                    ExitCode::from(1)
                }
            }
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("PCPD_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn run(cfg: Config, path: Option<PathBuf>, discard_state: bool) -> anyhow::Result<()> {
    std::fs::create_dir_all(&cfg.state_dir)
        .with_context(|| format!("state_dir {}", cfg.state_dir.display()))?;
    let sink: Box<dyn std::io::Write + Send> = match cfg.nat_event_path() {
        None => Box::new(std::io::stdout()),
        Some(p) => Box::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&p)
                .with_context(|| format!("NAT event log {}", p.display()))?,
        ),
    };
    let natlog = natlog::NatLog::new(sink);
    let metrics = metrics::Metrics::new().context("metrics")?;
    let shared = Arc::new(Shared::new(&cfg.pcp));
    let compiled = Arc::new(Compiled::new(cfg.pcp.clone(), &shared).map_err(|p| {
        anyhow::anyhow!(p
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; "))
    })?);
    // Durable state (RFC 6887 §8.5): the epoch continues when state was
    // recovered; otherwise a new epoch starts and clients are told.
    let now = shard::now_ms();
    if discard_state {
        if let Some(aside) = pcp_store::discard(&cfg.state_dir, now)? {
            tracing::warn!(
                "state moved aside to {}; starting a new epoch",
                aside.display()
            );
        }
    }
    let load_started = std::time::Instant::now();
    let state = pcp_store::load(&cfg.state_dir)?;
    for w in &state.warnings {
        tracing::warn!("{w}");
    }
    let recovered = state.epoch_start.is_some();
    let epoch_start = match state.epoch_start {
        Some(start) => start,
        None => {
            pcp_store::write_epoch(&cfg.state_dir, now)?;
            now
        }
    };
    metrics.epoch_start.set((epoch_start / 1000) as i64);
    let n = cfg.shard_count();
    // Records go to the shard that owns their subscriber now (the shard
    // count may have changed).
    let mut restores: Vec<shard::Restore> = (0..n).map(|_| shard::Restore::default()).collect();
    let loaded_records = state.records;
    for (_, (subscriber, block, since)) in state.blocks {
        restores[pcp_engine::shard_of(subscriber, n)]
            .blocks
            .push((subscriber, block, since));
    }
    for (_, m) in state.mappings {
        restores[pcp_engine::shard_of(m.internal_addr, n)]
            .mappings
            .push(m);
    }
    for h in state.history {
        restores[pcp_engine::shard_of(h.internal_addr, n)]
            .history
            .push(h);
    }
    let dataplanes = open_dataplanes(&cfg.dataplane, n)?;
    let seed_base = now ^ u64::from(std::process::id()).rotate_left(32);
    let mut restored_rx = Vec::with_capacity(n);
    let specs = restores
        .into_iter()
        .zip(dataplanes)
        .enumerate()
        .map(|(i, (restore, dataplane))| {
            let (tx, rx) = tokio::sync::oneshot::channel();
            restored_rx.push(rx);
            shard::ShardSpec {
                index: i,
                compiled: compiled.clone(),
                shared: shared.clone(),
                listen: cfg.listen.clone(),
                epoch_start_ms: epoch_start,
                seed: seed_base
                    .wrapping_mul(0x9e37_79b9_7f4a_7c15)
                    .wrapping_add(i as u64),
                metrics: metrics.clone(),
                natlog: natlog.clone(),
                announce: !recovered,
                restore,
                state_dir: cfg.state_dir.clone(),
                generation: now,
                journal_max_bytes: cfg.journal_max_mib << 20,
                restored: tx,
                dataplane,
            }
        })
        .collect();
    let (shards, _threads) =
        shard::start(specs, cfg.handoff_queue).context("opening UDP sockets")?;
    // Ready only once every shard has restored, snapshotted and reconciled.
    let mut total = shard::RestoreReport::default();
    for rx in restored_rx {
        let r = rx
            .blocking_recv()
            .map_err(|_| anyhow::anyhow!("a shard stopped while restoring state"))?
            .map_err(|e| anyhow::anyhow!("restoring state: {e}"))?;
        total.mappings += r.mappings;
        total.dropped += r.dropped;
        total.blocks += r.blocks;
        total.blocks_dropped += r.blocks_dropped;
        total.installed += r.installed;
        total.removed += r.removed;
        total.failed += r.failed;
    }
    pcp_store::remove_stale(&cfg.state_dir, n)?;
    tracing::info!(
        recovered,
        records = loaded_records,
        mappings = total.mappings,
        dropped = total.dropped,
        blocks = total.blocks,
        blocks_dropped = total.blocks_dropped,
        dataplane_installed = total.installed,
        dataplane_removed = total.removed,
        dataplane_failed = total.failed,
        ms = load_started.elapsed().as_millis() as u64,
        "state restored"
    );
    tracing::info!(
        listen = ?cfg.listen,
        shards = n,
        loopback_only = cfg.loopback_only(),
        "pcpd answering PCP and NAT-PMP"
    );

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("pcpd-admin")
        .enable_all()
        .build()?;
    let state = Arc::new(admin::AppState {
        shards,
        shared: shared.clone(),
        tokens: cfg
            .admin
            .tokens
            .iter()
            .map(|t| (t.name.clone(), t.sha256.to_ascii_lowercase(), t.scope))
            .collect(),
        ready: Default::default(),
        config_path: path,
        config: Mutex::new(cfg.clone()),
    });
    if cfg
        .admin
        .tokens
        .iter()
        .any(|t| t.sha256 == config::token_hash(config::DEFAULT_DEV_TOKEN))
    {
        tracing::warn!("the admin API accepts the development token; replace it outside of trials");
    }
    rt.block_on(serve(cfg, state, metrics, shared))
}

/// One dataplane per shard. For nftables the table is opened (created if
/// missing) and read back once, then split so each shard owns the elements
/// of its own subscribers.
fn open_dataplanes(
    cfg: &config::DataplaneConfig,
    n: usize,
) -> anyhow::Result<Vec<Box<dyn Dataplane>>> {
    Ok(match cfg.backend {
        config::DataplaneBackend::Memory => (0..n)
            .map(|_| Box::new(MemoryDataplane::new()) as Box<dyn Dataplane>)
            .collect(),
        config::DataplaneBackend::Nftables => {
            let nft = &cfg.nftables;
            let dp = NftablesDataplane::open(&nft.table, &nft.nft.to_string_lossy()).with_context(|| {
                format!(
                    "dataplane nftables: opening table ip {} with {} (pcpd needs CAP_NET_ADMIN, and nftables installed)",
                    nft.table,
                    nft.nft.display()
                )
            })?;
            dp.split(n)
                .into_iter()
                .map(|d| Box::new(d) as Box<dyn Dataplane>)
                .collect()
        }
    })
}

async fn serve(
    cfg: Config,
    state: Arc<admin::AppState>,
    metrics: metrics::Metrics,
    shared: Arc<Shared>,
) -> anyhow::Result<()> {
    let app = admin::router(state.clone());
    let admin_addr = cfg.admin.listen;
    let admin_task = match &cfg.admin.tls {
        Some(tls) => {
            let server_cfg = tls_config(tls).context("admin TLS")?;
            let rustls_cfg =
                axum_server::tls_rustls::RustlsConfig::from_config(Arc::new(server_cfg));
            let std_listener = std::net::TcpListener::bind(admin_addr)
                .with_context(|| format!("admin.listen {admin_addr}"))?;
            std_listener.set_nonblocking(true)?;
            tracing::info!("admin API on https://{admin_addr}");
            tokio::spawn(async move {
                axum_server::from_tcp_rustls(std_listener, rustls_cfg)?
                    .serve(app.into_make_service())
                    .await
            })
        }
        None => {
            let listener = tokio::net::TcpListener::bind(admin_addr)
                .await
                .with_context(|| format!("admin.listen {admin_addr}"))?;
            tracing::info!("admin API on http://{admin_addr} (plaintext, loopback only)");
            tokio::spawn(async move { axum::serve(listener, app).await })
        }
    };
    let metrics_addr: SocketAddr = cfg.metrics.listen;
    let m = metrics.clone();
    let metrics_app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let m = m.clone();
            async move {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "text/plain; version=0.0.4",
                    )],
                    m.render(),
                )
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind(metrics_addr)
        .await
        .with_context(|| format!("metrics.listen {metrics_addr}"))?;
    tracing::info!("metrics on http://{metrics_addr}/metrics");
    let metrics_task = tokio::spawn(async move { axum::serve(listener, metrics_app).await });

    // Pool gauges.
    let (m, sh) = (metrics.clone(), shared.clone());
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
        loop {
            tick.tick().await;
            m.pools(&sh.usage());
        }
    });
    metrics.pools(&shared.usage());
    state.ready.store(true, Ordering::Release);
    metrics.ready.set(1);
    tracing::info!("ready");

    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        tokio::select! {
            _ = hup.recv() => match admin::do_reload(&state).await {
                Ok(msg) => tracing::info!("SIGHUP: {msg}"),
                Err(e) => tracing::error!("SIGHUP reload refused: {e:?}"),
            },
            _ = term.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
        }
        if admin_task.is_finished() || metrics_task.is_finished() {
            anyhow::bail!("an HTTP server stopped");
        }
    }
    tracing::info!("shutting down");
    state.ready.store(false, Ordering::Release);
    Ok(())
}

fn tls_config(tls: &config::TlsConfig) -> anyhow::Result<rustls::ServerConfig> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certs = CertificateDer::pem_file_iter(&tls.cert)
        .with_context(|| format!("{}", tls.cert.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("{}", tls.cert.display()))?;
    let key =
        PrivateKeyDer::from_pem_file(&tls.key).with_context(|| format!("{}", tls.key.display()))?;
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let builder = match &tls.client_ca {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in
                CertificateDer::pem_file_iter(ca).with_context(|| format!("{}", ca.display()))?
            {
                roots.add(c?)?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut cfg = builder.with_single_cert(certs, key)?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(cfg)
}
