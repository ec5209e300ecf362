//! A loopback TCP address that refuses connections and stays reserved while held, for tests
//! of a replica or node that is down. One copy of the code: each test that needs one includes
//! this file by path.
//!
//! Binding a listener and dropping it is not enough: the port is free again at once, and a
//! test running beside this one may bind it (an ephemeral bind can return it) and answer
//! for the "down" replica. A socket bound to the port that never listens holds the port
//! (no `SO_REUSEADDR`, so no other socket can bind it) and the kernel answers a connection
//! attempt with a reset: `ECONNREFUSED`, exactly as for a closed port.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::{FromRawFd, OwnedFd};

/// A port that refuses connections until dropped.
pub struct RefusingPort {
    address: SocketAddr,
    _socket: OwnedFd,
}

impl RefusingPort {
    /// Binds a TCP socket to an ephemeral port on 127.0.0.1 without listening.
    pub fn bind() -> std::io::Result<Self> {
        // SAFETY: `socket` takes no pointers; the result is checked before use.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` is a socket this function just opened and owns nowhere else.
        let socket = unsafe { OwnedFd::from_raw_fd(fd) };
        let mut address = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: 0,
            sin_addr: libc::in_addr {
                s_addr: u32::from(Ipv4Addr::LOCALHOST).to_be(),
            },
            sin_zero: [0; 8],
        };
        let mut length = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        // SAFETY: `address` is a valid `sockaddr_in` of `length` bytes, alive for the call.
        let bound =
            unsafe { libc::bind(fd, (&raw const address).cast::<libc::sockaddr>(), length) };
        if bound != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `address` and `length` are valid for writes of a `sockaddr_in` and its
        // length, alive for the call; the kernel writes no more than `length` bytes.
        let named = unsafe {
            libc::getsockname(
                fd,
                (&raw mut address).cast::<libc::sockaddr>(),
                &raw mut length,
            )
        };
        if named != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let port = u16::from_be(address.sin_port);
        Ok(Self {
            address: SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port)),
            _socket: socket,
        })
    }

    /// The address: connecting to it is refused while `self` lives.
    pub fn address(&self) -> SocketAddr {
        self.address
    }
}
