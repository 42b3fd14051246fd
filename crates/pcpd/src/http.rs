//! The HTTP listeners: the admin API (TLS with rustls, or plaintext on
//! loopback) and the metrics endpoint.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;

use crate::config::{self, Config};
use crate::metrics;

pub(crate) type ServerTask = tokio::task::JoinHandle<std::io::Result<()>>;

/// The admin and metrics sockets, bound (and the admin TLS configuration
/// loaded) before the daemon touches its state, so a port in use or a bad
/// certificate refuses the start before anything else happened.
pub(crate) struct Listeners {
    admin: std::net::TcpListener,
    admin_tls: Option<rustls::ServerConfig>,
    metrics: std::net::TcpListener,
}

impl Listeners {
    pub(crate) fn bind(cfg: &Config) -> anyhow::Result<Listeners> {
        let admin_tls = match &cfg.admin.tls {
            Some(tls) => Some(tls_config(tls).context("admin TLS")?),
            None => None,
        };
        let bind = |addr: SocketAddr, what: &str| -> anyhow::Result<std::net::TcpListener> {
            let l = std::net::TcpListener::bind(addr).with_context(|| format!("{what} {addr}"))?;
            l.set_nonblocking(true)?;
            Ok(l)
        };
        Ok(Listeners {
            admin: bind(cfg.admin.listen, "admin.listen")?,
            admin_tls,
            metrics: bind(cfg.metrics.listen, "metrics.listen")?,
        })
    }

    /// Serves the admin API and the metrics endpoint (within a runtime).
    pub(crate) fn serve(
        self,
        app: axum::Router,
        metrics: metrics::Metrics,
    ) -> anyhow::Result<(ServerTask, ServerTask)> {
        let admin_addr = self.admin.local_addr()?;
        let admin = match self.admin_tls {
            Some(server_cfg) => {
                let rustls_cfg =
                    axum_server::tls_rustls::RustlsConfig::from_config(Arc::new(server_cfg));
                tracing::info!("admin API on https://{admin_addr}");
                let listener = self.admin;
                tokio::spawn(async move {
                    axum_server::from_tcp_rustls(listener, rustls_cfg)?
                        .serve(app.into_make_service())
                        .await
                })
            }
            None => {
                let listener = tokio::net::TcpListener::from_std(self.admin)?;
                tracing::info!("admin API on http://{admin_addr} (plaintext, loopback only)");
                tokio::spawn(async move { axum::serve(listener, app).await })
            }
        };
        let metrics_addr = self.metrics.local_addr()?;
        let metrics_app = axum::Router::new().route(
            "/metrics",
            axum::routing::get(move || {
                let m = metrics.clone();
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
        let listener = tokio::net::TcpListener::from_std(self.metrics)?;
        tracing::info!("metrics on http://{metrics_addr}/metrics");
        let metrics = tokio::spawn(async move { axum::serve(listener, metrics_app).await });
        Ok((admin, metrics))
    }
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
