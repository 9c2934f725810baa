//! A fixed-lease DHCPv4 server: it answers only MACs it holds a lease for, with the address,
//! gateway, DNS servers, domain and hostname of that lease, and ignores every other client.
//!
//! Written on `dhcproto` rather than driving dnsmasq so the lease table is the pool state the
//! agent already persists (no config file to regenerate, no daemon to signal or supervise),
//! nothing listens on DNS port 53, and request handling is a pure function testable without
//! sockets.

use std::collections::HashMap;
use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::{Arc, RwLock};

use dhcproto::v4::{
    Decodable, Decoder, DhcpOption, Encodable, Encoder, HType, Message, MessageType, Opcode,
    OptionCode,
};
use tokio::net::UdpSocket;

use super::mac::MacAddr;
use super::pool::Ipv4Subnet;

pub const SERVER_PORT: u16 = 67;
pub const CLIENT_PORT: u16 = 68;

#[derive(Debug, thiserror::Error)]
pub enum DhcpError {
    #[error("cannot open the DHCP socket on interface {interface}: {source}")]
    Bind {
        interface: String,
        source: std::io::Error,
    },
    #[error("DHCP socket on interface {interface}: {source}")]
    Io {
        interface: String,
        source: std::io::Error,
    },
    #[error("cannot encode DHCP reply to {mac}: {reason}")]
    Encode { mac: MacAddr, reason: String },
}

/// Everything the server tells one guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DhcpHost {
    pub mac: MacAddr,
    pub ip: Ipv4Addr,
    pub subnet: Ipv4Subnet,
    pub router: Option<Ipv4Addr>,
    pub dns_servers: Vec<Ipv4Addr>,
    pub domain: Option<String>,
    pub hostname: Option<String>,
    pub lease_time_secs: u32,
}

/// Fixed MAC → host table. Shared with the server so the agent can add a guest before it
/// boots and drop it when the VM ends, without restarting the server.
#[derive(Debug, Default, Clone)]
pub struct DhcpTable {
    hosts: HashMap<MacAddr, DhcpHost>,
}

impl DhcpTable {
    pub fn new(hosts: impl IntoIterator<Item = DhcpHost>) -> Self {
        let mut table = DhcpTable::default();
        for h in hosts {
            table.insert(h);
        }
        table
    }

    pub fn insert(&mut self, host: DhcpHost) -> Option<DhcpHost> {
        self.hosts.insert(host.mac, host)
    }

    pub fn remove(&mut self, mac: MacAddr) -> Option<DhcpHost> {
        self.hosts.remove(&mac)
    }

    pub fn get(&self, mac: MacAddr) -> Option<&DhcpHost> {
        self.hosts.get(&mac)
    }

    pub fn len(&self) -> usize {
        self.hosts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.hosts.is_empty()
    }
}

/// A reply and where to send it.
#[derive(Debug, Clone)]
pub struct DhcpReply {
    pub message: Message,
    pub destination: SocketAddrV4,
}

#[derive(Debug, Clone)]
pub struct DhcpServer {
    server_ip: Ipv4Addr,
    table: Arc<RwLock<DhcpTable>>,
}

impl DhcpServer {
    /// `server_ip` is the server's own address on the guest network (the bridge address):
    /// clients echo it back in REQUEST to say which server's offer they took.
    pub fn new(server_ip: Ipv4Addr, table: DhcpTable) -> Self {
        DhcpServer {
            server_ip,
            table: Arc::new(RwLock::new(table)),
        }
    }

    pub fn server_ip(&self) -> Ipv4Addr {
        self.server_ip
    }

    pub fn table(&self) -> Arc<RwLock<DhcpTable>> {
        Arc::clone(&self.table)
    }

    fn lookup(&self, mac: MacAddr) -> Option<DhcpHost> {
        // A poisoned lock only means a writer panicked mid-insert of a whole entry; the map
        // itself is still consistent, so keep serving.
        let table = self.table.read().unwrap_or_else(|e| e.into_inner());
        table.get(mac).cloned()
    }

