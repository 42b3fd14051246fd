//! # pcpd: a carrier-grade PCP server
//!
//! Answers PCP (RFC 6887) and NAT-PMP (RFC 6886) on UDP 5351 with one I/O
//! shard per core, and serves an admin REST API and Prometheus metrics.
//! The only crate of the workspace that knows tokio.
//!
//! ```text
//!  config ─▶ BlockAllocator ─▶ shard threads (socket + engine + dataplane each)
//!                 │                ▲ control messages
//!                 └── admin API ───┘      metrics ◀── per-shard counters
//! ```

// A binary: `pub` marks what modules offer each other, not an exported API.
#![allow(unreachable_pub)]

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use anyhow::Context;
use clap::{Parser, Subcommand};
use pcp_dataplane::{Dataplane, MemoryDataplane, NftablesDataplane};
use pcp_engine::{BlockAllocator, Compiled};

mod admin;
mod clock;
mod cluster;
mod config;
mod http;
mod metrics;
mod natlog;
mod recovered;
mod reload;
mod rfc3339;
mod shard;
mod steer;

use config::{Config, LogFormat};
use recovered::{load_state, Recovered};

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
                if let Some(c) = &cfg.cluster {
                    println!(
                        "{}: cluster node {:?}, {} partitions, etcd {:?}",
                        file.display(),
                        c.node_name(),
                        c.partitions.len(),
                        c.etcd.endpoints
                    );
                }
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
    // Colour only on a terminal: a file, a pipe or journald gets plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// The daemon's lifecycle, step by step (linkerd2-proxy's `main` is the
/// model): everything that can be refused is checked before anything is
/// bound; readiness comes only after every shard restored its state.
fn run(cfg: Config, path: Option<PathBuf>, discard_state: bool) -> anyhow::Result<()> {
    let metrics = metrics::Metrics::new().context("metrics")?;
    let natlog = open_natlog(&cfg, &metrics.registry)?;
    let natlog_handle = natlog.clone();
    let (pools, compiled) = compile(&cfg)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("pcpd-admin")
        .enable_all()
        .build()?;
    // The HTTP ports and TLS are settled before the state is touched.
    let listeners = http::Listeners::bind(&cfg)?;
    #[cfg(feature = "cluster")]
    let boot = match &cfg.cluster {
        Some(c) => Some(cluster::Boot::new(c, &rt)?),
        None => None,
    };
    let mut recovered = if cfg.cluster.is_some() {
        // Cluster mode: the state is in etcd; nothing local is read.
        Recovered::in_etcd()
    } else {
        load_state(&cfg, discard_state)?
    };
    let shared = Shared {
        compiled,
        pools: pools.clone(),
        metrics: metrics.clone(),
        natlog,
        health: Arc::new(shard::Health::new(cfg.shard_count())),
    };
    let health = shared.health.clone();
    let started = start_shards(
        &cfg,
        &mut recovered,
        shared,
        #[cfg(feature = "cluster")]
        boot.as_ref(),
    );
    let (shards, threads) = match started {
        Ok(started) => started,
        Err(e) => {
            // Nothing was answered: a discarded state comes back.
            recovered.undo_discard(&cfg.state_dir);
            return Err(e);
        }
    };
    tracing::info!(
        listen = ?cfg.listen,
        shards = shards.len(),
        loopback_only = cfg.loopback_only(),
        "pcpd answering PCP and NAT-PMP"
    );
    #[cfg(feature = "cluster")]
    let node = boot.map(|b| b.start(shards.clone(), &metrics, &rt));
    let state = Arc::new(admin::AppState {
        #[cfg(feature = "cluster")]
        cluster: node,
        shards,
        shared: pools,
        tokens: tokens(&cfg),
        ready: Default::default(),
        health,
        config_path: path,
        config: Mutex::new(cfg.clone()),
    });
    let epoch_start = recovered.epoch_start;
    rt.block_on(serve(cfg, state.clone(), listeners, metrics, epoch_start))?;
    let stopped = rt.block_on(shutdown(&state, threads));
    // Every event of what was answered reaches the NAT log's sinks.
    natlog_handle.finish(std::time::Duration::from_secs(5));
    stopped
}

