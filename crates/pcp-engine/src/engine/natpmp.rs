//! NAT-PMP (RFC 6886), answered on the PCP port (RFC 6887 §9): public
//! address, and MAP through the same rules as PCP MAP without a nonce.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use pcp_wire::{natpmp, MapData, NatPmpResult, Nonce, ResultCode};

use super::map::{Ask, Via};
use super::request::{ReqOptions, Row};
use super::Engine;
use crate::types::{DeleteReason, MappingKind, Millis};

impl Engine {
    pub(super) fn handle_natpmp(
        &mut self,
        now: Millis,
        src: SocketAddr,
        req: natpmp::Request,
        out: &mut [u8],
    ) -> Option<usize> {
        let epoch = self.epoch(now);
        let subscriber = src.ip().to_canonical();
        let resp = match req {
            natpmp::Request::PublicAddress => {
                let (result, addr) = match self.public_address(now, subscriber) {
                    Ok(a) => (NatPmpResult::Success, a),
                    Err(code) => (NatPmpResult::from(code), Ipv4Addr::UNSPECIFIED),
                };
                natpmp::Response::PublicAddress {
                    result,
                    epoch,
                    addr,
                }
            }
            natpmp::Request::Map(req_map) => {
                let (result, mapping) = match self.natpmp_map(now, src, subscriber, req_map) {
                    Ok((port, lifetime)) => (
                        NatPmpResult::Success,
                        natpmp::Mapping {
                            external_port: port,
                            lifetime,
                            ..req_map
                        },
                    ),
                    // RFC 6886 §3.5: on failure, external port and lifetime are 0.
                    Err(code) => (
                        NatPmpResult::from(code),
                        natpmp::Mapping {
                            external_port: 0,
                            lifetime: 0,
                            ..req_map
                        },
                    ),
                };
                natpmp::Response::Map {
                    result,
                    epoch,
                    mapping,
                }
            }
        };
        self.forget_if_stateless(subscriber);
        let code = match resp {
            natpmp::Response::PublicAddress { result, .. }
            | natpmp::Response::Map { result, .. } => result,
        };
        self.count(
            Row::NatPmp,
            match code {
                NatPmpResult::Success => ResultCode::Success,
                NatPmpResult::OutOfResources => ResultCode::NoResources,
                NatPmpResult::NetworkFailure => ResultCode::NetworkFailure,
                _ => ResultCode::NotAuthorized,
            },
        );
        resp.emit(out).ok()
    }

    fn public_address(&mut self, now: Millis, subscriber: IpAddr) -> Result<Ipv4Addr, ResultCode> {
        if self.compiled.class_of(subscriber).is_none() {
            return Err(ResultCode::NotAuthorized);
        }
        self.rate_limit(now, subscriber).map_err(|r| r.code)?;
        // An IPv4 firewall (RFC 6887 §3): the public address is the host's own.
        if let (true, IpAddr::V4(own)) = (self.compiled.is_firewall(subscriber), subscriber) {
            return Ok(own);
        }
        self.ensure_blocks(now, subscriber, None)
            .map_err(|r| r.code)?;
        self.subscribers
            .get(&subscriber)
            .and_then(|s| s.ext)
            .ok_or(ResultCode::NoResources)
    }

    fn natpmp_map(
        &mut self,
        now: Millis,
        src: SocketAddr,
        subscriber: IpAddr,
        req: natpmp::Mapping,
    ) -> Result<(u16, u32), ResultCode> {
        if self.compiled.class_of(subscriber).is_none() {
            return Err(ResultCode::NotAuthorized);
        }
        self.rate_limit(now, subscriber).map_err(|r| r.code)?;
        let protocol = req.protocol.ip_protocol();
        if req.lifetime == 0 && req.internal_port == 0 {
            // RFC 6886 §3.4: delete all of this client's mappings for the
            // protocol, those NAT-PMP made: PCP clients' mappings are theirs.
            for slot in self.slots_of(subscriber) {
                if self.table.get(slot).is_some_and(|m| {
                    m.protocol == protocol && m.kind == MappingKind::Map && m.natpmp
                }) {
                    self.remove(now, slot, DeleteReason::Client);
                }
            }
            return Ok((0, 0));
        }
        let m = MapData {
            nonce: Nonce::default(),
            protocol,
            internal_port: req.internal_port,
            external_port: req.external_port,
            external_addr: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        };
        let ask = Ask {
            client: src,
            subscriber,
            lifetime: req.lifetime,
            opts: &ReqOptions::default(),
        };
        let granted = self.map(now, &ask, &m, Via::NatPmp).map_err(|r| r.code)?;
        let port = if req.lifetime == 0 {
            0
        } else {
            granted.external_port
        };
        Ok((port, granted.lifetime))
    }
}
