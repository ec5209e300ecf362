//! What the fake servers of the client tests share: a thread stopped on drop, and a read
//! that gives up when told to stop.

use std::io::Read;
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;

/// A fake's thread, stopped (its flag set, then joined) on drop.
pub struct FakeServer {
    pub stop: Arc<AtomicBool>,
    pub thread: Option<JoinHandle<()>>,
}

impl Drop for FakeServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            thread.join().expect("fake server thread");
        }
    }
}

/// Reads exactly `buffer.len()` bytes; `false` at end of stream, on error or when stopped
/// (the stream's read timeout sets how often `stop` is looked at).
pub fn read_full(stream: &mut TcpStream, buffer: &mut [u8], stop: &AtomicBool) -> bool {
    let mut filled = 0;
    while filled < buffer.len() {
        if stop.load(Ordering::Relaxed) {
            return false;
        }
        match stream.read(&mut buffer[filled..]) {
            Ok(0) => return false,
            Ok(read) => filled += read,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return false,
        }
    }
    true
}