    /// Decides the answer to one client message; `None` means stay silent.
    pub fn handle(&self, request: &Message) -> Option<DhcpReply> {
        if request.opcode() != Opcode::BootRequest {
            return None;
        }
        let mac = client_mac(request)?;
        let msg_type = request.opts().msg_type()?;
        if !request.giaddr().is_unspecified() {
            // The server answers its own bridge, where no relay belongs: a "relay" address
            // is a guest's choice, and answering it would send the server's unicast
            // wherever that guest points.
            tracing::debug!(%mac, giaddr = %request.giaddr(), "ignoring relayed DHCP request");
            return None;
        }
        let Some(host) = self.lookup(mac) else {
            tracing::debug!(%mac, ?msg_type, "ignoring DHCP client without a fixed lease");
            return None;
        };
        match msg_type {
            MessageType::Discover => {
                tracing::info!(%mac, ip = %host.ip, "DHCPOFFER");
                Some(self.reply(request, &host, MessageType::Offer))
            }
            MessageType::Request => {
                if let Some(DhcpOption::ServerIdentifier(sid)) =
                    request.opts().get(OptionCode::ServerIdentifier)
                {
                    if *sid != self.server_ip {
                        tracing::debug!(%mac, server = %sid, "client chose another server");
                        return None;
                    }
                }
                let wanted = match request.opts().get(OptionCode::RequestedIpAddress) {
                    Some(DhcpOption::RequestedIpAddress(ip)) => *ip,
                    _ => request.ciaddr(),
                };
                if wanted == host.ip {
                    tracing::info!(%mac, ip = %host.ip, "DHCPACK");
                    Some(self.reply(request, &host, MessageType::Ack))
                } else {
                    // The guest remembers an address from an earlier life; NAK makes it start
                    // over with DISCOVER and get its fixed one.
                    tracing::info!(%mac, requested = %wanted, fixed = %host.ip, "DHCPNAK");
                    Some(self.nak(request))
                }
            }
            MessageType::Inform => Some(self.reply(request, &host, MessageType::Ack)),
            MessageType::Release | MessageType::Decline => {
                // Fixed leases are never reassigned, so there is nothing to free or blacklist.
                tracing::info!(%mac, ?msg_type, "client gave up its lease");
                None
            }
            _ => None,
        }
    }

    fn base_reply(&self, request: &Message, msg_type: MessageType) -> Message {
        let mut reply = Message::default();
        reply
            .set_opcode(Opcode::BootReply)
            .set_htype(request.htype())
            .set_xid(request.xid())
            .set_flags(request.flags())
            .set_chaddr(request.chaddr());
        let opts = reply.opts_mut();
        opts.insert(DhcpOption::MessageType(msg_type));
        opts.insert(DhcpOption::ServerIdentifier(self.server_ip));
        reply
    }

    fn nak(&self, request: &Message) -> DhcpReply {
        DhcpReply {
            message: self.base_reply(request, MessageType::Nak),
            // RFC 2131 4.1: without a relay a NAK is always broadcast, since the address the
            // client believes it has is the wrong one.
            destination: SocketAddrV4::new(Ipv4Addr::BROADCAST, CLIENT_PORT),
        }
    }

    fn reply(&self, request: &Message, host: &DhcpHost, msg_type: MessageType) -> DhcpReply {
        let mut reply = self.base_reply(request, msg_type);
        let inform = request.opts().has_msg_type(MessageType::Inform);
        if inform {
            // RFC 2131 4.3.5: INFORM gets configuration only, the client already has an address.
            reply.set_ciaddr(request.ciaddr());
        } else {
            reply.set_yiaddr(host.ip);
        }
        let opts = reply.opts_mut();
        if !inform {
            let lease = host.lease_time_secs;
            opts.insert(DhcpOption::AddressLeaseTime(lease));
            opts.insert(DhcpOption::Renewal(lease / 2));
            opts.insert(DhcpOption::Rebinding(
                (u64::from(lease) * 7 / 8).try_into().unwrap_or(u32::MAX),
            ));
        }
        opts.insert(DhcpOption::SubnetMask(host.subnet.netmask()));
        opts.insert(DhcpOption::BroadcastAddr(host.subnet.broadcast()));
        if let Some(router) = host.router {
            opts.insert(DhcpOption::Router(vec![router]));
        }
        if !host.dns_servers.is_empty() {
            opts.insert(DhcpOption::DomainNameServer(host.dns_servers.clone()));
        }
        if let Some(domain) = &host.domain {
            opts.insert(DhcpOption::DomainName(domain.clone()));
        }
        if let Some(name) = &host.hostname {
            opts.insert(DhcpOption::Hostname(name.clone()));
        }
        DhcpReply {
            message: reply,
            destination: destination(request, host),
        }
    }

