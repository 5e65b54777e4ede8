//! Ports for a whole cluster on one machine's loopback: the local cluster
//! behind `surge demo`, and the multi-process tests.
//!
//! Asking the kernel for port 0 returns a port from the *ephemeral* range,
//! the very range every outgoing connection draws its local port from. A
//! node that is already up reconnects to the peers that are not yet up, with
//! backoff, drawing a fresh ephemeral port each time; sooner or later one of
//! those is the port a later node was about to listen on, and that node
//! fails with "address already in use" (it happened in CI). Ports below the
//! ephemeral range are never handed to an outgoing connection, so only a
//! listener can hold one, and [`loopback_ports`] checks that none does.

use std::hash::{BuildHasher as _, Hasher as _};
use std::io;
use std::net::TcpListener;

/// The lowest port [`loopback_ports`] hands out, clear of the well-known
/// and commonly configured ones.
const FLOOR: u16 = 10_000;

/// `count` distinct ports on 127.0.0.1 that nobody listens on and that no
/// outgoing connection will take. Where the search starts is random, so
/// concurrent callers (tests in parallel) rarely probe the same ports.
pub fn loopback_ports(count: usize) -> io::Result<Vec<u16>> {
    let ceiling = ephemeral_floor();
    let span = ceiling.saturating_sub(FLOOR);
    if span == 0 {
        return Err(io::Error::other(format!("no ports between {FLOOR} and the ephemeral range at {ceiling}")));
    }
    let start = std::collections::hash_map::RandomState::new().build_hasher().finish() % u64::from(span);
    // Held until every port is chosen, so no port is chosen twice.
    let mut held = Vec::with_capacity(count);
    for offset in 0..u64::from(span) {
        if held.len() == count {
            break;
        }
        let port = FLOOR + ((start + offset) % u64::from(span)) as u16;
        if let Ok(listener) = TcpListener::bind(("127.0.0.1", port)) {
            held.push(listener);
        }
    }
    if held.len() < count {
        return Err(io::Error::other(format!("only {} free ports below {ceiling}, {count} wanted", held.len())));
    }
    held.iter().map(|listener| Ok(listener.local_addr()?.port())).collect()
}

/// Where the kernel's ephemeral range starts: Linux says so in /proc;
/// elsewhere 32768, below both Linux's default and the IANA range (49152).
fn ephemeral_floor() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse().ok())
        .unwrap_or(32_768)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_distinct_free_and_below_the_ephemeral_range() {
        let ports = loopback_ports(12).unwrap();
        let mut distinct = ports.clone();
        distinct.sort_unstable();
        distinct.dedup();
        assert_eq!(distinct.len(), 12, "{ports:?}");
        for port in ports {
            assert!((FLOOR..ephemeral_floor()).contains(&port), "{port}");
            TcpListener::bind(("127.0.0.1", port)).unwrap_or_else(|e| panic!("port {port}: {e}"));
        }
    }
}
