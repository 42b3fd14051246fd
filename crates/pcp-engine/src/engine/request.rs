//! The request path: datagram dispatch (RFC 6887 §8.2, §9), option
//! processing (§7.3), THIRD_PARTY authorization (§13.1), and the success
//! and error answers (§7.2, §8.3).

use std::net::{IpAddr, SocketAddr};

use pcp_wire::{
    natpmp, parse_request, pcp::emit_error_response, Disposition, Filter, Message, Nonce, OpData,
    Opcode, Options, PcpOption, PortSet, Prefix64, Request, Response, ResultCode,
};

use super::Engine;
use crate::types::{InternalEndpoint, MappingKey, Millis, Priority};

/// A row of [`crate::Stats::responses`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Row {
    Announce = 0,
    Map = 1,
    Peer = 2,
    NatPmp = 3,
    /// Unknown versions and opcodes.
    Other = 4,
}

impl Row {
    fn of(opcode: Opcode) -> Row {
        match opcode {
            Opcode::Announce => Row::Announce,
            Opcode::Map => Row::Map,
            Opcode::Peer => Row::Peer,
            _ => Row::Other,
        }
    }
}

/// A refusal: the result code and, when the RFC asks for a specific one,
/// the lifetime to report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Refusal {
    pub(super) code: ResultCode,
    pub(super) lifetime: Option<u32>,
}

impl From<ResultCode> for Refusal {
    fn from(code: ResultCode) -> Self {
        Refusal {
            code,
            lifetime: None,
        }
    }
}

/// What a successful MAP or PEER produced for the response.
pub(super) struct Granted {
    pub(super) lifetime: u32,
    pub(super) external_addr: IpAddr,
    pub(super) external_port: u16,
    pub(super) port_set: Option<PortSet>,
}

impl Granted {
    /// §15.1: a delete answers with the suggested fields copied.
    pub(super) fn deleted(suggested_addr: IpAddr, suggested_port: u16) -> Self {
        Granted {
            lifetime: 0,
            external_addr: suggested_addr,
            external_port: suggested_port,
            port_set: None,
        }
    }
}

/// Options of one request, after §7.3 processing.
#[derive(Default)]
pub(super) struct ReqOptions<'a> {
    pub(super) third_party: Option<IpAddr>,
    pub(super) prefer_failure: bool,
    pub(super) filters: Vec<Filter>,
    pub(super) has_filter: bool,
    pub(super) description: Option<&'a str>,
    pub(super) port_set: Option<PortSet>,
    pub(super) prefix64: bool,
}

/// Whether an error answer's request parsed: §7.2 zeroes the reserved
/// field of a parsed request and keeps the raw bytes otherwise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Parsed {
    Yes,
    No,
}

/// The request an error answers, with where it is counted.
struct ErrorTo<'a> {
    datagram: &'a [u8],
    row: Row,
    parsed: Parsed,
    epoch: u32,
}

impl Engine {
    /// Handles one datagram from `src`; writes the reply into `out` (at least
    /// 1100 octets) and returns its length, or `None` to drop silently.
    pub fn handle(
        &mut self,
        now: Millis,
        src: SocketAddr,
        datagram: &[u8],
        out: &mut [u8],
    ) -> Option<usize> {
        let n = self.answer(now, src, datagram, out);
        self.start_idle_holds(now);
        n
    }

