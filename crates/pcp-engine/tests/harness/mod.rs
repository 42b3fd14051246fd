//! A virtual-clock harness around one or more engine shards.
#![allow(dead_code, unreachable_pub, missing_docs)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

use pcp_engine::{BlockAllocator, Compiled, DeleteReason, Engine, EngineConfig, Event, Millis};
use pcp_wire::{
    natpmp, MapData, Nonce, OpData, Options, PcpOption, PeerData, Request, Response, ResultCode,
};

/// Start of virtual time: 2026-01-01T00:00:00Z.
pub const T0: Millis = 1_767_225_600_000;

pub struct H {
    pub engine: Engine,
    pub shared: Arc<BlockAllocator>,
    pub now: Millis,
    pub events: Vec<Event>,
}

/// A compact view of a PCP reply.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    pub result: ResultCode,
    pub lifetime: u32,
    pub epoch: u32,
    pub data: OpData,
    pub options: Vec<String>,
    pub bytes: Vec<u8>,
}

impl Reply {
    pub fn ext(&self) -> (IpAddr, u16) {
        let m = self.data.map_data().expect("MAP or PEER");
        (m.external_addr, m.external_port)
    }
    pub fn ext_port(&self) -> u16 {
        self.ext().1
    }
}

pub fn test_config() -> EngineConfig {
    let yaml = r#"
lifetimes: { min: 120, max: 86400, short_error: 30, long_error: 1800 }
pools:
  cgnat:
    prefixes: [192.0.2.0/30]
    ports: { first: 1024, last: 65535 }
    block_size: 512
    mode: dynamic
    reuse_delay_secs: 120
    block_hold_secs: 300
profiles:
  home: { max_mappings: 8, max_blocks: 2, rate_per_sec: 1000, burst: 1000 }
subscribers:
  - prefixes: [100.64.0.0/10, 127.0.0.0/8, "2001:db8:100::/64"]
    pool: cgnat
    profile: home
third_party:
  - from: [10.99.0.0/24]
    for: [100.64.0.0/16]
options:
  max_filters: 2
  prefix64: 64:ff9b::/96
"#;
    serde_yaml::from_str(yaml).expect("test config parses")
}

/// How many of `events` are mappings deleted by expiry.
pub fn expired_count(events: &[Event]) -> usize {
    events
        .iter()
        .filter(|e| {
            matches!(
                e,
                Event::MappingDeleted {
                    reason: DeleteReason::Expired,
                    ..
                }
            )
        })
        .count()
}

pub fn sub(n: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(100, 64, 0, n))
}

pub fn from(ip: IpAddr) -> SocketAddr {
    SocketAddr::new(ip, 40_000)
}

pub fn nonce(n: u8) -> Nonce {
    Nonce([n; 12])
}

impl H {
    pub fn new(cfg: EngineConfig) -> Self {
        let shared = Arc::new(BlockAllocator::new(&cfg));
        let compiled = Arc::new(Compiled::new(cfg, &shared).expect("valid config"));
        H {
            engine: Engine::new(compiled, Arc::clone(&shared), 0, T0, 42),
            shared,
            now: T0,
            events: Vec::new(),
        }
    }

    pub fn default() -> Self {
        Self::new(test_config())
    }

    pub fn raw(&mut self, src: SocketAddr, bytes: &[u8]) -> Option<Vec<u8>> {
        let mut out = [0u8; 1100];
        let n = self.engine.handle(self.now, src, bytes, &mut out);
        while let Some(e) = self.engine.poll_event() {
            self.events.push(e);
        }
        n.map(|n| out[..n].to_vec())
    }

    pub fn pcp(&mut self, src: SocketAddr, req: &Request<'_>) -> Reply {
        let mut buf = [0u8; 1100];
        let n = req.emit(&mut buf).unwrap();
        let bytes = self.raw(src, &buf[..n]).expect("PCP requests are answered");
        let r = Response::parse(&bytes).expect("reply parses");
        Reply {
            result: r.result,
            lifetime: r.lifetime,
            epoch: r.epoch,
            data: r.data,
            options: r.options.iter().map(|o| format!("{o:?}")).collect(),
            bytes: bytes.clone(),
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub fn map_opts(
        &mut self,
        client: IpAddr,
        n: Nonce,
        protocol: u8,
        internal_port: u16,
        suggested: u16,
        lifetime: u32,
        options: &[PcpOption<'_>],
    ) -> Reply {
        let req = Request {
            lifetime,
            client_addr: client,
            data: OpData::Map(MapData {
                nonce: n,
                protocol,
                internal_port,
                external_port: suggested,
                external_addr: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            }),
            options: Options::List(options),
        };
        self.pcp(from(client), &req)
    }

    pub fn map(
        &mut self,
        client: IpAddr,
        n: Nonce,
        internal_port: u16,
        suggested: u16,
        lifetime: u32,
    ) -> Reply {
        self.map_opts(client, n, 6, internal_port, suggested, lifetime, &[])
    }

    #[allow(clippy::too_many_arguments)]
    pub fn peer(
        &mut self,
        client: IpAddr,
        n: Nonce,
        internal_port: u16,
        remote: IpAddr,
        remote_port: u16,
        suggested: u16,
        lifetime: u32,
    ) -> Reply {
        let req = Request {
            lifetime,
            client_addr: client,
            data: OpData::Peer(PeerData {
                map: MapData {
                    nonce: n,
                    protocol: 6,
                    internal_port,
                    external_port: suggested,
                    external_addr: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                },
                remote_port,
                remote_addr: remote,
            }),
            options: Options::NONE,
        };
        self.pcp(from(client), &req)
    }

    /// A MAP (no `remote`) or PEER suggesting a whole external endpoint.
    pub fn suggest(
        &mut self,
        client: IpAddr,
        n: Nonce,
        internal_port: u16,
        remote: Option<(IpAddr, u16)>,
        suggested: (IpAddr, u16),
        lifetime: u32,
    ) -> Reply {
        let map = MapData {
            nonce: n,
            protocol: 6,
            internal_port,
            external_port: suggested.1,
            external_addr: suggested.0,
        };
        let data = match remote {
            Some((remote_addr, remote_port)) => OpData::Peer(PeerData {
                map,
                remote_port,
                remote_addr,
            }),
            None => OpData::Map(map),
        };
        let req = Request {
            lifetime,
            client_addr: client,
            data,
            options: Options::NONE,
        };
        self.pcp(from(client), &req)
    }

    pub fn natpmp(&mut self, client: IpAddr, req: natpmp::Request) -> natpmp::Response {
        let mut buf = [0u8; 16];
        let n = req.emit(&mut buf).unwrap();
        let bytes = self.raw(from(client), &buf[..n]).expect("answered");
        natpmp::Response::parse(&bytes).expect("parses")
    }

    /// Advances the virtual clock by `ms`, firing every timer on the way.
    pub fn advance(&mut self, ms: Millis) -> Vec<pcp_engine::Transmit> {
        let end = self.now + ms;
        let mut sent = Vec::new();
        while let Some(t) = self.engine.poll_timeout() {
            if t > end {
                break;
            }
            self.now = self.now.max(t);
            self.engine.handle_timeout(self.now);
            while let Some(tx) = self.engine.poll_transmit() {
                sent.push(tx);
            }
            while let Some(e) = self.engine.poll_event() {
                self.events.push(e);
            }
        }
        self.now = end;
        sent
    }

    pub fn take_events(&mut self) -> Vec<Event> {
        while let Some(e) = self.engine.poll_event() {
            self.events.push(e);
        }
        std::mem::take(&mut self.events)
    }
}
