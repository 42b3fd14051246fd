//! Fixed-size addresses (RFC 6887 §5): every address field is 128 bits, and
//! an IPv4 address travels as an IPv4-mapped IPv6 address (::ffff:a.b.c.d).

use core::net::{IpAddr, Ipv6Addr};

/// Reads a 16-octet address field; IPv4-mapped addresses become IPv4.
///
/// The caller passes exactly 16 octets (checked by the message parser).
pub fn read_addr(field: &[u8]) -> IpAddr {
    let mut octets = [0u8; 16];
    octets.copy_from_slice(&field[..16]);
    Ipv6Addr::from(octets).to_canonical()
}

/// Encodes an address as a 16-octet field; IPv4 becomes IPv4-mapped (§5).
pub fn write_addr(addr: IpAddr) -> [u8; 16] {
    match addr {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::net::Ipv4Addr;

    #[test]
    fn ipv4_is_mapped_per_section_5() {
        let v4 = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1));
        let field = write_addr(v4);
        assert_eq!(
            field,
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 192, 0, 2, 1]
        );
        assert_eq!(read_addr(&field), v4);
        let v6: IpAddr = "2001:db8::1".parse().unwrap();
        assert_eq!(read_addr(&write_addr(v6)), v6);
        assert!(read_addr(&write_addr(Ipv4Addr::UNSPECIFIED.into())).is_unspecified());
        assert!(read_addr(&[0; 16]).is_unspecified());
    }
}
