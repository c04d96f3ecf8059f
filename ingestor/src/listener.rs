//! The gRPC listener's connections, plaintext or TLS (`--tls-cert`), as one stream for tonic.
//! Each connection carries a [`ConnectionInfo`] (peer address, the client certificate's names)
//! into every request's extensions, where the admission layer reads it.

use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};

use chute_common::tls::{ClientIdentity, ReloadingConfig, TlsIncoming};
use futures::Stream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::TcpListenerStream;

/// What a request knows about its connection.
#[derive(Debug, Clone, Default)]
pub struct ConnectionInfo {
    pub remote_addr: Option<SocketAddr>,
    /// Empty unless the client presented a certificate the client CA verified.
    pub client: ClientIdentity,
}

/// Accepted connections of the gRPC listener.
pub enum Incoming {
    Plain(TcpListenerStream),
    Tls(TlsIncoming),
}

impl Incoming {
    /// Plaintext without a TLS configuration; with one, handshakes run off the accept loop and
    /// only completed ones come out.
    pub fn new(listener: TcpListener, tls: Option<ReloadingConfig>) -> std::io::Result<Self> {
        Ok(match tls {
            None => Self::Plain(TcpListenerStream::new(listener)),
            Some(tls) => Self::Tls(TlsIncoming::new(listener, tls)?),
        })
    }
}

impl Stream for Incoming {
    type Item = std::io::Result<Connection>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        match self.get_mut() {
            Self::Plain(tcp) => Pin::new(tcp).poll_next(cx).map(|accepted| {
                accepted.map(|stream| {
                    stream.map(|tcp| {
                        let _ = tcp.set_nodelay(true);
                        Connection::Plain(tcp)
                    })
                })
            }),
            Self::Tls(tls) => Pin::new(tls)
                .poll_next(cx)
                .map(|accepted| accepted.map(|stream| stream.map(|stream| Connection::Tls(Box::new(stream))))),
        }
    }
}

/// One accepted connection.
pub enum Connection {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl tonic::transport::server::Connected for Connection {
    type ConnectInfo = ConnectionInfo;

    fn connect_info(&self) -> ConnectionInfo {
        match self {
            Self::Plain(tcp) => ConnectionInfo {
                remote_addr: tcp.peer_addr().ok(),
                client: ClientIdentity::default(),
            },
            Self::Tls(tls) => ConnectionInfo {
                remote_addr: tls.get_ref().0.peer_addr().ok(),
                client: ClientIdentity::of_stream(tls),
            },
        }
    }
}

impl AsyncRead for Connection {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Self::Plain(tcp) => Pin::new(tcp).poll_read(cx, buf),
            Self::Tls(tls) => Pin::new(tls.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Connection {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(tcp) => Pin::new(tcp).poll_write(cx, buf),
            Self::Tls(tls) => Pin::new(tls.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(tcp) => Pin::new(tcp).poll_write_vectored(cx, bufs),
            Self::Tls(tls) => Pin::new(tls.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Self::Plain(tcp) => tcp.is_write_vectored(),
            Self::Tls(tls) => tls.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Self::Plain(tcp) => Pin::new(tcp).poll_flush(cx),
            Self::Tls(tls) => Pin::new(tls.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Self::Plain(tcp) => Pin::new(tcp).poll_shutdown(cx),
            Self::Tls(tls) => Pin::new(tls.as_mut()).poll_shutdown(cx),
        }
    }
}
