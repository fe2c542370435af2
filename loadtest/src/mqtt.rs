//! A small MQTT 3.1.1 client: one TCP connection, packets framed with rumqttc's codec. The fleet
//! needs tens of thousands of connections from chosen loopback source addresses, which a full
//! client with its own event loop per connection makes neither cheap nor possible.

use std::io;
use std::net::{IpAddr, SocketAddr};

use bytes::BytesMut;
use rumqttc::mqttbytes::v4::{Connect, LastWill, Packet, PubAck, Publish, Subscribe};
use rumqttc::mqttbytes::{Error as CodecError, QoS};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

const MAX_PACKET: usize = 64 * 1024;

/// One connection.
pub struct Conn {
    stream: TcpStream,
    rbuf: BytesMut,
    wbuf: BytesMut,
    next_pkid: u16,
}

fn bind_address_no_port(sock: &TcpSocket) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let one: libc::c_int = 1;
    // SAFETY: the descriptor belongs to `sock`, which outlives the call; the option value is
    // the c_int the kernel reads for IP_BIND_ADDRESS_NO_PORT, passed with its size.
    let r = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn codec(e: CodecError) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("mqtt: {e:?}"))
}

/// How a client logs in.
pub struct Login<'a> {
    /// Client id (the cabinet id).
    pub client_id: &'a str,
    /// Username and password; none for an anonymous broker.
    pub credentials: Option<(&'a str, &'a str)>,
    /// Keep-alive in seconds.
    pub keep_alive: u16,
    /// Last Will: topic and payload.
    pub will: Option<(String, Vec<u8>)>,
}

impl Conn {
    /// Connects from `src` (a loopback address; port chosen by the kernel) and logs in.
    pub async fn connect(broker: SocketAddr, src: IpAddr, login: Login<'_>) -> io::Result<Self> {
        let sock = match broker {
            SocketAddr::V4(_) => TcpSocket::new_v4()?,
            SocketAddr::V6(_) => TcpSocket::new_v6()?,
        };
        if !src.is_unspecified() {
            // Choosing the port at bind time would scan the whole ephemeral range for every
            // socket (minutes of system time at 20,000 connections); defer it to connect.
            bind_address_no_port(&sock)?;
            sock.bind(SocketAddr::new(src, 0))?;
        }
        let stream = sock.connect(broker).await?;
        stream.set_nodelay(true)?;
        let mut c = Conn {
            stream,
            rbuf: BytesMut::with_capacity(1024),
            wbuf: BytesMut::with_capacity(512),
            next_pkid: 0,
        };
        let mut connect = Connect::new(login.client_id);
        connect.keep_alive = login.keep_alive;
        connect.clean_session = true;
        if let Some((u, p)) = login.credentials {
            connect.set_login(u, p);
        }
        if let Some((topic, payload)) = login.will {
            connect.last_will = Some(LastWill::new(topic, payload, QoS::AtLeastOnce, false));
        }
        c.send(&Packet::Connect(connect)).await?;
        match c.read().await? {
            Packet::ConnAck(a) if a.code == rumqttc::mqttbytes::v4::ConnectReturnCode::Success => {
                Ok(c)
            }
            Packet::ConnAck(a) => Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!("connection refused: {:?}", a.code),
            )),
            other => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("expected CONNACK, got {other:?}"),
            )),
        }
    }

    /// Writes one packet.
    pub async fn send(&mut self, p: &Packet) -> io::Result<()> {
        self.wbuf.clear();
        p.write(&mut self.wbuf, MAX_PACKET).map_err(codec)?;
        self.stream.write_all(&self.wbuf).await
    }

    fn pkid(&mut self) -> u16 {
        self.next_pkid = self.next_pkid.wrapping_add(1).max(1);
        self.next_pkid
    }

    /// Publishes at QoS 1; returns the packet id its PUBACK will carry.
    pub async fn publish(&mut self, topic: &str, payload: &[u8]) -> io::Result<u16> {
        let mut p = Publish::new(topic, QoS::AtLeastOnce, payload.to_vec());
        let pkid = self.pkid();
        p.pkid = pkid;
        self.send(&Packet::Publish(p)).await?;
        Ok(pkid)
    }

    /// Subscribes at QoS 1 (the SUBACK arrives through `read`).
    pub async fn subscribe(&mut self, filter: &str) -> io::Result<()> {
        self.subscribe_qos(filter, QoS::AtLeastOnce).await
    }

    /// Subscribes at the given QoS.
    pub async fn subscribe_qos(&mut self, filter: &str, qos: QoS) -> io::Result<()> {
        let mut s = Subscribe::new(filter, qos);
        s.pkid = self.pkid();
        self.send(&Packet::Subscribe(s)).await
    }

    /// Acknowledges a QoS 1 publish.
    pub async fn puback(&mut self, pkid: u16) -> io::Result<()> {
        self.send(&Packet::PubAck(PubAck::new(pkid))).await
    }

    /// Reads the next packet.
    pub async fn read(&mut self) -> io::Result<Packet> {
        loop {
            match Packet::read(&mut self.rbuf, MAX_PACKET) {
                Ok(p) => return Ok(p),
                Err(CodecError::InsufficientBytes(_)) => {}
                Err(e) => return Err(codec(e)),
            }
            if self.stream.read_buf(&mut self.rbuf).await? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "broker closed the connection",
                ));
            }
        }
    }
}
