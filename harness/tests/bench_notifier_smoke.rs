//! The benchmark's quick mode runs and produces every key `zapvm bench notifier` reports.

#[test]
fn quick_bench_reports_every_key() {
    let mut lines = 0;
    let rep =
        harness::bench_notifier::run(&harness::bench_notifier::BenchOptions::quick(), &mut |_| lines += 1);
    let v = serde_json::to_value(&rep).unwrap();
    for k in ["ratio_vs_raw", "per_page_vs_range", "uffd_overhead", "uffd_p99_us", "uffd_refault", "discard"]
    {
        assert!(!v[k].is_null(), "missing {k}");
    }
    for size in ["4K", "64K", "2M", "32M"] {
        for subs in ["0", "1", "8", "64"] {
            assert!(v["ratio_vs_raw"]["anon"][size][subs].as_f64().unwrap() > 0.0);
        }
    }
    assert_eq!(rep.discard.len(), 32);
    assert!(rep.per_page_vs_range.range_ns > 0.0 && rep.uffd_p99_us > 0.0);
    assert!(lines >= 32);
    assert!(rep.to_markdown_table().contains("ratio_vs_raw"));
}
