//! STUN (RFC 8489, formerly RFC 5389): just enough to learn the public address of the
//! endpoint's UDP socket — a Binding request, and the XOR-MAPPED-ADDRESS (or, from an old
//! server, MAPPED-ADDRESS) of its success response.
//!
//! The request leaves from the very socket quinn uses (so the NAT mapping it reports is the
//! one QUIC packets get), and responses are told apart from QUIC packets on receipt
//! ([`is_stun`]): a STUN message has the magic cookie at bytes 4..8 and the top two bits of
//! byte 0 clear, while every QUIC packet has the 0x40 bit of byte 0 set (RFC 9000 §17).
//!
//! Hand-written rather than a crate: the two messages used here take ~100 lines, while the
//! STUN crates carry a whole codec framework (and TURN, ICE, integrity and fingerprint
//! attributes) this does not need. The parser checks every length against the datagram and
//! is fuzzed by a property test.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The fixed cookie of every STUN message since RFC 5389.
pub const MAGIC_COOKIE: u32 = 0x2112_A442;
const HEADER: usize = 20;
const BINDING_REQUEST: u16 = 0x0001;
const BINDING_SUCCESS: u16 = 0x0101;
const MAPPED_ADDRESS: u16 = 0x0001;
const XOR_MAPPED_ADDRESS: u16 = 0x0020;

/// A transaction id: 96 random bits chosen by the requester.
pub type TransactionId = [u8; 12];

/// Whether a datagram is a STUN message rather than QUIC.
pub fn is_stun(d: &[u8]) -> bool {
    d.len() >= HEADER && d[0] & 0xC0 == 0 && d[4..8] == MAGIC_COOKIE.to_be_bytes()
}

/// A Binding request with no attributes.
pub fn binding_request(id: &TransactionId) -> Vec<u8> {
    let mut m = Vec::with_capacity(HEADER);
    m.extend_from_slice(&BINDING_REQUEST.to_be_bytes());
    m.extend_from_slice(&0u16.to_be_bytes());
    m.extend_from_slice(&MAGIC_COOKIE.to_be_bytes());
    m.extend_from_slice(id);
    m
}

/// The transaction id and mapped address of a Binding success response; None for
/// anything else (another message type, a truncated or malformed message, no address).
pub fn parse_binding_response(d: &[u8]) -> Option<(TransactionId, SocketAddr)> {
    if !is_stun(d) {
        return None;
    }
    let kind = u16::from_be_bytes([d[0], d[1]]);
    let len = u16::from_be_bytes([d[2], d[3]]) as usize;
    if kind != BINDING_SUCCESS || !len.is_multiple_of(4) || HEADER + len > d.len() {
        return None;
    }
    let id: TransactionId = d[8..20].try_into().ok()?;
    let mut attrs = &d[HEADER..HEADER + len];
    let mut plain = None;
    while attrs.len() >= 4 {
        let t = u16::from_be_bytes([attrs[0], attrs[1]]);
        let l = u16::from_be_bytes([attrs[2], attrs[3]]) as usize;
        let padded = l.div_ceil(4) * 4;
        if 4 + padded > attrs.len() {
            return None;
        }
        let v = &attrs[4..4 + l];
        match t {
            XOR_MAPPED_ADDRESS => return address(v, Some(&id)).map(|a| (id, a)),
            MAPPED_ADDRESS => plain = plain.or_else(|| address(v, None)),
            _ => {}
        }
        attrs = &attrs[4 + padded..];
    }
    plain.map(|a| (id, a))
}

