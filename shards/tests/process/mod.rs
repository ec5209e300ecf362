//! A `percore` process a test runs: its stderr lines as they come (terminal colour codes
//! removed), a clean stop, and SIGKILL on drop. Each test file that runs nodes includes
//! this module.

// Each test file is its own crate and uses a subset.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// A running process, what it printed so far, and SIGKILL on drop.
pub struct Node {
    pub child: Child,
    lines: mpsc::Receiver<String>,
    /// Every stderr line read so far.
    pub seen: Vec<String>,
    /// Longest [`Node::wait_for`] and [`Node::stop`] wait.
    timeout: Duration,
}

impl Node {
    /// Spawns `command` (its stdout discarded, its stderr read line by line).
    pub fn spawn(mut command: Command, timeout: Duration) -> Self {
        let mut child = command
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the process starts");
        let stderr = child.stderr.take().unwrap();
        let (sender, lines) = mpsc::channel();
        std::thread::spawn(move || {
            // Drains to the end, so that the process never writes into a closed pipe.
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = sender.send(plain(&line));
            }
        });
        Self {
            child,
            lines,
            seen: Vec::new(),
            timeout,
        }
    }

    /// Waits for a stderr line containing `text`; panics with every line seen if the
    /// process exits or the timeout passes first.
    pub fn wait_for(&mut self, text: &str) {
        let deadline = Instant::now() + self.timeout;
        while !self.seen.iter().any(|line| line.contains(text)) {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => self.seen.push(line),
                Err(_) => panic!("no line with {text:?}: {:#?}", self.seen),
            }
        }
    }

    /// SIGTERM, then waits for a clean exit.
    pub fn stop(mut self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let deadline = Instant::now() + self.timeout;
        let exit = loop {
            if let Some(exit) = self.child.try_wait().unwrap() {
                break exit;
            }
            assert!(Instant::now() < deadline, "the process ignored SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        };
        self.seen.extend(self.lines.try_iter());
        assert!(exit.success(), "exit {exit:?}: {:#?}", self.seen);
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `line` without its terminal colour codes (`ESC [ ... m`).
fn plain(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            chars.by_ref().find(|&c| c == 'm');
        } else {
            out.push(c);
        }
    }
    out
}
