//! Where a multicast announcement leaves: on the paths requests arrive on
//! (RFC 6887 §14.1.3; RFC 6886 §3.2.1 sends on the link-local group). A
//! socket bound to an address sends by that address's interface; a
//! wildcard socket sends once by every multicast interface that is up.
//! Without this the kernel picks one interface by its routes, on a
//! gateway usually the WAN side, and no client hears the announcement.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use nix::ifaddrs::getifaddrs;
use nix::net::if_::{if_nametoindex, InterfaceFlags};
use quinn_udp::{Transmit, UdpSocketState};
use socket2::SockRef;
use tokio::io::Interest;
use tokio::net::UdpSocket;

/// An interface to send by: IP_MULTICAST_IF takes its IPv4 address,
/// IPV6_MULTICAST_IF its index; the source is the interface's address (for
/// IPv6 a global one when it has one: clients compare the source with the
/// server address they know, and ff02::1 would otherwise get the
/// link-local address).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Via {
    V4(Ipv4Addr),
    V6 {
        index: u32,
        source: Option<Ipv6Addr>,
    },
}

/// The interfaces a socket bound to `local` sends multicast by: the one
/// holding its address, or (wildcard) every multicast interface that is
/// up, loopback aside; one entry per interface.
fn interfaces(local: SocketAddr) -> io::Result<Vec<Via>> {
    let mut out: Vec<(String, Via)> = Vec::new();
    for ifa in getifaddrs()? {
        let Some(addr) = ifa.address.as_ref() else {
            continue;
        };
        let ip = match (addr.as_sockaddr_in(), addr.as_sockaddr_in6()) {
            (Some(v4), _) => IpAddr::V4(v4.ip()),
            (_, Some(v6)) => IpAddr::V6(v6.ip()),
            _ => continue,
        };
        if ip.is_ipv4() != local.is_ipv4() {
            continue;
        }
        let wanted = if local.ip().is_unspecified() {
            let up = InterfaceFlags::IFF_UP | InterfaceFlags::IFF_MULTICAST;
            ifa.flags.contains(up) && !ifa.flags.contains(InterfaceFlags::IFF_LOOPBACK)
        } else {
            ip == local.ip()
        };
        if !wanted {
            continue;
        }
        let name = ifa.interface_name.clone();
        let known = out.iter_mut().find(|(n, _)| *n == name);
        match (ip, known) {
            (IpAddr::V4(_), Some(_)) => {}
            (IpAddr::V4(a), None) => out.push((name, Via::V4(a))),
            (IpAddr::V6(a), known) => {
                let global = !a.is_unicast_link_local();
                match known {
                    Some((_, Via::V6 { source, .. })) if source.is_none() && global => {
                        *source = Some(a);
                    }
                    Some(_) => {}
                    None => {
                        let index = if_nametoindex(name.as_str())?;
                        let source = global.then_some(a);
                        out.push((name, Via::V6 { index, source }));
                    }
                }
            }
        }
    }
    Ok(out.into_iter().map(|(_, via)| via).collect())
}

/// Sends `payload` to the group `dst` from `sock` by each of its
/// interfaces; returns how many copies left.
pub(super) fn send(
    sock: &UdpSocket,
    udp: &UdpSocketState,
    dst: SocketAddr,
    payload: &[u8],
) -> io::Result<usize> {
    let local = sock.local_addr()?;
    let mut sent = 0;
    let mut last_err = None;
    for via in interfaces(local)? {
        let sref = SockRef::from(sock);
        let (chosen, source) = match via {
            Via::V4(a) => (sref.set_multicast_if_v4(&a), Some(IpAddr::V4(a))),
            Via::V6 { index, source } => (sref.set_multicast_if_v6(index), source.map(IpAddr::V6)),
        };
        let t = Transmit {
            destination: dst,
            ecn: None,
            contents: payload,
            segment_size: None,
            // A bound socket's source is its address already.
            src_ip: source.filter(|_| local.ip().is_unspecified()),
        };
        let send = || sock.try_io(Interest::WRITABLE, || udp.try_send(sock.into(), &t));
        match chosen.and_then(|()| send()) {
            Ok(()) => sent += 1,
            Err(e) => {
                tracing::debug!("multicast to {dst} by {via:?}: {e}");
                last_err = Some(e);
            }
        }
    }
    match (sent, last_err) {
        (0, Some(e)) => Err(e),
        _ => Ok(sent),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bound_socket_sends_by_its_own_interface_only() {
        let lo: SocketAddr = "127.0.0.1:5351".parse().unwrap();
        assert_eq!(interfaces(lo).unwrap(), vec![Via::V4(Ipv4Addr::LOCALHOST)]);
        // A wildcard socket never sends by loopback.
        let any: SocketAddr = "0.0.0.0:5351".parse().unwrap();
        assert!(!interfaces(any)
            .unwrap()
            .contains(&Via::V4(Ipv4Addr::LOCALHOST)));
    }
}