/// Opens the dataplanes, binds the UDP sockets and starts the shards;
/// returns once every shard restored its state.
fn start_shards(
    cfg: &Config,
    recovered: &mut Recovered,
    shared: Shared,
    #[cfg(feature = "cluster")] boot: Option<&cluster::Boot>,
) -> anyhow::Result<(Vec<shard::ShardHandle>, Vec<std::thread::JoinHandle<()>>)> {
    shared
        .metrics
        .epoch_start
        .set((recovered.epoch_start / 1000) as i64);
    let dataplanes = open_dataplanes(cfg, cfg.shard_count())?;
    #[cfg(feature = "cluster")]
    let metrics = shared.metrics.clone();
    #[allow(unused_mut)]
    let (mut specs, restored_rx) = shard_specs(cfg, recovered, shared, dataplanes);
    #[cfg(feature = "cluster")]
    if let Some(boot) = boot {
        for spec in &mut specs {
            spec.cluster = Some(boot.shard(&metrics));
        }
    }
    let started = shard::start(specs, cfg.handoff_queue).context("opening UDP sockets")?;
    wait_restored(cfg, recovered, restored_rx)?;
    Ok(started)
}

/// The pools and the engine configuration every shard runs.
fn compile(cfg: &Config) -> anyhow::Result<(Arc<BlockAllocator>, Arc<Compiled>)> {
    let pools = Arc::new(BlockAllocator::new(&cfg.pcp));
    let compiled = Compiled::new(cfg.pcp.clone(), &pools).map_err(|p| {
        let all: Vec<String> = p.iter().map(ToString::to_string).collect();
        anyhow::anyhow!(all.join("; "))
    })?;
    Ok((pools, Arc::new(compiled)))
}

/// The admin API's tokens (name, hash, scope); warns about the dev token.
fn tokens(cfg: &Config) -> Vec<(String, String, config::Scope)> {
    let dev = config::token_hash(config::DEFAULT_DEV_TOKEN);
    if cfg.admin.tokens.iter().any(|t| t.sha256 == dev) {
        tracing::warn!("the admin API accepts the development token; replace it outside of trials");
    }
    let t = &cfg.admin.tokens;
    t.iter()
        .map(|t| (t.name.clone(), t.sha256.to_ascii_lowercase(), t.scope))
        .collect()
}

/// What every shard shares.
struct Shared {
    compiled: Arc<Compiled>,
    pools: Arc<BlockAllocator>,
    metrics: metrics::Metrics,
    natlog: natlog::NatLog,
    health: Arc<shard::Health>,
}

/// The NAT event log's sinks (by default one file in the state directory).
fn open_natlog(cfg: &Config, registry: &prometheus::Registry) -> anyhow::Result<natlog::NatLog> {
    std::fs::create_dir_all(&cfg.state_dir)
        .with_context(|| format!("state_dir {}", cfg.state_dir.display()))?;
    natlog::NatLog::open(&cfg.nat_sinks(), Some(registry)).context("NAT event log")
}

type RestoredRx =
    Vec<tokio::sync::oneshot::Receiver<Result<shard::RestoreReport, pcp_store::StoreError>>>;

