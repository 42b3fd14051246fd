//! Kernel steering: a classic BPF program on the SO_REUSEPORT group picks
//! the socket by the datagram's source address, so that each datagram lands
//! on the shard that owns its subscriber ([`pcp_engine::shard_of`] computes
//! the same function). Datagrams the program cannot place (THIRD_PARTY
//! requests act for another address) still go through the hand-off queue.

pub use imp::attach;

#[cfg(any(
    target_arch = "x86_64",
    target_arch = "aarch64",
    target_arch = "x86",
    target_arch = "arm",
    target_arch = "riscv64"
))]
mod imp {
    use std::io;
    use std::os::fd::AsRawFd;

    /// asm-generic/socket.h; the architectures above use the generic values.
    const SO_ATTACH_REUSEPORT_CBPF: libc::c_int = 51;

    /// Attaches `A = last 32 bits of the source address; return A % shards`
    /// to the reuseport group of `sock`. The k-th socket bound into the group
    /// is shard k's, so the returned index is the shard.
    #[allow(unsafe_code)]
    pub fn attach(sock: &impl AsRawFd, ipv6: bool, shards: u32) -> io::Result<()> {
        // IPv4 source at network offset 12; IPv6 source at 8, its last word at 20.
        let offset = if ipv6 { 20 } else { 12 };
        let op = |code: u32, k: u32| libc::sock_filter {
            code: code as u16,
            jt: 0,
            jf: 0,
            k,
        };
        let program = [
            op(
                libc::BPF_LD | libc::BPF_W | libc::BPF_ABS,
                (libc::SKF_NET_OFF + offset) as u32,
            ),
            op(libc::BPF_ALU | libc::BPF_MOD | libc::BPF_K, shards.max(1)),
            op(libc::BPF_RET | libc::BPF_A, 0),
        ];
        let fprog = libc::sock_fprog {
            len: program.len() as u16,
            filter: program.as_ptr().cast_mut(),
        };
        // SAFETY: `fprog` and the `program` it points to live across the call,
        // the length matches, and the kernel copies the program before returning.
        let rc = unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                SO_ATTACH_REUSEPORT_CBPF,
                std::ptr::from_ref(&fprog).cast(),
                std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }
}

/// Elsewhere: no kernel steering; the hand-off queue does all the work.
#[cfg(not(any(
    target_arch = "x86_64",
    target_arch = "aarch64",
    target_arch = "x86",
    target_arch = "arm",
    target_arch = "riscv64"
)))]
mod imp {
    pub fn attach(
        _sock: &impl std::os::fd::AsRawFd,
        _ipv6: bool,
        _shards: u32,
    ) -> std::io::Result<()> {
        Err(std::io::Error::new(
            std::io::ErrorKind::Unsupported,
            "no reuseport BPF on this architecture",
        ))
    }
}
