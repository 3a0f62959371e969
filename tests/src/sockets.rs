//! What the kernel says about the pair's UDP sockets: datagrams it dropped because a
//! socket's receive buffer was full (`/proc/net/udp`, `/proc/net/udp6`, column `drops`).
//!
//! Such a drop never reaches the relay's counters (the relay handed the datagram to the
//! kernel successfully) yet quinn rightly counts the packet lost: it is a real loss, at
//! the receiving host instead of on the link. Comparing quinn's loss count with the
//! relay's drops therefore needs these too.

use std::fs;

/// Datagrams dropped so far by the UDP sockets bound to local `port` (all addresses,
/// IPv4 and IPv6), or `None` when `/proc/net` cannot be read or no such socket exists.
pub fn udp_drops(port: u16) -> Option<u64> {
    let mut found = None;
    for table in ["/proc/net/udp", "/proc/net/udp6"] {
        let Ok(text) = fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let local_port = fields
                .get(1)
                .and_then(|a| a.rsplit(':').next())
                .and_then(|p| u16::from_str_radix(p, 16).ok());
            if local_port != Some(port) {
                continue;
            }
            if let Some(drops) = fields.last().and_then(|d| d.parse::<u64>().ok()) {
                *found.get_or_insert(0) += drops;
            }
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[allow(clippy::unwrap_used)]
    fn a_bound_socket_is_found_with_no_drops_and_an_unbound_port_is_not() {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = s.local_addr().unwrap().port();
        assert_eq!(udp_drops(port), Some(0));
        drop(s);
        assert_eq!(udp_drops(port), None);
    }
}