    fn answer(
        &mut self,
        now: Millis,
        src: SocketAddr,
        datagram: &[u8],
        out: &mut [u8],
    ) -> Option<usize> {
        let epoch = self.epoch(now);
        let mut to = ErrorTo {
            datagram,
            row: Row::Other,
            parsed: Parsed::No,
            epoch,
        };
        // RFC 6887 §9: with NAT-PMP off, version 0 is just an unsupported version.
        if datagram.first() == Some(&natpmp::VERSION) && !self.compiled.config.natpmp {
            return self.answer_error(&to, ResultCode::UnsuppVersion.into(), out);
        }
        match parse_request(datagram) {
            Err(e) => match e.disposition() {
                Disposition::Drop => {
                    self.stats.drop(e.reason());
                    None
                }
                Disposition::PcpError(code) => {
                    if code != ResultCode::UnsuppVersion {
                        let opcode = datagram.get(1).map(|op| Opcode::from(op & 0x7f));
                        to.row = opcode.map_or(Row::Other, Row::of);
                    }
                    self.answer_error(&to, code.into(), out)
                }
                Disposition::NatPmpError(_) => {
                    self.count(Row::NatPmp, ResultCode::UnsuppOpcode);
                    natpmp::emit_unsupported_opcode(datagram, out).ok()
                }
            },
            Ok(Message::NatPmp(req)) => self.handle_natpmp(now, src, req, out),
            Ok(Message::Pcp(req)) => {
                to.row = Row::of(req.opcode());
                to.parsed = Parsed::Yes;
                match self.handle_pcp(now, src, &req, out) {
                    Ok(n) => {
                        self.count(to.row, ResultCode::Success);
                        Some(n)
                    }
                    Err(r) => self.answer_error(&to, r, out),
                }
            }
        }
    }

    /// How much `datagram` from `src` is worth under overload (see
    /// [`Priority`]); reads only, and costs a parse and a lookup.
    pub fn priority(&self, src: SocketAddr, datagram: &[u8]) -> Priority {
        let src_ip = src.ip().to_canonical();
        let exists = |key: MappingKey, nonce: Option<Nonce>| {
            let found = self.table.find(&key).and_then(|slot| self.table.get(slot));
            found.is_some_and(|m| nonce.is_none_or(|n| n == m.nonce))
        };
        match parse_request(datagram) {
            Err(_) => Priority::Garbage,
            Ok(Message::NatPmp(natpmp::Request::Map(m))) => {
                let key = MappingKey::inbound(InternalEndpoint {
                    addr: src_ip,
                    protocol: m.protocol.ip_protocol(),
                    port: m.internal_port,
                });
                if m.lifetime != 0 && exists(key, None) {
                    Priority::Renewal
                } else {
                    Priority::Create
                }
            }
            Ok(Message::NatPmp(_)) => Priority::Create,
            Ok(Message::Pcp(req)) => {
                let Ok(opts) = self.process_options(&req) else {
                    return Priority::Garbage;
                };
                let subscriber = opts.third_party.unwrap_or(src_ip);
                if req.client_addr != src_ip || self.compiled.class_of(subscriber).is_none() {
                    return Priority::Garbage;
                }
                let Some(key) = MappingKey::of_request(subscriber, &req.data) else {
                    return Priority::Create; // ANNOUNCE
                };
                let nonce = req.data.map_data().map(|m| m.nonce);
                if req.lifetime != 0 && exists(key, nonce) {
                    Priority::Renewal
                } else {
                    Priority::Create
                }
            }
        }
    }

    pub(super) fn count(&mut self, row: Row, code: ResultCode) {
        self.stats.count(row as usize, code);
    }

    fn answer_error(&mut self, to: &ErrorTo<'_>, r: Refusal, out: &mut [u8]) -> Option<usize> {
        self.count(to.row, r.code);
        let lifetime = r
            .lifetime
            .unwrap_or_else(|| self.compiled.error_lifetime(r.code));
        let parsed = to.parsed == Parsed::Yes;
        emit_error_response(to.datagram, r.code, lifetime, to.epoch, parsed, out).ok()
    }

