//! `make bench` is not run in CI (it takes half an hour), but its harness must keep reading its
//! tools' output right: it parses sample wrk and smaps_rollup output and renders a report.

use std::process::Command;

#[test]
fn the_benchmark_harness_parses_its_own_output() {
    let root = env!("CARGO_MANIFEST_DIR");
    let out = Command::new("python3")
        .arg(format!("{root}/bench/bench.py"))
        .arg("--selftest")
        .output()
        .expect("python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("5 passed, 0 failed"), "{stdout}");
}