/// An address attribute's value: reserved byte, family (1: IPv4, 2: IPv6), port, address;
/// XOR-ed with the cookie (and, for IPv6, the transaction id) when `xor` is given.
fn address(v: &[u8], xor: Option<&TransactionId>) -> Option<SocketAddr> {
    if v.len() < 4 {
        return None;
    }
    let cookie = MAGIC_COOKIE.to_be_bytes();
    let mut port = u16::from_be_bytes([v[2], v[3]]);
    if xor.is_some() {
        port ^= (MAGIC_COOKIE >> 16) as u16;
    }
    let ip = match (v[1], v.len()) {
        (1, 8) => {
            let mut b: [u8; 4] = v[4..8].try_into().ok()?;
            if xor.is_some() {
                b.iter_mut().zip(cookie).for_each(|(x, k)| *x ^= k);
            }
            IpAddr::V4(Ipv4Addr::from(b))
        }
        (2, 20) => {
            let mut b: [u8; 16] = v[4..20].try_into().ok()?;
            if let Some(id) = xor {
                let key = cookie.iter().chain(id.iter());
                b.iter_mut().zip(key).for_each(|(x, k)| *x ^= k);
            }
            IpAddr::V6(Ipv6Addr::from(b))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// RFC 5769 §2.2: a sample IPv4 response (with SOFTWARE, XOR-MAPPED-ADDRESS,
    /// MESSAGE-INTEGRITY and FINGERPRINT), byte for byte.
    const RFC5769_V4: &[u8] = &[
        0x01, 0x01, 0x00, 0x3c, 0x21, 0x12, 0xa4, 0x42, 0xb7, 0xe7, 0xa7, 0x01, 0xbc, 0x34, 0xd6,
        0x86, 0xfa, 0x87, 0xdf, 0xae, 0x80, 0x22, 0x00, 0x0b, 0x74, 0x65, 0x73, 0x74, 0x20, 0x76,
        0x65, 0x63, 0x74, 0x6f, 0x72, 0x20, 0x00, 0x20, 0x00, 0x08, 0x00, 0x01, 0xa1, 0x47, 0xe1,
        0x12, 0xa6, 0x43, 0x00, 0x08, 0x00, 0x14, 0x2b, 0x91, 0xf5, 0x99, 0xfd, 0x9e, 0x90, 0xc3,
        0x8c, 0x74, 0x89, 0xf9, 0x2a, 0xf9, 0xba, 0x53, 0xf0, 0x6b, 0xe7, 0xd7, 0x80, 0x28, 0x00,
        0x04, 0xc0, 0x7d, 0x4c, 0x96,
    ];

    /// RFC 5769 §2.3: the IPv6 response.
    const RFC5769_V6: &[u8] = &[
        0x01, 0x01, 0x00, 0x48, 0x21, 0x12, 0xa4, 0x42, 0xb7, 0xe7, 0xa7, 0x01, 0xbc, 0x34, 0xd6,
        0x86, 0xfa, 0x87, 0xdf, 0xae, 0x80, 0x22, 0x00, 0x0b, 0x74, 0x65, 0x73, 0x74, 0x20, 0x76,
        0x65, 0x63, 0x74, 0x6f, 0x72, 0x20, 0x00, 0x20, 0x00, 0x14, 0x00, 0x02, 0xa1, 0x47, 0x01,
        0x13, 0xa9, 0xfa, 0xa5, 0xd3, 0xf1, 0x79, 0xbc, 0x25, 0xf4, 0xb5, 0xbe, 0xd2, 0xb9, 0xd9,
        0x00, 0x08, 0x00, 0x14, 0xa3, 0x82, 0x95, 0x4e, 0x4b, 0xe6, 0x7b, 0xf1, 0x17, 0x84, 0xc9,
        0x7c, 0x82, 0x92, 0xc2, 0x75, 0xbf, 0xe3, 0xed, 0x41, 0x80, 0x28, 0x00, 0x04, 0xc8, 0xfb,
        0x0b, 0x4c,
    ];

    #[test]
    fn reads_the_rfc_5769_sample_responses() {
        let (id, a) = parse_binding_response(RFC5769_V4).unwrap();
        assert_eq!(id, RFC5769_V4[8..20]);
        assert_eq!(a, "192.0.2.1:32853".parse().unwrap());
        let (_, a) = parse_binding_response(RFC5769_V6).unwrap();
        assert_eq!(
            a,
            "[2001:db8:1234:5678:11:2233:4455:6677]:32853"
                .parse()
                .unwrap()
        );
    }

    #[test]
    fn requests_are_stun_and_quic_packets_are_not() {
        let r = binding_request(&[7; 12]);
        assert_eq!(r.len(), 20);
        assert!(is_stun(&r));
        assert_eq!(
            parse_binding_response(&r),
            None,
            "a request is not a response"
        );
        // A QUIC long-header Initial and a short-header packet (0x40 set in both).
        let mut quic = vec![0xC3u8, 0, 0, 0, 1];
        quic.resize(1200, 0);
        assert!(!is_stun(&quic));
        let mut short = r.clone();
        short[0] = 0x40;
        assert!(!is_stun(&short));
    }

    #[test]
    fn truncated_or_lying_lengths_are_refused() {
        for cut in 0..RFC5769_V4.len() {
            assert_eq!(parse_binding_response(&RFC5769_V4[..cut]), None, "{cut}");
        }
        let mut long_attr = RFC5769_V4.to_vec();
        // XOR-MAPPED-ADDRESS claims 0xfff bytes.
        long_attr[38] = 0x0f;
        long_attr[39] = 0xff;
        assert_eq!(parse_binding_response(&long_attr), None);
        let mut bad_family = RFC5769_V4.to_vec();
        bad_family[41] = 3;
        assert_eq!(parse_binding_response(&bad_family), None);
    }

    proptest! {
        #[test]
        fn any_bytes_parse_without_panicking(mut d in proptest::collection::vec(any::<u8>(), 0..200), stun in any::<bool>()) {
            if stun && d.len() >= 20 {
                d[0] = 0x01; d[1] = 0x01; d[4..8].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
                let len = (d.len() - 20) as u16;
                d[2..4].copy_from_slice(&len.to_be_bytes());
            }
            let _ = parse_binding_response(&d);
        }
    }
}
