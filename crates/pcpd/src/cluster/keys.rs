//! The etcd key layout of one cluster (under `cluster.etcd.prefix`):
//!
//! ```text
//! <prefix>/epoch                               cluster epoch base, wall ms (RFC 6887 §8.5)
//! <prefix>/nodes/<node>                        live node (bound to its lease)
//! <prefix>/owner/<partition>                   owning node (bound to its lease)
//! <prefix>/state/<partition>/b/<sub>/<ext>/<first>          a subscriber's port block
//! <prefix>/state/<partition>/m/<sub>/<proto>/<port>[/<remote>/<rport>]   a mapping
//! ```
//!
//! Values of `state/` keys are pcp-store record bodies (the journal's own
//! encoding, without framing), in wall time. One key per block and per
//! mapping means a write is a put or a delete of its own key, so writes
//! are idempotent and batches can be coalesced per key (etcd refuses a
//! transaction that names a key twice).

use pcp_engine::MappingKey;
use pcp_store::Record;

/// What a record asks of etcd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Put this value.
    Put(Vec<u8>),
    /// Delete the key.
    Delete,
}

/// The keys of one cluster.
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    /// Keys under `prefix` (no trailing slash needed).
    pub fn new(prefix: &str) -> Self {
        Keys {
            prefix: prefix.trim_end_matches('/').to_string(),
        }
    }

    /// The cluster's epoch base.
    pub fn epoch(&self) -> String {
        format!("{}/epoch", self.prefix)
    }

    /// Prefix of the live nodes.
    pub fn nodes(&self) -> String {
        format!("{}/nodes/", self.prefix)
    }

    /// A node's liveness key.
    pub fn node(&self, node: &str) -> String {
        format!("{}/nodes/{node}", self.prefix)
    }

    /// Prefix of the ownership keys.
    pub fn owners(&self) -> String {
        format!("{}/owner/", self.prefix)
    }

    /// A partition's ownership key.
    pub fn owner(&self, partition: &str) -> String {
        format!("{}/owner/{partition}", self.prefix)
    }

    /// Prefix of a partition's state.
    pub fn state(&self, partition: &str) -> String {
        format!("{}/state/{partition}/", self.prefix)
    }

    /// The key a record is kept under, and what to do with it; `None` for
    /// records not kept in etcd (allocation history stays in the node's
    /// memory and in the NAT event log).
    pub fn record(
        &self,
        partition: &str,
        rec: &Record,
        value: &mut Vec<u8>,
    ) -> Option<(String, Op)> {
        let base = self.state(partition);
        let encode = |value: &mut Vec<u8>| {
            value.clear();
            pcp_store::encode_record(rec, value);
            Op::Put(value.clone())
        };
        Some(match rec {
            Record::Block {
                subscriber, block, ..
            } => (
                format!("{base}b/{subscriber}/{}/{}", block.addr, block.first),
                encode(value),
            ),
            Record::BlockGone { subscriber, block } => (
                format!("{base}b/{subscriber}/{}/{}", block.addr, block.first),
                Op::Delete,
            ),
            Record::Mapping(m) => (mapping_key(&base, &m.key()), encode(value)),
            Record::Gone(key) => (mapping_key(&base, key), Op::Delete),
            Record::History(_) => return None,
        })
    }
}

fn mapping_key(base: &str, k: &MappingKey) -> String {
    let i = &k.internal;
    match &k.remote {
        None => format!("{base}m/{}/{}/{}", i.addr, i.protocol, i.port),
        Some(r) => format!(
            "{base}m/{}/{}/{}/{}/{}",
            i.addr, i.protocol, i.port, r.addr, r.port
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pcp_engine::Block;
    use std::net::{IpAddr, Ipv4Addr};

    #[test]
    fn a_block_is_put_and_deleted_under_one_key() {
        let keys = Keys::new("/pcpd/");
        let subscriber = IpAddr::V4(Ipv4Addr::new(100, 64, 0, 1));
        let block = Block {
            addr: Ipv4Addr::new(192, 0, 2, 1),
            first: 1024,
            len: 512,
        };
        let mut v = Vec::new();
        let put = keys.record(
            "p0",
            &Record::Block {
                subscriber,
                block,
                since: 5,
            },
            &mut v,
        );
        let del = keys.record("p0", &Record::BlockGone { subscriber, block }, &mut v);
        let (k1, op1) = put.unwrap();
        let (k2, op2) = del.unwrap();
        assert_eq!(k1, "/pcpd/state/p0/b/100.64.0.1/192.0.2.1/1024");
        assert_eq!(k1, k2);
        assert_eq!(op2, Op::Delete);
        let Op::Put(body) = op1 else {
            panic!("a block is put")
        };
        assert_eq!(
            pcp_store::decode_record(&body),
            Some(Record::Block {
                subscriber,
                block,
                since: 5
            })
        );
    }
}