fn shard_specs(
    cfg: &Config,
    recovered: &mut Recovered,
    shared: Shared,
    dataplanes: Vec<Box<dyn Dataplane>>,
) -> (Vec<shard::ShardSpec>, RestoredRx) {
    let now = recovered.now;
    let seed_base = now ^ u64::from(std::process::id()).rotate_left(32);
    let mut restored_rx = Vec::new();
    let mut restores = std::mem::take(&mut recovered.restores);
    restores.resize_with(dataplanes.len(), shard::Restore::default);
    let specs = dataplanes
        .into_iter()
        .zip(restores)
        .enumerate()
        .map(|(i, (dataplane, restore))| {
            let (tx, rx) = tokio::sync::oneshot::channel();
            restored_rx.push(rx);
            shard::ShardSpec {
                index: i,
                compiled: shared.compiled.clone(),
                pools: shared.pools.clone(),
                listen: cfg.listen.clone(),
                epoch_start_ms: recovered.epoch_start,
                seed: seed_base
                    .wrapping_mul(0x9e37_79b9_7f4a_7c15)
                    .wrapping_add(i as u64),
                metrics: shared.metrics.clone(),
                natlog: shared.natlog.clone(),
                health: shared.health.clone(),
                announce: !recovered.recovered,
                restore,
                state_dir: cfg.state_dir.clone(),
                generation: now,
                journal_max_bytes: cfg.journal_max_mib << 20,
                renewal_slack: cfg.journal_renewal_slack,
                restored: tx,
                dataplane,
                #[cfg(feature = "cluster")]
                cluster: None,
            }
        })
        .collect();
    (specs, restored_rx)
}

/// Ready only once every shard has restored, snapshotted and reconciled.
fn wait_restored(cfg: &Config, recovered: &Recovered, rx: RestoredRx) -> anyhow::Result<()> {
    let mut total = shard::RestoreReport::default();
    for rx in rx {
        total += rx
            .blocking_recv()
            .map_err(|_| anyhow::anyhow!("a shard stopped while restoring state"))?
            .map_err(|e| anyhow::anyhow!("restoring state: {e}"))?;
    }
    pcp_store::remove_stale(&cfg.state_dir, cfg.shard_count())?;
    tracing::info!(
        recovered = recovered.recovered,
        records = recovered.records,
        mappings = total.mappings,
        dropped = total.dropped,
        blocks = total.blocks,
        blocks_dropped = total.blocks_dropped,
        dataplane_installed = total.installed,
        dataplane_removed = total.removed,
        dataplane_failed = total.failed,
        ms = recovered.started.elapsed().as_millis() as u64,
        "state restored"
    );
    Ok(())
}

