//! Sending a batch's replies: one `sendmmsg` per run of up to [`CHUNK`]
//! replies that leave by the same socket from the same address, instead of
//! one `sendmsg` each (the reflector pcpd is measured against batches the
//! same way). Each reply leaves from the address its request was sent to
//! (IP_PKTINFO / IPV6_PKTINFO, RFC 6887 §8.3: the response's source is the
//! request's destination).

use std::io::{self, IoSlice};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;

use nix::libc;
use nix::sys::socket::{sendmmsg, ControlMessage, MsgFlags, MultiHeaders, SockaddrStorage};
use quinn_udp::{Transmit, UdpSocketState};
use tokio::io::Interest;
use tokio::net::UdpSocket;

/// Replies per system call.
const CHUNK: usize = 64;

/// The message headers of one `sendmmsg`, allocated once per shard (for
/// no source address, an IPv4 one, an IPv6 one) and reused for every
/// batch.
pub(super) struct Sender {
    plain: MultiHeaders<SockaddrStorage>,
    v4: MultiHeaders<SockaddrStorage>,
    v6: MultiHeaders<SockaddrStorage>,
    addrs: Vec<Option<SockaddrStorage>>,
}

impl Sender {
    pub(super) fn new() -> Self {
        Sender {
            plain: MultiHeaders::preallocate(CHUNK, None),
            v4: MultiHeaders::preallocate(CHUNK, Some(nix::cmsg_space!(libc::in_pktinfo))),
            v6: MultiHeaders::preallocate(CHUNK, Some(nix::cmsg_space!(libc::in6_pktinfo))),
            addrs: Vec::with_capacity(CHUNK),
        }
    }

    /// Sends `replies` (destination and datagram) by `sock` from `src`;
    /// returns how many could not be sent (a full socket buffer: dropped,
    /// as a lost datagram would be; the client retransmits, §8.1.1). A
    /// single reply takes one `sendmsg` (quinn-udp's).
    pub(super) fn send_from(
        &mut self,
        (sock, udp): &(UdpSocket, UdpSocketState),
        src: Option<IpAddr>,
        replies: &[(SocketAddr, &[u8])],
    ) -> usize {
        if let [(destination, contents)] = replies {
            let t = Transmit {
                destination: *destination,
                ecn: None,
                contents,
                segment_size: None,
                src_ip: src,
            };
            let failed = sock
                .try_io(Interest::WRITABLE, || udp.try_send(sock.into(), &t))
                .is_err();
            return usize::from(failed);
        }
        let mut rest = replies;
        while !rest.is_empty() {
            let chunk = &rest[..rest.len().min(CHUNK)];
            match sock.try_io(Interest::WRITABLE, || self.send_chunk(sock, src, chunk)) {
                Ok(n) if n > 0 => rest = &rest[n..],
                Ok(_) => break,
                Err(e) => {
                    if e.kind() != io::ErrorKind::WouldBlock {
                        tracing::debug!("sendmmsg: {e}");
                    }
                    break;
                }
            }
        }
        rest.len()
    }

    /// One `sendmmsg` of `chunk` (at most [`CHUNK`]); how many were sent.
    fn send_chunk(
        &mut self,
        sock: &UdpSocket,
        src: Option<IpAddr>,
        chunk: &[(SocketAddr, &[u8])],
    ) -> io::Result<usize> {
        let mut iovs = [[IoSlice::new(&[])]; CHUNK];
        for (iov, (_, p)) in iovs.iter_mut().zip(chunk) {
            *iov = [IoSlice::new(p)];
        }
        let iovs = &iovs[..chunk.len()];
        self.addrs.clear();
        self.addrs.extend(
            chunk
                .iter()
                .map(|(dst, _)| Some(SockaddrStorage::from(*dst))),
        );
        let (fd, flags, addrs) = (sock.as_raw_fd(), MsgFlags::empty(), &self.addrs);
        let sent = match src {
            None => {
                let none: [ControlMessage<'_>; 0] = [];
                sendmmsg(fd, &mut self.plain, iovs, addrs, none, flags).map(Iterator::count)
            }
            Some(IpAddr::V4(a)) => {
                let info = libc::in_pktinfo {
                    ipi_ifindex: 0,
                    ipi_spec_dst: libc::in_addr {
                        s_addr: u32::from_ne_bytes(a.octets()),
                    },
                    ipi_addr: libc::in_addr { s_addr: 0 },
                };
                let cmsg = [ControlMessage::Ipv4PacketInfo(&info)];
                sendmmsg(fd, &mut self.v4, iovs, addrs, cmsg, flags).map(Iterator::count)
            }
            Some(IpAddr::V6(a)) => {
                let info = libc::in6_pktinfo {
                    ipi6_addr: libc::in6_addr {
                        s6_addr: a.octets(),
                    },
                    ipi6_ifindex: 0,
                };
                let cmsg = [ControlMessage::Ipv6PacketInfo(&info)];
                sendmmsg(fd, &mut self.v6, iovs, addrs, cmsg, flags).map(Iterator::count)
            }
        };
        sent.map_err(io::Error::from)
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, SocketAddr, UdpSocket as StdSocket};
    use std::time::Duration;

    use quinn_udp::UdpSocketState;

    use super::Sender;

    /// A run of replies from a wildcard socket leaves in one call, each
    /// from the address given (the request's destination, RFC 6887 §8.3),
    /// to its own destination.
    #[test]
    fn a_run_of_replies_leaves_from_the_requests_address() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .unwrap();
        rt.block_on(async {
            let std_sock = StdSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).unwrap();
            std_sock.set_nonblocking(true).unwrap();
            let state = UdpSocketState::new((&std_sock).into()).unwrap();
            let sock = (tokio::net::UdpSocket::from_std(std_sock).unwrap(), state);
            let clients: Vec<StdSocket> = (0..3)
                .map(|_| StdSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap())
                .collect();
            let payloads: Vec<Vec<u8>> = (0..3u8).map(|i| vec![i; 24 + usize::from(i)]).collect();
            let replies: Vec<(SocketAddr, &[u8])> = clients
                .iter()
                .zip(&payloads)
                .map(|(c, p)| (c.local_addr().unwrap(), &p[..]))
                .collect();
            let src = Ipv4Addr::new(127, 0, 0, 57);
            sock.0.writable().await.unwrap();
            let mut sender = Sender::new();
            assert_eq!(sender.send_from(&sock, Some(src.into()), &replies), 0);
            let from_port = sock.0.local_addr().unwrap().port();
            for (c, p) in clients.iter().zip(&payloads) {
                c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                let mut buf = [0u8; 64];
                let (n, from) = c.recv_from(&mut buf).unwrap();
                assert_eq!(&buf[..n], &p[..]);
                assert_eq!(from, SocketAddr::from((src, from_port)));
            }
        });
    }
}