    fn handle_pcp(
        &mut self,
        now: Millis,
        src: SocketAddr,
        req: &Request<'_>,
        out: &mut [u8],
    ) -> Result<usize, Refusal> {
        let src_ip = src.ip().to_canonical();
        // §8.2: the client address field must be the packet's source.
        if req.client_addr != src_ip {
            return Err(ResultCode::AddressMismatch.into());
        }
        let opts = self.process_options(req)?;
        let granted = match req.data {
            // §14.1.2: a solicited ANNOUNCE gets SUCCESS with lifetime 0.
            OpData::Announce => None,
            OpData::Map(_) | OpData::Peer(_) => {
                let subscriber = self.authorize(src_ip, &opts)?;
                let ask = super::map::Ask {
                    client: src,
                    subscriber,
                    lifetime: req.lifetime,
                    opts: &opts,
                };
                let records = self.subscribers.len();
                let granted = self.map_or_peer(now, &ask, req);
                // A record this request made but left empty goes again (a
                // flood leaves no records).
                if self.subscribers.len() > records {
                    self.forget_if_stateless(subscriber);
                }
                Some(granted?)
            }
        };
        self.emit_success(now, req, &opts, granted.as_ref(), out)
    }

    fn map_or_peer(
        &mut self,
        now: Millis,
        ask: &super::map::Ask<'_>,
        req: &Request<'_>,
    ) -> Result<Granted, Refusal> {
        self.rate_limit(now, ask.subscriber)?;
        match req.data {
            OpData::Peer(p) => self.peer(now, ask, &p),
            OpData::Map(m) => self.map(now, ask, &m, super::map::Via::Pcp),
            OpData::Announce => Err(ResultCode::MalformedRequest.into()),
        }
    }

    /// The SUCCESS response: the request's data with the assigned external
    /// endpoint, then the processed options in request order (§7.3).
    fn emit_success(
        &self,
        now: Millis,
        req: &Request<'_>,
        opts: &ReqOptions<'_>,
        granted: Option<&Granted>,
        out: &mut [u8],
    ) -> Result<usize, Refusal> {
        let data = match (req.data, granted) {
            (OpData::Map(mut m), Some(g)) => {
                m.external_addr = g.external_addr;
                m.external_port = g.external_port;
                OpData::Map(m)
            }
            (OpData::Peer(mut p), Some(g)) => {
                p.map.external_addr = g.external_addr;
                p.map.external_port = g.external_port;
                OpData::Peer(p)
            }
            (d, _) => d,
        };
        let resp = Response {
            result: ResultCode::Success,
            lifetime: granted.map_or(0, |g| g.lifetime),
            epoch: self.epoch(now),
            data,
            options: Options::NONE,
        };
        let head = resp.emit(out).map_err(|_| ResultCode::MalformedRequest)?;
        let port_set = granted.and_then(|g| g.port_set);
        let mut at = head;
        for opt in req.options.iter() {
            let echoed = match opt {
                PcpOption::ThirdParty(_) | PcpOption::PreferFailure | PcpOption::Filter(_) => {
                    Some(opt)
                }
                PcpOption::Description(_) if opts.description.is_some() => Some(opt),
                PcpOption::PortSet(_) => port_set.map(PcpOption::PortSet),
                PcpOption::Prefix64(_) if opts.prefix64 => self.compiled.prefix64.map(|p| {
                    PcpOption::Prefix64(Prefix64 {
                        prefix_len: self.compiled.prefix64_len,
                        prefix_and_suffix: p,
                        ipv4_prefixes: None,
                    })
                }),
                _ => None,
            };
            if let Some(o) = echoed {
                if at + o.wire_len() > pcp_wire::pcp::MAX_MESSAGE_LEN {
                    // Cannot happen: echoed options are never longer than the
                    // request's; §7.3 would want MALFORMED_REQUEST here.
                    break;
                }
                at += o
                    .emit(&mut out[at..])
                    .map_err(|_| ResultCode::MalformedRequest)?;
            }
        }
        Ok(at)
    }

