//! The `percore` command line.

fn main() {}
