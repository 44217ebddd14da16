//! Migration links of gmem's own VM: `tcp:HOST:PORT` and `unix:PATH`
//! addresses, connected or listened on, each link split into the two
//! halves [`gmem_kvm::migrate`] reads and writes ([`Vm::migrate_to`],
//! [`Vm::receive_migration`]).

#[cfg(doc)]
use crate::Vm;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// How long a link may stay silent (a read) or full (a write) before it
/// counts as broken: a peer that stopped without closing.
pub const LINK_TIMEOUT: Duration = Duration::from_secs(30);

/// Where a migration goes, or comes in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MigrationAddress {
    /// `tcp:HOST:PORT`.
    Tcp(String),
    /// `unix:PATH`.
    Unix(PathBuf),
}

impl std::str::FromStr for MigrationAddress {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        if let Some(rest) = text.strip_prefix("tcp:") {
            let port = rest.rsplit_once(':').map(|(host, port)| (host, port.parse::<u16>()));
            return match port {
                Some((host, Ok(_))) if !host.is_empty() => Ok(Self::Tcp(rest.to_string())),
                _ => Err(format!("'{text}': a TCP address is tcp:HOST:PORT (a port 0-65535)")),
            };
        }
        match text.strip_prefix("unix:") {
            Some(path) if !path.is_empty() => Ok(Self::Unix(PathBuf::from(path))),
            _ => Err(format!("'{text}': an address is tcp:HOST:PORT or unix:PATH")),
        }
    }
}

impl std::fmt::Display for MigrationAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Tcp(at) => write!(f, "tcp:{at}"),
            Self::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

/// A connected link, in two halves (one socket, three descriptors: one
/// to [`close`](Self::close) it with, whoever holds the others).
pub struct Link {
    /// What the peer sends.
    pub input: Box<dyn Read + Send>,
    /// What goes to the peer.
    pub output: Box<dyn Write + Send>,
    socket: Socket,
}

enum Socket {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Link(..)")
    }
}

macro_rules! link_from {
    ($name:ident, $stream:ty, $variant:ident) => {
        /// The link of a connected socket, with [`LINK_TIMEOUT`] on its
        /// reads and writes.
        pub fn $name(stream: $stream) -> std::io::Result<Self> {
            stream.set_read_timeout(Some(LINK_TIMEOUT))?;
            stream.set_write_timeout(Some(LINK_TIMEOUT))?;
            Ok(Self {
                input: Box::new(stream.try_clone()?),
                output: Box::new(stream.try_clone()?),
                socket: Socket::$variant(stream),
            })
        }
    };
}

impl Link {
    link_from!(tcp, TcpStream, Tcp);
    link_from!(unix, UnixStream, Unix);

    /// Its two halves, for a reader and writer that own them (the link
    /// closes once both are dropped).
    pub fn split(self) -> (Box<dyn Read + Send>, Box<dyn Write + Send>) {
        (self.input, self.output)
    }

    /// Shuts the connection down both ways: the peer sees its end, and
    /// whoever reads or writes either half here fails.
    pub fn close(&self) {
        let _ = match &self.socket {
            Socket::Tcp(s) => s.shutdown(std::net::Shutdown::Both),
            Socket::Unix(s) => s.shutdown(std::net::Shutdown::Both),
        };
    }
}

impl MigrationAddress {
    /// Connects to a destination listening there (`ECONNREFUSED` where
    /// none is).
    pub fn connect(&self) -> std::io::Result<Link> {
        match self {
            Self::Tcp(at) => {
                let stream = TcpStream::connect(at)?;
                stream.set_nodelay(true)?;
                Link::tcp(stream)
            }
            Self::Unix(path) => Link::unix(UnixStream::connect(path)?),
        }
    }

    /// Listens there (`EADDRINUSE` where another does; a Unix path that
    /// exists is never replaced).
    pub fn listen(&self) -> std::io::Result<Listener> {
        match self {
            Self::Tcp(at) => Ok(Listener::Tcp(TcpListener::bind(at)?)),
            Self::Unix(path) => Ok(Listener::Unix(UnixListener::bind(path)?, path.clone())),
        }
    }
}

/// A listening socket; a Unix one's path is removed on drop.
#[derive(Debug)]
pub enum Listener {
    /// On a TCP port.
    Tcp(TcpListener),
    /// On a Unix socket path.
    Unix(UnixListener, PathBuf),
}

impl Listener {
    /// The address it listens on (the port the system chose for port 0).
    pub fn address(&self) -> MigrationAddress {
        match self {
            Self::Tcp(l) => {
                MigrationAddress::Tcp(l.local_addr().map(|a| a.to_string()).unwrap_or_default())
            }
            Self::Unix(_, path) => MigrationAddress::Unix(path.clone()),
        }
    }

    /// Accepts one source, waiting at most `wait` (`ETIMEDOUT`; for ever
    /// where `wait` does not fit in a deadline, `Duration::MAX` say).
    pub fn accept(&self, wait: Duration) -> std::io::Result<Link> {
        let deadline = Instant::now().checked_add(wait);
        let set = |nonblocking| match self {
            Self::Tcp(l) => l.set_nonblocking(nonblocking),
            Self::Unix(l, _) => l.set_nonblocking(nonblocking),
        };
        set(true)?;
        loop {
            let accepted = match self {
                Self::Tcp(l) => l.accept().and_then(|(s, _)| {
                    s.set_nonblocking(false)?;
                    s.set_nodelay(true)?;
                    Link::tcp(s)
                }),
                Self::Unix(l, _) => l.accept().and_then(|(s, _)| {
                    s.set_nonblocking(false)?;
                    Link::unix(s)
                }),
            };
            match accepted {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if deadline.is_some_and(|d| Instant::now() >= d) {
                        return Err(std::io::Error::from(std::io::ErrorKind::TimedOut));
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                done => return done,
            }
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Self::Unix(_, path) = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse_or_say_why() {
        let tcp: MigrationAddress = "tcp:127.0.0.1:4444".parse().unwrap();
        assert_eq!(tcp, MigrationAddress::Tcp("127.0.0.1:4444".into()));
        assert_eq!(tcp.to_string(), "tcp:127.0.0.1:4444");
        let unix: MigrationAddress = "unix:/tmp/x.sock".parse().unwrap();
        assert_eq!(unix, MigrationAddress::Unix("/tmp/x.sock".into()));
        for bad in ["", "tcp:", "tcp:host", "tcp::80", "tcp:h:99999", "unix:", "udp:x:1", "x"] {
            assert!(bad.parse::<MigrationAddress>().is_err(), "{bad}");
        }
    }

    #[test]
    fn a_port_in_use_is_eaddrinuse_and_a_closed_one_refuses() {
        let first = MigrationAddress::Tcp("127.0.0.1:0".into()).listen().unwrap();
        let taken = first.address();
        let err = taken.listen().unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse);
        drop(first);
        let err = taken.connect().unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);
        let err = MigrationAddress::Tcp("127.0.0.1:0".into())
            .listen()
            .unwrap()
            .accept(Duration::from_millis(20))
            .unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut);
    }
}
