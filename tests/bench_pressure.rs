//! `zapvm bench pressure` end to end with a tiny configuration (a few seconds): the command
//! writes its JSON (and its flat export), markdown table and SVG plot (and its CSV), and they say what the run did. Nothing here
//! judges speed (the machine is shared); the checks are about what happened: ranges were
//! discarded in the delivery asked for, the guest kept touching pages, and KVM saw the
//! refaults.

#[path = "support/bench_files.rs"]
mod bench_files;
#[path = "support/scratch.rs"]
mod scratch;

use std::path::PathBuf;
use std::process::Output;

use scratch::{scratch_dir, zapvm_in};

/// `zapvm args` with `dir` as its temporary directory.
fn zapvm(dir: &tempfile::TempDir, args: &[&str]) -> Output {
    zapvm_in(dir.path()).args(args).output().expect("zapvm runs")
}

/// A scratch directory for one run (removed when the test ends) and the run's output directory
/// in it.
fn out_dir(name: &str) -> (tempfile::TempDir, PathBuf) {
    let scratch = scratch_dir(&format!("bench-pressure-{name}"));
    let dir = scratch.path().join("out");
    (scratch, dir)
}

#[test]
fn tiny_run_writes_json_table_and_plot() {
    let (scratch, dir) = out_dir("tiny");
    let out = zapvm(
        &scratch,
        &[
            "bench",
            "pressure",
            "--mem",
            "32M",
            "--ranges",
            "64K,2M",
            "--rates",
            "1024",
            "--backings",
            "4k",
            "--slice",
            "200ms",
            "--reps",
            "1",
            "--out",
            dir.to_str().unwrap(),
        ],
    );
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(out.status.success(), "stdout: {stdout}\nstderr: {stderr}");
    assert!(stderr.contains("bench pressure: 4k 2M range @ 1024 MiB/s"), "progress lines: {stderr}");

    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("pressure.json")).unwrap()).unwrap();
    let points = json["points"].as_array().unwrap();
    // 64K and 2M sweeps at 1024 MiB/s, then the per-page comparison at 2M: per page, and per
    // range at the rate the per-page delivery achieved.
    assert_eq!(points.len(), 4, "{json:#}");
    for p in points {
        let num = |k: &str| p[k].as_f64().unwrap_or_else(|| panic!("{k} is not a number in {p}"));
        assert!(num("unpressured_pages_per_s") > 0.0, "{p}");
        assert!(num("pressured_pages_per_s") > 0.0, "the guest kept touching pages under pressure: {p}");
        assert!(num("pressured_vs_unpressured").is_finite(), "{p}");
        assert!(num("achieved_mib_s") > 0.0, "{p}");
        assert_eq!(p["failed_discards"], 0, "{p}");
        let bytes = p["discarded_bytes"].as_u64().unwrap();
        let discards = p["discards"].as_u64().unwrap();
        let range = p["range_bytes"].as_u64().unwrap();
        assert!(bytes > 0 && bytes % range == 0, "whole ranges were discarded: {p}");
        // The delivery: one discard per range, or one per 4 KiB page of each range.
        let per_call = if p["delivery"] == "per_page" { 4096 } else { range };
        assert_eq!(discards * per_call, bytes, "{p}");
        assert!(p["rep_ratios"].as_array().unwrap().len() == 1, "{p}");
    }
    // KVM saw the discards (flush requests) and the guest fault pages back in. Summed over the
    // points: one short slice on a loaded machine may see the guest touch few discarded pages.
    let kvm = |name: &str| points.iter().map(|p| p["kvm_pressured"][name].as_i64().unwrap_or(0)).sum::<i64>();
    assert!(kvm("vm.remote_tlb_flush_requests") > 0, "{json:#}");
    assert!(kvm("vcpu.pf_fixed") > 0, "{json:#}");
    assert!(json["pressured_vs_unpressured"]["4k"].is_f64(), "{json:#}");
    assert!(json["target_met"]["4k"].is_boolean(), "{json:#}");
    assert_eq!(json["target"], 0.5);
    let cmp = &json["per_page_vs_range"][0];
    assert_eq!(cmp["range_bytes"], 2 << 20, "{json:#}");
    assert!(cmp["per_page"]["achieved_mib_s"].as_f64().unwrap() > 0.0, "{cmp}");
    assert!(cmp["range_equal_pressure"]["achieved_mib_s"].as_f64().unwrap() > 0.0, "{cmp}");
    assert!(cmp["range_at_target"]["pressured_vs_unpressured"].is_f64(), "{cmp}");
    assert!(json["date"].as_str().unwrap().ends_with('Z'));
    assert_eq!(json["vms"].as_array().unwrap().len(), 3, "two sweeps and the comparison VM");

    let md = std::fs::read_to_string(dir.join("pressure.md")).unwrap();
    assert!(md.contains("| backing | range | delivery | target MiB/s |"), "{md}");
    assert_eq!(md.lines().filter(|l| l.starts_with("| 4k |")).count(), 4, "one row per point: {md}");
    assert!(md.contains("`pressured_vs_unpressured` (4k, 2M ranges at 1024 MiB/s)"), "{md}");
    assert!(md.contains("one discard per 4K page"), "{md}");
    assert!(stdout.contains("| backing | range |"), "the table also goes to stdout");

    let svg = std::fs::read_to_string(dir.join("pressure.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"), "{svg}");
    assert!(svg.contains("4k backing") && svg.contains("2M ranges"), "titles and legend");
    // A marker per sweep point (colours of the first two range sizes) and the per-page cross.
    assert!(svg.contains("<circle") && svg.contains("#1F77B4") && svg.contains("#D62728"), "points drawn");
    assert!(svg.contains("one discard per 4K page"), "the per-page legend");

    // The files for other tools: the flat export of the report, the CSV of the plotted points.
    let flat = bench_files::read_flat(&dir.join("pressure.flat.json"), "pressure");
    let ratio = json["pressured_vs_unpressured"]["4k"].as_f64().unwrap();
    assert!(
        flat.contains(&("pressure: pressured_vs_unpressured/4k".into(), "ratio".into(), ratio)),
        "{flat:?}"
    );
    let csv = bench_files::read_csv(&dir.join("pressure.csv"), points.len());
    let csv_ratios: Vec<f64> =
        bench_files::column(&csv, "pressured_vs_unpressured").iter().map(|c| c.parse().unwrap()).collect();
    let json_ratios: Vec<f64> =
        points.iter().map(|p| p["pressured_vs_unpressured"].as_f64().unwrap()).collect();
    assert_eq!(csv_ratios, json_ratios);
}

#[test]
fn bad_options_are_refused_with_a_message() {
    for (args, needle) in [
        (&["--ranges", "5000"][..], "multiple of 4 KiB"),
        (&["--rates", "0"][..], "not a positive number"),
        (&["--mem", "8M"][..], "--mem"),
    ] {
        let mut all = vec!["bench", "pressure", "--out", "/nonexistent-never-written"];
        all.extend_from_slice(args);
        let out = zapvm(&scratch_dir("bench-pressure-refused"), &all);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(stderr.contains("zapvm: error:") && stderr.contains(needle), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}
