//! `percore-bench disk` measures what it says and leaves nothing behind.

use percore_bench::disk::{self, DiskConfig};
use percore_bench::machine::Machine;

/// Two writers for a second (`O_DIRECT` needs a real file system: the target directory,
/// not a tmpfs `/tmp`), with `fdatasync` and with `O_DSYNC`: every operation is counted,
/// and the files are removed.
#[test]
fn a_short_run_measures_and_cleans_up() {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("disk-probe");
    let _ = std::fs::remove_dir_all(&dir);
    for (unwritten, dsync) in [(true, false), (false, false), (false, true)] {
        let config = DiskConfig {
            writers: 2,
            write_bytes: 4096,
            rate_per_writer: 50,
            duration_s: 1,
            unwritten,
            dsync,
        };
        let report = disk::run(&config, &dir, &Machine::detect()).expect("the probe runs");
        assert!(
            report.all.count >= 2 && report.all.count <= 2 * 52,
            "{report:?}"
        );
        assert!(report.all.p50_us > 0 && report.all.max_us >= report.all.p99_us);
        assert!(report.worst_writer.count >= 1);
        assert_eq!(
            std::fs::read_dir(&dir).unwrap().count(),
            0,
            "probe files removed"
        );
    }
    let _ = std::fs::remove_dir(&dir);
}
