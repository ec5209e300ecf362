//! Transparent huge pages: what the kernel made of the state machine tables that
//! `percore_engine::pool::table` advised (see its documentation for why they are advised).
//!
//! Nothing here changes the kernel's setting; a node logs it at start-up, beside how much
//! of the process is backed by huge pages, so an operator can see whether the tables got
//! them (`/sys/kernel/mm/transparent_hugepage/enabled` must be `madvise` or `always`).

use std::fmt;
use std::path::Path;

use percore_engine::pool::table::huge_page_advice;

/// Where the kernel says how it uses transparent huge pages.
pub const THP_ENABLED_PATH: &str = "/sys/kernel/mm/transparent_hugepage/enabled";

/// The kernel's transparent huge page mode (`THP_ENABLED_PATH`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThpMode {
    /// Every large anonymous mapping, advised or not.
    Always,
    /// Advised ranges only: the tables get huge pages, the rest of the process does not.
    Madvise,
    /// None: the tables stay on 4 KiB pages.
    Never,
}

impl fmt::Display for ThpMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ThpMode::Always => "always",
            ThpMode::Madvise => "madvise",
            ThpMode::Never => "never",
        })
    }
}

impl ThpMode {
    /// Whether advised memory can get huge pages in this mode.
    pub fn backs_advised_memory(self) -> bool {
        matches!(self, ThpMode::Always | ThpMode::Madvise)
    }

    /// Parses the file's one line, the mode in force bracketed (`always [madvise] never`).
    pub fn parse(line: &str) -> Option<Self> {
        let start = line.find('[')?;
        let end = start + line[start..].find(']')?;
        match &line[start + 1..end] {
            "always" => Some(ThpMode::Always),
            "madvise" => Some(ThpMode::Madvise),
            "never" => Some(ThpMode::Never),
            _ => None,
        }
    }
}

/// The kernel's mode, if it has transparent huge pages and says which.
pub fn thp_mode() -> Option<ThpMode> {
    ThpMode::parse(&std::fs::read_to_string(THP_ENABLED_PATH).ok()?)
}

/// The value of a `/proc` field line such as `VmRSS:  1024 kB` or `AnonHugePages:  2048 kB`
/// (`field` with its colon), in KiB: the first such line of `text`.
pub fn kib_field(text: &str, field: &str) -> Option<u64> {
    text.lines()
        .find_map(|line| line.strip_prefix(field))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The `AnonHugePages` of a `smaps` or `smaps_rollup` text (one mapping, or the rollup), in
/// bytes.
pub fn anon_huge_bytes_in(text: &str) -> Option<u64> {
    kib_field(text, "AnonHugePages:").map(|kib| kib * 1024)
}

/// Bytes of this process backed by anonymous huge pages now.
pub fn anon_huge_bytes() -> Option<u64> {
    anon_huge_bytes_in(&std::fs::read_to_string(Path::new("/proc/self/smaps_rollup")).ok()?)
}

/// Bytes of process `pid` backed by anonymous huge pages now (the benchmark's replicas).
pub fn anon_huge_bytes_of(pid: u32) -> Option<u64> {
    anon_huge_bytes_in(&std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?)
}

/// Logs the kernel's mode, the bytes advised so far and the bytes backed by huge pages.
/// Call once the shards have built their state machines.
pub fn log_state() {
    let advice = huge_page_advice();
    let mode = thp_mode();
    let huge_bytes = anon_huge_bytes();
    let mib = |bytes: u64| bytes >> 20;
    match mode {
        Some(mode) if mode.backs_advised_memory() => tracing::info!(
            %mode,
            advised_mib = mib(advice.advised_bytes),
            backed_mib = huge_bytes.map(mib),
            refused = advice.refused,
            "transparent huge pages for the state machine tables"
        ),
        _ => tracing::info!(
            mode = mode.map(|mode| mode.to_string()),
            advised_mib = mib(advice.advised_bytes),
            "no transparent huge pages: the state machine tables use 4 KiB pages (set {THP_ENABLED_PATH} to madvise to back them with 2 MiB pages)"
        ),
    }
}

#[cfg(test)]
mod tests {
    use percore_engine::pool::table::{HUGE_PAGE_BYTES, zeroed_table};

    use super::*;

    #[test]
    fn modes_and_sizes_parse() {
        assert_eq!(
            ThpMode::parse("always [madvise] never\n"),
            Some(ThpMode::Madvise)
        );
        assert_eq!(
            ThpMode::parse("[always] madvise never"),
            Some(ThpMode::Always)
        );
        assert_eq!(
            ThpMode::parse("always madvise [never]"),
            Some(ThpMode::Never)
        );
        assert_eq!(ThpMode::parse("always madvise never"), None);
        let text = "Rss:  1024 kB\nAnonHugePages:     4096 kB\nShmemHugePages: 0 kB\n";
        assert_eq!(anon_huge_bytes_in(text), Some(4 << 20));
        assert_eq!(anon_huge_bytes_in("Rss: 1 kB\n"), None);
    }

    /// The mapping of `/proc/self/smaps` that holds `address`, as its text.
    fn mapping_of(address: usize) -> String {
        let smaps = std::fs::read_to_string("/proc/self/smaps").expect("read /proc/self/smaps");
        let mut current: Option<String> = None;
        for line in smaps.lines() {
            let range = line
                .split_whitespace()
                .next()
                .and_then(|first| first.split_once('-'))
                .and_then(|(start, end)| {
                    Some((
                        usize::from_str_radix(start, 16).ok()?,
                        usize::from_str_radix(end, 16).ok()?,
                    ))
                });
            if let Some((start, end)) = range {
                if current.is_some() {
                    break;
                }
                if (start..end).contains(&address) {
                    current = Some(String::new());
                }
                continue;
            }
            if let Some(text) = current.as_mut() {
                text.push_str(line);
                text.push('\n');
            }
        }
        current.expect("the table's mapping is in /proc/self/smaps")
    }

    /// What the kernel made of one advised table: with huge pages enabled for advised
    /// memory, some of it is backed by them (the kernel may still fall back to 4 KiB pages
    /// when no 2 MiB page is free, but not for all of a fresh 32 MiB table on a machine
    /// with free memory).
    #[test]
    fn an_advised_table_gets_huge_pages_where_the_kernel_allows() {
        let table: Box<[u64]> = zeroed_table(16 * HUGE_PAGE_BYTES / 8);
        let mapping = mapping_of(table.as_ptr() as usize + table.len() * 4);
        let backed = anon_huge_bytes_in(&mapping).expect("AnonHugePages in the mapping");
        match thp_mode() {
            Some(mode) if mode.backs_advised_memory() => assert!(
                backed >= HUGE_PAGE_BYTES as u64,
                "THP {mode}: {backed} bytes of a 32 MiB table on huge pages"
            ),
            mode => eprintln!("THP mode {mode:?}: nothing to check ({backed} bytes)"),
        }
        assert!(table.iter().all(|&word| word == 0));
    }
}
