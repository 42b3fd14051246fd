//! The HTTP listeners: the admin API (TLS with rustls, or plaintext on
//! loopback) and the metrics endpoint.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;

use crate::config::{self, Config};
use crate::metrics;

pub(crate) type ServerTask = tokio::task::JoinHandle<std::io::Result<()>>;

pub(crate) async fn serve_admin(cfg: &Config, app: axum::Router) -> anyhow::Result<ServerTask> {
    let admin_addr = cfg.admin.listen;
    Ok(match &cfg.admin.tls {
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
    })
}

pub(crate) async fn serve_metrics(
    cfg: &Config,
    metrics: metrics::Metrics,
) -> anyhow::Result<ServerTask> {
    let metrics_addr: SocketAddr = cfg.metrics.listen;
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
    let listener = tokio::net::TcpListener::bind(metrics_addr)
        .await
        .with_context(|| format!("metrics.listen {metrics_addr}"))?;
    tracing::info!("metrics on http://{metrics_addr}/metrics");
    Ok(tokio::spawn(async move {
        axum::serve(listener, metrics_app).await
    }))
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