    /// Parses one datagram and encodes the answer; malformed datagrams are dropped, as any
    /// host on the bridge can send them.
    pub fn handle_datagram(
        &self,
        datagram: &[u8],
    ) -> Result<Option<(Vec<u8>, SocketAddrV4)>, DhcpError> {
        let request = match Message::decode(&mut Decoder::new(datagram)) {
            Ok(m) => m,
            Err(e) => {
                tracing::debug!(error = %e, len = datagram.len(), "dropping malformed DHCP datagram");
                return Ok(None);
            }
        };
        let Some(reply) = self.handle(&request) else {
            return Ok(None);
        };
        let mut buf = Vec::with_capacity(dhcproto::v4::MIN_PACKET_SIZE);
        reply
            .message
            .encode(&mut Encoder::new(&mut buf))
            .map_err(|e| DhcpError::Encode {
                mac: client_mac(&request).unwrap_or(MacAddr([0; 6])),
                reason: e.to_string(),
            })?;
        // Some old clients drop BOOTP replies shorter than the 300-byte BOOTP minimum.
        if buf.len() < dhcproto::v4::MIN_PACKET_SIZE {
            buf.resize(dhcproto::v4::MIN_PACKET_SIZE, 0);
        }
        Ok(Some((buf, reply.destination)))
    }

    /// Opens UDP port 67 on one interface only, so one server per bridge can run side by side
    /// and none answers on the host's uplink.
    pub fn bind(self, interface: &str) -> Result<BoundDhcpServer, DhcpError> {
        let bind_err = |source| DhcpError::Bind {
            interface: interface.to_string(),
            source,
        };
        let sock = socket2::Socket::new(
            socket2::Domain::IPV4,
            socket2::Type::DGRAM,
            Some(socket2::Protocol::UDP),
        )
        .map_err(bind_err)?;
        sock.set_reuse_address(true).map_err(bind_err)?;
        sock.set_broadcast(true).map_err(bind_err)?;
        sock.bind_device(Some(interface.as_bytes()))
            .map_err(bind_err)?;
        sock.set_nonblocking(true).map_err(bind_err)?;
        let addr = SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, SERVER_PORT);
        sock.bind(&SocketAddr::V4(addr).into()).map_err(bind_err)?;
        let socket = UdpSocket::from_std(sock.into()).map_err(bind_err)?;
        tracing::info!(interface, server_ip = %self.server_ip, "DHCP server listening");
        Ok(BoundDhcpServer {
            server: self,
            socket,
            interface: interface.to_string(),
        })
    }
}

/// The client's Ethernet address. `hlen` comes off the wire and `Message::chaddr` slices by
/// it, panicking past 16, so it is checked before chaddr is touched.
fn client_mac(request: &Message) -> Option<MacAddr> {
    if request.htype() != HType::Eth || request.hlen() != 6 {
        return None;
    }
    MacAddr::from_slice(request.chaddr())
}

/// RFC 2131 4.1: unicast to a configured client, otherwise broadcast, because a client
/// without an address cannot answer ARP for the one being offered. Unicast only to the
/// client's own leased address: `ciaddr` is the guest's to write, and any other would let it
/// aim the server's answers at a neighbour.
fn destination(request: &Message, host: &DhcpHost) -> SocketAddrV4 {
    if request.ciaddr() == host.ip {
        SocketAddrV4::new(host.ip, CLIENT_PORT)
    } else {
        SocketAddrV4::new(Ipv4Addr::BROADCAST, CLIENT_PORT)
    }
}

/// A server with its socket open; [`BoundDhcpServer::run`] serves until `shutdown` resolves.
#[derive(Debug)]
pub struct BoundDhcpServer {
    server: DhcpServer,
    socket: UdpSocket,
    interface: String,
}

