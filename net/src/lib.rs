//! percore-net: the io_uring transport. Framing, peer and client connections,
//! authentication. Owns sockets; owns no protocol decisions (those live in the engine).

#![deny(unsafe_op_in_unsafe_fn, clippy::undocumented_unsafe_blocks)]

pub mod client;
pub mod peer;
