//! `cargo run -p harness --release --example bench_notifier -- [--full] [out.json]`: runs
//! `harness::bench_notifier::run`, prints the table and writes the JSON (what `zapvm bench notifier` does).

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let full = args.iter().any(|a| a == "--full");
    let out = args.iter().find(|a| !a.starts_with("--")).cloned();
    let o = if full {
        harness::bench_notifier::BenchOptions::full()
    } else {
        harness::bench_notifier::BenchOptions::quick()
    };
    let rep = harness::bench_notifier::run(&o, &mut |l| eprintln!("{l}"));
    println!("{}", rep.to_markdown_table());
    let json = serde_json::to_string_pretty(&rep).unwrap();
    if let Some(p) = out {
        std::fs::write(&p, json).unwrap();
        eprintln!("wrote {p}");
    }
}