impl BoundDhcpServer {
    pub fn server(&self) -> &DhcpServer {
        &self.server
    }

    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let io_err = |source| DhcpError::Io {
            interface: self.interface.clone(),
            source,
        };
        tokio::pin!(shutdown);
        // Larger than any Ethernet frame so an oversized datagram is read whole and rejected.
        let mut buf = vec![0u8; 65536];
        loop {
            let received = tokio::select! {
                _ = &mut shutdown => break,
                r = self.socket.recv_from(&mut buf) => r,
            };
            let (len, from) = match received {
                Ok(got) => got,
                Err(e) => {
                    // Ending here would leave every guest on the bridge without renewals
                    // until the agent restarts; the error is logged and the server goes on,
                    // paced so a lasting error does not spin.
                    tracing::warn!("{}", io_err(e));
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            match self.server.handle_datagram(&buf[..len]) {
                Ok(Some((reply, to))) => {
                    if let Err(e) = self.socket.send_to(&reply, to).await {
                        // One unreachable client must not stop the server for the others.
                        tracing::warn!(%from, %to, error = %e, "cannot send DHCP reply");
                    }
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(%from, error = %e, "DHCP reply dropped"),
            }
        }
        tracing::info!(interface = self.interface, "DHCP server stopped");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dhcproto::v4::Flags;

    const SERVER: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);

    fn known_mac() -> MacAddr {
        MacAddr::from_ipv4(Ipv4Addr::new(198, 18, 0, 10))
    }

    fn host() -> DhcpHost {
        DhcpHost {
            mac: known_mac(),
            ip: Ipv4Addr::new(198, 18, 0, 10),
            subnet: "198.18.0.0/24".parse().unwrap(),
            router: Some(SERVER),
            dns_servers: vec![Ipv4Addr::new(198, 18, 0, 2), Ipv4Addr::new(198, 18, 0, 3)],
            domain: Some("cloud.example.org".into()),
            hostname: Some("onevm-10".into()),
            lease_time_secs: 3600,
        }
    }

    fn server() -> DhcpServer {
        DhcpServer::new(SERVER, DhcpTable::new([host()]))
    }

    fn client_msg(mac: MacAddr, msg_type: MessageType) -> Message {
        let mut m = Message::new_with_id(
            0x1234_5678,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            &mac.octets(),
        );
        m.opts_mut().insert(DhcpOption::MessageType(msg_type));
        m
    }

    fn request(mac: MacAddr, wanted: Ipv4Addr, server_id: Option<Ipv4Addr>) -> Message {
        let mut m = client_msg(mac, MessageType::Request);
        m.opts_mut().insert(DhcpOption::RequestedIpAddress(wanted));
        if let Some(sid) = server_id {
            m.opts_mut().insert(DhcpOption::ServerIdentifier(sid));
        }
        m
    }

    /// Sends through the byte-level path so encoding and decoding are exercised too.
    fn exchange(server: &DhcpServer, msg: &Message) -> Option<(Message, SocketAddrV4)> {
        let mut buf = Vec::new();
        msg.encode(&mut Encoder::new(&mut buf)).unwrap();
        let (bytes, to) = server.handle_datagram(&buf).unwrap()?;
        assert!(bytes.len() >= dhcproto::v4::MIN_PACKET_SIZE);
        Some((Message::decode(&mut Decoder::new(&bytes)).unwrap(), to))
    }

    fn assert_full_config(reply: &Message, expect_type: MessageType) {
        let h = host();
        let o = reply.opts();
        assert_eq!(reply.opcode(), Opcode::BootReply);
        assert_eq!(reply.xid(), 0x1234_5678);
        assert_eq!(reply.chaddr(), &h.mac.octets());
        assert_eq!(reply.yiaddr(), h.ip);
        assert_eq!(o.msg_type(), Some(expect_type));
        let get = |c| o.get(c).cloned();
        assert_eq!(
            get(OptionCode::ServerIdentifier),
            Some(DhcpOption::ServerIdentifier(SERVER))
        );
        assert_eq!(
            get(OptionCode::SubnetMask),
            Some(DhcpOption::SubnetMask(Ipv4Addr::new(255, 255, 255, 0)))
        );
        assert_eq!(
            get(OptionCode::BroadcastAddr),
            Some(DhcpOption::BroadcastAddr(Ipv4Addr::new(198, 18, 0, 255)))
        );
        assert_eq!(
            get(OptionCode::Router),
            Some(DhcpOption::Router(vec![SERVER]))
        );
        assert_eq!(
            get(OptionCode::DomainNameServer),
            Some(DhcpOption::DomainNameServer(h.dns_servers.clone()))
        );
        assert_eq!(
            get(OptionCode::DomainName),
            Some(DhcpOption::DomainName("cloud.example.org".into()))
        );
        assert_eq!(
            get(OptionCode::Hostname),
            Some(DhcpOption::Hostname("onevm-10".into()))
        );
        assert_eq!(
            get(OptionCode::AddressLeaseTime),
            Some(DhcpOption::AddressLeaseTime(3600))
        );
        assert_eq!(get(OptionCode::Renewal), Some(DhcpOption::Renewal(1800)));
        assert_eq!(
            get(OptionCode::Rebinding),
            Some(DhcpOption::Rebinding(3150))
        );
    }

    #[test]
    fn discover_gets_offer_with_all_options() {
        let (offer, to) =
            exchange(&server(), &client_msg(known_mac(), MessageType::Discover)).unwrap();
        assert_full_config(&offer, MessageType::Offer);
        assert_eq!(to, SocketAddrV4::new(Ipv4Addr::BROADCAST, CLIENT_PORT));
    }

    #[test]
    fn request_for_fixed_address_gets_ack() {
        let msg = request(known_mac(), host().ip, Some(SERVER));
        let (ack, to) = exchange(&server(), &msg).unwrap();
        assert_full_config(&ack, MessageType::Ack);
        assert_eq!(to.ip(), &Ipv4Addr::BROADCAST);
    }

    #[test]
    fn renewal_is_unicast_to_client() {
        let mut msg = client_msg(known_mac(), MessageType::Request);
        msg.set_ciaddr(host().ip);
        let (ack, to) = exchange(&server(), &msg).unwrap();
        assert_full_config(&ack, MessageType::Ack);
        assert_eq!(to, SocketAddrV4::new(host().ip, CLIENT_PORT));
    }

    #[test]
    fn broadcast_flag_is_echoed() {
        let mut msg = client_msg(known_mac(), MessageType::Discover);
        msg.set_flags(Flags::default().set_broadcast());
        let (offer, _) = exchange(&server(), &msg).unwrap();
        assert!(offer.flags().broadcast());
    }

    #[test]
    fn request_for_other_address_gets_nak() {
        let msg = request(known_mac(), Ipv4Addr::new(198, 18, 0, 77), Some(SERVER));
        let (nak, to) = exchange(&server(), &msg).unwrap();
        assert_eq!(nak.opts().msg_type(), Some(MessageType::Nak));
        assert_eq!(nak.yiaddr(), Ipv4Addr::UNSPECIFIED);
        assert!(nak.opts().get(OptionCode::AddressLeaseTime).is_none());
        assert_eq!(to, SocketAddrV4::new(Ipv4Addr::BROADCAST, CLIENT_PORT));
    }

    #[test]
    fn request_to_another_server_is_ignored() {
        let msg = request(known_mac(), host().ip, Some(Ipv4Addr::new(198, 18, 0, 254)));
        assert!(exchange(&server(), &msg).is_none());
    }

    #[test]
    fn unknown_mac_is_ignored() {
        let stranger = MacAddr::from_ipv4(Ipv4Addr::new(198, 18, 0, 11));
        let s = server();
        assert!(exchange(&s, &client_msg(stranger, MessageType::Discover)).is_none());
        assert!(exchange(&s, &request(stranger, host().ip, Some(SERVER))).is_none());
    }

    #[test]
    fn table_changes_take_effect_without_restart() {
        let s = DhcpServer::new(SERVER, DhcpTable::default());
        let discover = client_msg(known_mac(), MessageType::Discover);
        assert!(exchange(&s, &discover).is_none());
        s.table().write().unwrap().insert(host());
        assert!(exchange(&s, &discover).is_some());
        s.table().write().unwrap().remove(known_mac());
        assert!(exchange(&s, &discover).is_none());
    }

    #[test]
    fn optional_options_are_omitted_when_unset() {
        let bare = DhcpHost {
            router: None,
            dns_servers: vec![],
            domain: None,
            hostname: None,
            ..host()
        };
        let s = DhcpServer::new(SERVER, DhcpTable::new([bare]));
        let (offer, _) = exchange(&s, &client_msg(known_mac(), MessageType::Discover)).unwrap();
        for code in [
            OptionCode::Router,
            OptionCode::DomainNameServer,
            OptionCode::DomainName,
            OptionCode::Hostname,
        ] {
            assert!(offer.opts().get(code).is_none(), "{code:?}");
        }
        assert!(offer.opts().get(OptionCode::SubnetMask).is_some());
    }

    #[test]
    fn release_decline_and_replies_are_silent() {
        let s = server();
        for t in [MessageType::Release, MessageType::Decline] {
            assert!(exchange(&s, &client_msg(known_mac(), t)).is_none(), "{t:?}");
        }
        let mut reply = client_msg(known_mac(), MessageType::Offer);
        reply.set_opcode(Opcode::BootReply);
        assert!(exchange(&s, &reply).is_none());
        let mut no_type = client_msg(known_mac(), MessageType::Discover);
        no_type.opts_mut().remove(OptionCode::MessageType);
        assert!(exchange(&s, &no_type).is_none());
    }

    #[test]
    fn answers_go_to_the_clients_own_address_and_nowhere_else() {
        let neighbour = Ipv4Addr::new(198, 18, 0, 77);
        // A "relay" address: the guest's own choice, so the request is not answered at all.
        for msg_type in [
            MessageType::Discover,
            MessageType::Request,
            MessageType::Inform,
        ] {
            let mut msg = client_msg(known_mac(), msg_type);
            msg.set_giaddr(neighbour);
            assert!(
                exchange(&server(), &msg).is_none(),
                "{msg_type:?} via a relay"
            );
        }
        // An INFORM claiming a neighbour's address gets the configuration by broadcast.
        let mut msg = client_msg(known_mac(), MessageType::Inform);
        msg.set_ciaddr(neighbour);
        let (ack, to) = exchange(&server(), &msg).unwrap();
        assert_eq!(ack.opts().msg_type(), Some(MessageType::Ack));
        assert_eq!(to, SocketAddrV4::new(Ipv4Addr::BROADCAST, CLIENT_PORT));
        // A renewal from a neighbour's address asks for that address: NAK, by broadcast.
        let mut msg = client_msg(known_mac(), MessageType::Request);
        msg.set_ciaddr(neighbour);
        let (nak, to) = exchange(&server(), &msg).unwrap();
        assert_eq!(nak.opts().msg_type(), Some(MessageType::Nak));
        assert_eq!(to, SocketAddrV4::new(Ipv4Addr::BROADCAST, CLIENT_PORT));
        // Its own address is answered there.
        let mut msg = client_msg(known_mac(), MessageType::Request);
        msg.set_ciaddr(host().ip);
        msg.opts_mut()
            .insert(DhcpOption::RequestedIpAddress(host().ip));
        let (_, to) = exchange(&server(), &msg).unwrap();
        assert_eq!(to, SocketAddrV4::new(host().ip, CLIENT_PORT));
    }

    #[test]
    fn inform_gets_config_without_lease() {
        let mut msg = client_msg(known_mac(), MessageType::Inform);
        msg.set_ciaddr(host().ip);
        let (ack, to) = exchange(&server(), &msg).unwrap();
        assert_eq!(ack.opts().msg_type(), Some(MessageType::Ack));
        assert_eq!(ack.yiaddr(), Ipv4Addr::UNSPECIFIED);
        assert!(ack.opts().get(OptionCode::AddressLeaseTime).is_none());
        assert!(ack.opts().get(OptionCode::Router).is_some());
        assert_eq!(to, SocketAddrV4::new(host().ip, CLIENT_PORT));
    }

    #[test]
    fn hostile_hardware_length_is_dropped_without_panic() {
        let mut buf = Vec::new();
        client_msg(known_mac(), MessageType::Discover)
            .encode(&mut Encoder::new(&mut buf))
            .unwrap();
        let s = server();
        assert!(s.handle_datagram(&buf).unwrap().is_some());
        // Byte 2 is hlen; anything past chaddr's 16 bytes would make dhcproto slice out of range.
        for hlen in [0u8, 5, 7, 16, 17, 255] {
            buf[2] = hlen;
            assert!(s.handle_datagram(&buf).unwrap().is_none(), "hlen {hlen}");
        }
        buf[2] = 6;
        buf[1] = 6; // htype 6 is IEEE 802, not Ethernet
        assert!(s.handle_datagram(&buf).unwrap().is_none());
    }

    #[test]
    fn malformed_datagrams_are_dropped() {
        let s = server();
        assert!(s.handle_datagram(&[]).unwrap().is_none());
        assert!(s
            .handle_datagram(&[1, 1, 6, 0, 0xde, 0xad])
            .unwrap()
            .is_none());
        assert!(s.handle_datagram(&[0xff; 400]).unwrap().is_none());
    }
}
