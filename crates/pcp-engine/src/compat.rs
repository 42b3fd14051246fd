//! Departures from the RFCs that deployed clients depend on, each off by
//! default and named in the configuration (`pcp.compatibility`).

use serde::{Deserialize, Serialize};

/// Departures from the RFC for deployed clients (docs/operations.md,
/// "Client compatibility").
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Compatibility {
    /// What a lifetime-0 MAP or PEER (a delete) is answered with.
    #[serde(default)]
    pub delete_answer: DeleteAnswer,
}

/// The external address and port of a delete's answer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DeleteAnswer {
    /// RFC 6887 §15.1: the request's suggested address and port, copied.
    #[default]
    Rfc,
    /// As miniupnpd answers: the deleted mapping's external address and
    /// port; with nothing deleted, the subscriber's external address (the
    /// one it has, or the one its first block will be on) and port 0.
    /// Clients that learn their address by a lifetime-0 MAP need this.
    External,
}
