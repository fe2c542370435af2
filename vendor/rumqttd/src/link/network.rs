use bytes::BytesMut;
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    time::timeout,
};

use std::{
    collections::VecDeque,
    io::{self, ErrorKind},
};
use tokio::time::{error::Elapsed, Duration};

use std::pin::Pin;
use std::task::Poll;
use tokio::io::ReadBuf;

use crate::protocol::{self, Packet, Protocol};

/// The stack scratch of a read into an empty buffer (cabinet-hub patch, PATCHES.md).
const READ_SCRATCH: usize = 4096;
/// Room made before writing packets, so that a command is written without regrowing.
const WRITE_RESERVE: usize = 512;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("I/O = {0}")]
    Io(#[from] io::Error),
    #[error("Invalid data = {0}")]
    Protocol(#[from] protocol::Error),
    #[error["Keep alive timeout"]]
    KeepAlive(#[from] Elapsed),
}

/// Network transforms packets <-> frames efficiently. It takes
/// advantage of pre-allocation, buffering and vectorization when
/// appropriate to achieve performance
pub struct Network<P> {
    /// Socket for IO
    socket: Box<dyn N>,
    /// Buffered reads
    read: BytesMut,
    /// Buffered writes
    write: BytesMut,
    /// Maximum packet size
    max_incoming_size: usize,
    /// Maximum connection buffer count. TODO: Change this to use bytes for deterministicness
    max_connection_buffer_len: usize,
    /// Keep alive timeout
    keepalive: Duration,
    /// Protocol
    protocol: P,
}

impl<P: Protocol> Network<P> {
    pub fn new(
        socket: Box<dyn N>,
        max_incoming_size: usize,
        max_connection_buffer_len: usize,
        protocol: P,
    ) -> Network<P> {
        Network {
            socket,
            // cabinet-hub patch (PATCHES.md): no buffer while idle (10 KiB each before). A read
            // with nothing buffered goes through a scratch on the stack and keeps only the bytes
            // it got; the write buffer is let go once written.
            read: BytesMut::new(),
            write: BytesMut::new(),
            max_incoming_size,
            max_connection_buffer_len,
            // Overwritten by keepalive value in connect packet, otherwise we
            // would wait indefinitely until we get a packet / network error
            // when we call read.
            keepalive: Duration::MAX,
            protocol,
        }
    }

    /// How many packets a link buffers for the router before it stops reading.
    pub fn max_connection_buffer_len(&self) -> usize {
        self.max_connection_buffer_len
    }

    pub fn set_keepalive(&mut self, keepalive: u16) {
        let keepalive = Duration::from_secs(keepalive as u64);
        self.keepalive = keepalive + keepalive.mul_f32(0.5);
    }

    /// Reads more than 'required' bytes to frame a packet into self.read buffer
    async fn read_bytes(&mut self, required: usize) -> io::Result<usize> {
        // TODO: Fix this cancellation bug and write unit test
        let mut total_read = 0;
        loop {
            let read = if self.read.is_empty() {
                self.read_into_empty().await?
            } else {
                // cabinet-hub patch (PATCHES.md): with a full buffer `read_buf` would make room
                // for 64 bytes at a time; make room for the rest of the frame at once.
                self.read.reserve(required);
                self.socket.read_buf(&mut self.read).await?
            };
            if 0 == read {
                let error = if self.read.is_empty() {
                    io::Error::new(ErrorKind::ConnectionAborted, "connection closed by peer")
                } else {
                    io::Error::new(ErrorKind::ConnectionReset, "connection reset by peer")
                };

                return Err(error);
            }

            total_read += read;
            if total_read >= required {
                return Ok(total_read);
            }
        }
    }

    /// Reads into an empty buffer through a scratch on the stack of each poll, so that a
    /// connection waiting for its next packet holds no read buffer: the buffer is allocated for
    /// the bytes that arrived. cabinet-hub patch (PATCHES.md): an idle cabinet sends a heartbeat
    /// every 30 s, and a buffer kept between packets was ~1 KiB for each of tens of thousands.
    async fn read_into_empty(&mut self) -> io::Result<usize> {
        // An empty buffer may still share the allocation of packets already handed out; a
        // fresh one lets that go as soon as they are dropped.
        self.read = BytesMut::new();
        let socket = &mut self.socket;
        let read = &mut self.read;
        std::future::poll_fn(|cx| {
            let mut scratch = [std::mem::MaybeUninit::<u8>::uninit(); READ_SCRATCH];
            let mut buf = ReadBuf::uninit(&mut scratch);
            match Pin::new(&mut **socket).poll_read(cx, &mut buf) {
                Poll::Ready(Ok(())) => {
                    read.extend_from_slice(buf.filled());
                    Poll::Ready(Ok(buf.filled().len()))
                }
                Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                Poll::Pending => Poll::Pending,
            }
        })
        .await
    }

    /// Waits on network for 1 packet
    pub async fn read(&mut self) -> Result<Packet, Error> {
        loop {
            let required = match Protocol::read_mut(
                &mut self.protocol,
                &mut self.read,
                self.max_incoming_size,
            ) {
                Ok(packet) => return Ok(packet),
                Err(protocol::Error::InsufficientBytes(required)) => required,
                Err(e) => return Err(e.into()),
            };

            // read more packets until a frame can be created. This function
            // blocks until a frame can be created. Use this in a select! branch
            timeout(self.keepalive, self.read_bytes(required)).await??;
        }
    }

    /// Read packets in bulk. This allow replies to be in bulk. This method is used
    /// after the connection is established to read a bunch of incoming packets
    pub fn readv(&mut self, packets: &mut VecDeque<Packet>) -> Result<usize, Error> {
        loop {
            match self
                .protocol
                .read_mut(&mut self.read, self.max_incoming_size)
            {
                Ok(packet) => {
                    packets.push_back(packet);
                    let connection_buffer_length = packets.len();
                    if connection_buffer_length >= self.max_connection_buffer_len {
                        return Ok(connection_buffer_length);
                    }
                }
                Err(protocol::Error::InsufficientBytes(_)) => return Ok(packets.len()),
                Err(e) => return Err(io::Error::new(ErrorKind::InvalidData, e.to_string()).into()),
            }
        }
    }

    pub async fn write(&mut self, packet: Packet) -> Result<(), Error> {
        self.write.reserve(WRITE_RESERVE);
        Protocol::write(&self.protocol, packet, &mut self.write)?;
        self.socket.write_all(&self.write).await?;
        // cabinet-hub patch (PATCHES.md): let the buffer go, as in `read_into_empty`.
        self.write = BytesMut::new();
        Ok(())
    }

    pub async fn writev(&mut self, packets: VecDeque<Packet>) -> Result<(), Error> {
        self.write.reserve(WRITE_RESERVE);
        for packet in packets {
            Protocol::write(&self.protocol, packet, &mut self.write)?;
        }
        self.socket.write_all(&self.write).await?;
        self.write = BytesMut::new();
        Ok(())
    }
}

pub trait N: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T> N for T where T: AsyncRead + AsyncWrite + Unpin + Send {}