/// One dataplane per shard. For nftables the tables are opened (created if
/// missing) and read back once, then split so each shard owns the elements
/// of its own subscribers. The firewall classes' prefixes are what the
/// firewall part protects.
fn open_dataplanes(cfg: &Config, n: usize) -> anyhow::Result<Vec<Box<dyn Dataplane>>> {
    let protected = cfg
        .pcp
        .subscribers
        .iter()
        .filter(|c| c.kind == pcp_engine::config::ClassKind::Firewall)
        .flat_map(|c| c.prefixes.iter().copied())
        .collect();
    let cfg = &cfg.dataplane;
    Ok(match cfg.backend {
        config::DataplaneBackend::Memory => (0..n)
            .map(|_| Box::new(MemoryDataplane::new()) as Box<dyn Dataplane>)
            .collect(),
        config::DataplaneBackend::Nftables => {
            let nft = &cfg.nftables;
            let rules = pcp_dataplane::FirewallRules {
                protected,
                unsolicited: match nft.firewall.unsolicited {
                    config::UnsolicitedPolicy::Drop => pcp_dataplane::Unsolicited::Drop,
                    config::UnsolicitedPolicy::Mark => pcp_dataplane::Unsolicited::Mark,
                },
                mark: nft.firewall.mark,
            };
            let dp = NftablesDataplane::open(&nft.table, &nft.nft.to_string_lossy(), rules).with_context(|| {
                format!(
                    "dataplane nftables: opening tables ip and ip6 {} with {} (pcpd needs CAP_NET_ADMIN, and nftables installed)",
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

/// Serves the admin API and metrics, marks the daemon ready, and runs
/// until SIGTERM or SIGINT (SIGHUP reloads the configuration).
async fn serve(
    cfg: Config,
    state: Arc<admin::AppState>,
    listeners: http::Listeners,
    metrics: metrics::Metrics,
    epoch_start: u64,
) -> anyhow::Result<()> {
    let (admin_task, metrics_task) =
        listeners.serve(admin::router(state.clone()), metrics.clone())?;
    // Pool gauges.
    let (m, pools) = (metrics.clone(), state.shared.clone());
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
        loop {
            tick.tick().await;
            m.pools(&pools.usage());
        }
    });
    metrics.pools(&state.shared.usage());
    if cfg.cluster.is_none() {
        // Cluster mode keeps no state on disk (etcd records are in wall
        // time as written; the epoch base is the cluster's).
        tokio::spawn(watch_clock(
            state.clone(),
            cfg.state_dir.clone(),
            epoch_start,
        ));
    }
    state.ready.store(true, Ordering::Release);
    metrics.ready.set(1);
    tracing::info!("ready");

    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    loop {
        tokio::select! {
            _ = hup.recv() => {
                // File sinks of the NAT log reopen their file (logrotate).
                natlog::REOPEN.fetch_add(1, Ordering::AcqRel);
                match admin::do_reload(&state).await {
                    Ok(msg) => tracing::info!("SIGHUP: {msg}"),
                    Err(e) => tracing::error!("SIGHUP reload refused: {e:?}"),
                }
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
        if admin_task.is_finished() || metrics_task.is_finished() {
            anyhow::bail!("an HTTP server stopped");
        }
    }
    state.ready.store(false, Ordering::Release);
    metrics.ready.set(0);
    #[cfg(feature = "cluster")]
    if let Some(node) = &state.cluster {
        node.leave().await;
    }
    Ok(())
}

/// Watches for steps of the wall clock (NTP). Expiry runs on the engine's
/// monotonic clock and is not affected; what is on disk is rewritten in the
/// new wall time (the epoch file, and each shard's snapshot), so a restart,
/// which re-anchors on the wall clock, sees the same remaining lifetimes
/// and epoch (RFC 6887 §8.5).
async fn watch_clock(state: Arc<admin::AppState>, state_dir: PathBuf, epoch_start: u64) {
    let mut written = 0i64;
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    loop {
        tick.tick().await;
        // The offset moves only by steps (clock.rs).
        let offset = clock::wall_offset_ms();
        if offset == written {
            continue;
        }
        tracing::warn!(
            step_ms = offset - written,
            "the wall clock was stepped; mappings keep their lifetimes (monotonic clock); rewriting the state in the new wall time"
        );
        if let Err(e) =
            pcp_store::write_epoch(&state_dir, pcp_engine::shift_ms(epoch_start, offset))
        {
            tracing::error!("epoch file: {e}");
            continue;
        }
        for shard in &state.shards {
            let _ = shard.control.send(shard::Control::ClockStep).await;
        }
        written = offset;
    }
}

/// How long shards get to settle and answer what they hold.
const SHUTDOWN_DEADLINE: std::time::Duration = std::time::Duration::from_secs(10);

/// Stops every shard (each settles and answers what it holds, then its
/// thread ends) and joins the threads, within [`SHUTDOWN_DEADLINE`].
async fn shutdown(
    state: &admin::AppState,
    threads: Vec<std::thread::JoinHandle<()>>,
) -> anyhow::Result<()> {
    tracing::info!("shutting down: stopping the shards");
    let deadline = tokio::time::Instant::now() + SHUTDOWN_DEADLINE;
    for (i, shard) in state.shards.iter().enumerate() {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let stopped = async {
            shard
                .control
                .send(shard::Control::Shutdown(tx))
                .await
                .ok()?;
            rx.await.ok()
        };
        if tokio::time::timeout_at(deadline, stopped).await.is_err() {
            anyhow::bail!("shard {i} did not stop within {SHUTDOWN_DEADLINE:?}");
        }
    }
    for (i, t) in threads.into_iter().enumerate() {
        while !t.is_finished() {
            if tokio::time::Instant::now() >= deadline {
                anyhow::bail!("shard {i}'s thread did not end within {SHUTDOWN_DEADLINE:?}");
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        t.join()
            .map_err(|_| anyhow::anyhow!("shard {i}'s thread panicked"))?;
    }
    tracing::info!("stopped");
    Ok(())
}
