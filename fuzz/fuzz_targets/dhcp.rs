//! The node agent's DHCP server on one datagram from the bridge, where any guest (or
//! anything else on the network) can send anything.
//!
//! Beyond not panicking: with a sound lease table every reply encodes, decodes again, is
//! a BOOTREPLY to the same transaction, and is sent to a DHCP port.
#![no_main]

use std::net::Ipv4Addr;
use std::sync::LazyLock;

use dhcproto::v4::{Decodable, Decoder, Message, Opcode};
use libfuzzer_sys::fuzz_target;
use stratus_nodeagent::network::dhcp::{CLIENT_PORT, SERVER_PORT};
use stratus_nodeagent::network::{DhcpHost, DhcpServer, DhcpTable, Ipv4Subnet, MacAddr};

const SERVER: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);

/// Two leases: one with every option, one with none (and the longest lease time).
static DHCP: LazyLock<DhcpServer> = LazyLock::new(|| {
    let subnet = Ipv4Subnet::new(Ipv4Addr::new(198, 18, 0, 0), 24).expect("harness: subnet");
    let full = DhcpHost {
        mac: MacAddr::from_ipv4(Ipv4Addr::new(198, 18, 0, 10)),
        ip: Ipv4Addr::new(198, 18, 0, 10),
        subnet,
        router: Some(SERVER),
        dns_servers: vec![Ipv4Addr::new(198, 18, 0, 2), Ipv4Addr::new(198, 18, 0, 3)],
        domain: Some("cloud.example.org".into()),
        hostname: Some("onevm-10".into()),
        lease_time_secs: 3600,
    };
    let bare = DhcpHost {
        mac: MacAddr::from_ipv4(Ipv4Addr::new(198, 18, 0, 11)),
        ip: Ipv4Addr::new(198, 18, 0, 11),
        subnet,
        router: None,
        dns_servers: Vec::new(),
        domain: None,
        hostname: None,
        lease_time_secs: u32::MAX,
    };
    DhcpServer::new(SERVER, DhcpTable::new([full, bare]))
});

fuzz_target!(|data: &[u8]| {
    let reply = DHCP
        .handle_datagram(data)
        .expect("a reply from a sound lease table encodes");
    let Some((bytes, to)) = reply else {
        return;
    };
    let request = Message::decode(&mut Decoder::new(data)).expect("an answered request decoded");
    let reply = Message::decode(&mut Decoder::new(&bytes)).expect("the reply decodes");
    assert_eq!(reply.opcode(), Opcode::BootReply);
    assert_eq!(reply.xid(), request.xid(), "the reply answers the request");
    assert!(
        [CLIENT_PORT, SERVER_PORT].contains(&to.port()),
        "reply sent to port {}",
        to.port()
    );
});