    /// §7.3 and §13: which options apply, and which refuse the request.
    fn process_options<'a>(&self, req: &Request<'a>) -> Result<ReqOptions<'a>, Refusal> {
        let o = &self.compiled.config.options;
        let opcode = req.opcode();
        let is_map = opcode == Opcode::Map;
        let mut r = ReqOptions::default();
        for opt in req.options.iter() {
            match opt {
                PcpOption::ThirdParty(addr) => {
                    if opcode == Opcode::Announce || self.compiled.config.third_party.is_empty() {
                        // §13.1: disabled THIRD_PARTY is UNSUPP_OPTION.
                        return Err(ResultCode::UnsuppOption.into());
                    }
                    r.third_party = Some(addr);
                }
                PcpOption::PreferFailure if opcode == Opcode::Peer => {
                    // §12.1: "if a PCP server receives a PEER request
                    // containing the PREFER_FAILURE option it MUST return a
                    // MALFORMED_REQUEST error response."
                    return Err(ResultCode::MalformedRequest.into());
                }
                PcpOption::PreferFailure => {
                    // §7.3: valid only for MAP; a mandatory option not valid
                    // or disabled here is UNSUPP_OPTION.
                    if !is_map || !o.prefer_failure {
                        return Err(ResultCode::UnsuppOption.into());
                    }
                    r.prefer_failure = true;
                }
                PcpOption::Filter(f) => {
                    if !is_map || !o.filter {
                        return Err(ResultCode::UnsuppOption.into());
                    }
                    // §13.3: FILTER with lifetime 0 is MALFORMED_OPTION.
                    if req.lifetime == 0 {
                        return Err(ResultCode::MalformedOption.into());
                    }
                    r.has_filter = true;
                    if f.prefix_len == 0 {
                        r.filters.clear();
                    }
                    r.filters.push(f);
                }
                PcpOption::Description(text) if o.description && opcode != Opcode::Announce => {
                    r.description = Some(text);
                }
                PcpOption::PortSet(p) if is_map && o.port_set => r.port_set = Some(p),
                PcpOption::Prefix64(_) if opcode != Opcode::Peer => r.prefix64 = true,
                PcpOption::Unknown { code, .. } if code & 0x80 == 0 => {
                    // §7.3: an unrecognized mandatory option.
                    return Err(ResultCode::UnsuppOption.into());
                }
                _ => {} // optional and unprocessed: ignored, not echoed (§7.3)
            }
        }
        if r.prefer_failure {
            check_prefer_failure(req, &r)?;
        }
        Ok(r)
    }

    /// §13.1 THIRD_PARTY policy and subscriber lookup; returns the subscriber.
    fn authorize(&mut self, src: IpAddr, opts: &ReqOptions<'_>) -> Result<IpAddr, Refusal> {
        let subscriber = match opts.third_party {
            None => src,
            Some(target) => {
                let refusal = if target == src {
                    // §13.1: the sender's own address is MALFORMED_REQUEST.
                    Some(ResultCode::MalformedRequest)
                } else if !self.compiled.third_party_allowed(src) {
                    // §13.1: an unauthorized host gets UNSUPP_OPTION.
                    Some(ResultCode::UnsuppOption)
                } else if !self.compiled.third_party_may_act_for(src, target) {
                    Some(ResultCode::NotAuthorized)
                } else {
                    None
                };
                if let Some(code) = refusal {
                    self.stats.third_party_refusals += 1;
                    return Err(code.into());
                }
                target
            }
        };
        if self.compiled.class_of(subscriber).is_none() {
            // Not a subscriber of this NAT: refused by policy (§7.4 NOT_AUTHORIZED).
            return Err(ResultCode::NotAuthorized.into());
        }
        Ok(subscriber)
    }
}

/// §11.3, §13.2 and RFC 7753 §4.2: the combinations PREFER_FAILURE forbids.
fn check_prefer_failure(req: &Request<'_>, r: &ReqOptions<'_>) -> Result<(), Refusal> {
    // §11.3: PREFER_FAILURE makes no sense with lifetime 0.
    if req.lifetime == 0 {
        return Err(ResultCode::MalformedOption.into());
    }
    // §13.2: PREFER_FAILURE with suggested port 0 is MALFORMED_OPTION.
    if let OpData::Map(m) = req.data {
        if m.external_port == 0 {
            return Err(ResultCode::MalformedOption.into());
        }
    }
    // RFC 7753 §4.2: PORT_SET with PREFER_FAILURE is MALFORMED_OPTION.
    if r.port_set.is_some() {
        return Err(ResultCode::MalformedOption.into());
    }
    Ok(())
}
