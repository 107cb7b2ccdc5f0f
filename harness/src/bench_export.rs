//! The benchmarks' files for other tools, one writer for every bench: beside each JSON report a
//! flat list of its figures, `[{"name", "unit", "value"}]` (the shape tracking tools such as
//! github-action-benchmark read), and beside each SVG plot a CSV of the rows it draws.
//!
//! The flat list is made from the report's JSON, so it holds every figure of the report and a
//! field added to a report appears in it without more code. Its names are stable from run to run
//! of the same configuration:
//! - a figure is named by its path in the report, `/` between levels, after the bench's name
//!   (`access: rows[bytes=256,op=read]/direct_ns`);
//! - an element of a list of objects is named by its identity, its string fields and the
//!   integer fields that size a configuration ([`IDENTITY_INTEGERS`]: `[bytes=256,op=read]`, keys in alphabetical order),
//!   with `#k` added to the k-th (from 0) of elements that would share a name, or by its index
//!   when it has no identity (`[0]`); identity fields are no figures;
//! - what is not a measured figure is left out: strings, booleans, nulls (NaN is written as null),
//!   lists of plain values and the report's `options` (the run's inputs);
//! - the unit comes from the figure's name (`_ns` ns, `_us` us, `_s` s, `_per_s` 1/s, `_mib_s`
//!   MiB/s, `_gib_s` GiB/s, `bytes` bytes, `_vs_`, `ratio`, `share`, `fraction` and `slowdown`
//!   ratio), else from the nearest enclosing name that has one; without any, it is a count (empty
//!   unit).
//!
//! The CSV has a header line (the columns in alphabetical order), then one line per row; a row's
//! nested objects become `outer.inner` columns, a list of plain values one cell with `;` between
//! them, a null an empty cell; fields are quoted where they hold a comma, a quote or a line break.
//!
//! [`write_outputs`] writes a report's whole set (JSON, flat JSON, markdown, plot, CSV) and
//! [`run_with_progress`] runs a bench under the progress display every bench command shows.

use std::path::{Path, PathBuf};

use serde::Serialize;
use serde_json::{Map, Value};

/// A bench's report, as its output files need it.
pub trait BenchReport: Serialize {
    /// The bench's name: the stem of its files and the prefix of its flat figures.
    const NAME: &'static str;
    /// The command line that made the report.
    fn command(&self) -> &str;
    /// When it was made (RFC 3339).
    fn date(&self) -> &str;
    /// Its markdown table(s).
    fn to_markdown(&self) -> String;
}

/// Writes `NAME.json` (and its flat export `NAME.flat.json`), `NAME.md`, `NAME.svg` (drawn by
/// `plot`) and `plotted`, the rows the plot draws, as `NAME.csv` into `dir` (created if
/// missing); returns the paths in that order.
pub fn write_outputs<R: BenchReport, T: Serialize>(
    report: &R,
    dir: &Path,
    plot: impl FnOnce(&R, &Path) -> Result<(), String>,
    plotted: &[T],
) -> Result<Vec<PathBuf>, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let [json, flat] = write_json_report(R::NAME, &dir.join(format!("{}.json", R::NAME)), report)?;
    let md = dir.join(format!("{}.md", R::NAME));
    std::fs::write(&md, format!("`{}` on {}\n\n{}", report.command(), report.date(), report.to_markdown()))
        .map_err(|e| format!("cannot write {}: {e}", md.display()))?;
    let svg = dir.join(format!("{}.svg", R::NAME));
    plot(report, &svg)?;
    let csv = write_plot_csv(&svg, plotted)?;
    Ok(vec![json, flat, md, svg, csv])
}

/// Runs `bench` under the progress display of the bench commands: on a terminal a bar of
/// `steps` steps (each progress line `bench` reports is one) or, without `steps`, a spinner,
/// with the lines printed above it; elsewhere the lines go to standard error.
pub fn run_with_progress<R>(
    steps: Option<u64>,
    bench: impl FnOnce(&mut dyn FnMut(&str)) -> Result<R, String>,
) -> Result<R, String> {
    use std::io::IsTerminal;
    let bar = std::io::stderr().is_terminal().then(|| {
        let bar = match steps {
            Some(n) => indicatif::ProgressBar::new(n),
            None => indicatif::ProgressBar::new_spinner(),
        };
        bar.enable_steady_tick(std::time::Duration::from_millis(200));
        bar
    });
    let result = bench(&mut |line| match &bar {
        Some(bar) => {
            bar.inc(1);
            bar.println(line)
        }
        None => eprintln!("{line}"),
    });
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }
    result
}

/// Prints `report`'s markdown on standard output and writes its files (`write`) into `dir`,
/// naming each on standard error: the end of every bench command.
pub fn print_and_write<R: BenchReport>(
    report: &R,
    dir: &Path,
    write: impl FnOnce(&R, &Path) -> Result<Vec<PathBuf>, String>,
) -> Result<(), String> {
    print!("{}", report.to_markdown());
    for path in write(report, dir)? {
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

/// One figure of a flat export.
#[derive(Clone, Debug, PartialEq, Serialize, serde::Deserialize)]
pub struct FlatFigure {
    pub name: String,
    pub unit: String,
    pub value: f64,
}

/// Where the flat export of the JSON report at `json` goes: `NAME.json` -> `NAME.flat.json`.
pub fn flat_path(json: &Path) -> PathBuf {
    let stem = json.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    json.with_file_name(format!("{stem}.flat.json"))
}

/// Where the CSV beside the plot at `svg` goes: `NAME.svg` -> `NAME.csv`.
pub fn csv_path(svg: &Path) -> PathBuf {
    svg.with_extension("csv")
}

/// Writes `report` as pretty JSON to `path` and its flat export (figures named after `bench`) to
/// [`flat_path`]; returns both paths, in that order.
pub fn write_json_report(bench: &str, path: &Path, report: &impl Serialize) -> Result<[PathBuf; 2], String> {
    let value = serde_json::to_value(report).expect("the report serialises");
    let write = |path: &Path, text: String| {
        std::fs::write(path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))
    };
    write(path, serde_json::to_string_pretty(&value).expect("JSON serialises") + "\n")?;
    let flat = flat_path(path);
    write(&flat, serde_json::to_string_pretty(&flatten(bench, &value)).expect("JSON serialises") + "\n")?;
    Ok([path.to_path_buf(), flat])
}

/// Writes the CSV of `rows` (the rows a plot at `svg` draws) to [`csv_path`] and returns it.
pub fn write_plot_csv<T: Serialize>(svg: &Path, rows: &[T]) -> Result<PathBuf, String> {
    let path = csv_path(svg);
    let rows: Vec<Vec<(String, String)>> = rows
        .iter()
        .map(|row| {
            let mut cells = Vec::new();
            csv_cells("", &serde_json::to_value(row).expect("a row serialises"), &mut cells);
            cells
        })
        .collect();
    // The columns in the order first seen, which is the keys' alphabetical order (rows of one
    // type share them; a column one row lacks is an empty cell there).
    let mut columns: Vec<String> = Vec::new();
    for (name, _) in rows.iter().flatten() {
        if !columns.contains(name) {
            columns.push(name.clone());
        }
    }
    let mut text = csv_line(columns.iter().map(String::as_str));
    for row in &rows {
        text +=
            &csv_line(columns.iter().map(|c| {
                row.iter().find(|(name, _)| name == c).map(|(_, cell)| cell.as_str()).unwrap_or("")
            }));
    }
    std::fs::write(&path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    Ok(path)
}

/// The flat export of a report: every measured figure of `report`, named after `bench`.
pub fn flatten(bench: &str, report: &Value) -> Vec<FlatFigure> {
    let mut figures = Vec::new();
    match report {
        Value::Object(fields) => {
            for (key, value) in fields.iter().filter(|(key, _)| *key != "options") {
                walk(&mut vec![key.clone()], value, &mut figures);
            }
        }
        other => walk(&mut Vec::new(), other, &mut figures),
    }
    for figure in &mut figures {
        figure.name =
            if figure.name.is_empty() { bench.to_string() } else { format!("{bench}: {}", figure.name) };
    }
    figures
}

fn walk(path: &mut Vec<String>, value: &Value, figures: &mut Vec<FlatFigure>) {
    match value {
        Value::Number(n) => {
            if let Some(value) = n.as_f64().filter(|v| v.is_finite()) {
                figures.push(FlatFigure { name: path.join("/"), unit: unit(path).to_string(), value });
            }
        }
        Value::Object(fields) => {
            for (key, value) in fields {
                path.push(key.clone());
                walk(path, value, figures);
                path.pop();
            }
        }
        Value::Array(items) if items.iter().all(Value::is_object) => {
            let identities: Vec<Option<String>> =
                items.iter().map(|item| item.as_object().and_then(identity)).collect();
            for (i, item) in items.iter().enumerate() {
                let Value::Object(fields) = item else { unreachable!("all are objects") };
                let label = match &identities[i] {
                    None => i.to_string(),
                    Some(id) if identities.iter().filter(|other| other.as_ref() == Some(id)).count() > 1 => {
                        let k = identities[..i].iter().filter(|other| other.as_ref() == Some(id)).count();
                        format!("{id}#{k}")
                    }
                    Some(id) => id.clone(),
                };
                let last = path.pop().unwrap_or_default();
                path.push(format!("{last}[{label}]"));
                for (key, value) in fields.iter().filter(|(k, v)| !is_identity(k, v)) {
                    path.push(key.clone());
                    walk(path, value, figures);
                    path.pop();
                }
                path.pop();
                path.push(last);
            }
        }
        // Strings, booleans, nulls and lists of plain values are no figures.
        _ => {}
    }
}

/// The integer fields of a list element that say which configuration it measured (a size, a
/// count of threads or subscribers), not what was measured.
pub const IDENTITY_INTEGERS: &[&str] =
    &["bytes", "range_bytes", "subscribers", "readers", "vcpus", "pages_per_round"];

/// Whether a field names its list element rather than measuring it: a string, or an integer
/// of [`IDENTITY_INTEGERS`].
fn is_identity(key: &str, value: &Value) -> bool {
    value.is_string() || (value.is_u64() && IDENTITY_INTEGERS.contains(&key))
}

/// A list element's name: its identity fields as `key=value`, comma separated.
fn identity(fields: &Map<String, Value>) -> Option<String> {
    let parts: Vec<String> = fields
        .iter()
        .filter(|(k, v)| is_identity(k, v))
        .map(|(k, v)| match v {
            Value::String(s) => format!("{k}={s}"),
            other => format!("{k}={other}"),
        })
        .collect();
    (!parts.is_empty()).then(|| parts.join(","))
}

/// The unit of the figure at `path`: from its own name, else from the nearest enclosing one.
fn unit(path: &[String]) -> &'static str {
    path.iter()
        .rev()
        .map(|segment| segment.split('[').next().unwrap_or_default())
        .find_map(unit_of_name)
        .unwrap_or("")
}

fn unit_of_name(name: &str) -> Option<&'static str> {
    let name = name.to_ascii_lowercase();
    let ratio = ["share", "slowdown", "ratio", "fraction"];
    if name.contains("_vs_") || name.starts_with("ratio") || ratio.iter().any(|r| name.ends_with(r)) {
        Some("ratio")
    } else if name.ends_with("_mib_s") {
        Some("MiB/s")
    } else if name.ends_with("_gib_s") {
        Some("GiB/s")
    } else if name.ends_with("_per_s") {
        Some("1/s")
    } else if name.ends_with("_ns") || name.starts_with("ns_") {
        Some("ns")
    } else if name.ends_with("_us") || name.starts_with("us_") {
        Some("us")
    } else if name.ends_with("_s") || name == "seconds" {
        Some("s")
    } else if name.ends_with("bytes") {
        Some("bytes")
    } else {
        None
    }
}

/// A row's cells: plain values by their key, nested objects as `outer.inner`, a list as its JSON.
fn csv_cells(prefix: &str, value: &Value, cells: &mut Vec<(String, String)>) {
    match value {
        Value::Object(fields) => {
            for (key, value) in fields {
                let name = if prefix.is_empty() { key.clone() } else { format!("{prefix}.{key}") };
                csv_cells(&name, value, cells);
            }
        }
        Value::Null => cells.push((prefix.to_string(), String::new())),
        Value::String(s) => cells.push((prefix.to_string(), s.clone())),
        Value::Array(items) if !items.iter().any(|i| i.is_object() || i.is_array()) => {
            let plain: Vec<String> = items
                .iter()
                .map(|i| match i {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                })
                .collect();
            cells.push((prefix.to_string(), plain.join(";")));
        }
        other => cells.push((prefix.to_string(), other.to_string())),
    }
}

/// One CSV line (RFC 4180 quoting), with its line break.
fn csv_line<'a>(fields: impl Iterator<Item = &'a str>) -> String {
    let quoted: Vec<String> = fields
        .map(|f| {
            if f.contains([',', '"', '\n', '\r']) {
                format!("\"{}\"", f.replace('"', "\"\""))
            } else {
                f.to_string()
            }
        })
        .collect();
    quoted.join(",") + "\n"
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn figures_are_named_by_path_and_identity_with_units() {
        let report = json!({
            "command": "zapvm bench x",
            "options": {"mem": 1024},
            "rounds": 3,
            "rows": [
                {"op": "read", "bytes": 16, "memcpy_ns": 1.5, "access_vs_memcpy": 1.2, "ok": true, "calls": 7},
                {"op": "write", "bytes": 16, "memcpy_ns": 2.5, "access_vs_memcpy": null},
            ],
            "points": [{"backing": "4k", "ratio": 0.5}, {"backing": "4k", "ratio": 0.7}],
            "phases": [{"rate_mib_s": 64.0}, {"rate_mib_s": 128.0}],
            "ns_per_page": {"cold": 800.0},
            "contention": {"invalidations_per_s": 1e5, "miss_share": 0.25, "sizes": [16, 256]},
        });
        let figures = flatten("x", &report);
        let got: Vec<(&str, &str, f64)> =
            figures.iter().map(|f| (f.name.as_str(), f.unit.as_str(), f.value)).collect();
        assert_eq!(
            got,
            [
                ("x: contention/invalidations_per_s", "1/s", 1e5),
                ("x: contention/miss_share", "ratio", 0.25),
                ("x: ns_per_page/cold", "ns", 800.0),
                ("x: phases[0]/rate_mib_s", "MiB/s", 64.0),
                ("x: phases[1]/rate_mib_s", "MiB/s", 128.0),
                ("x: points[backing=4k#0]/ratio", "ratio", 0.5),
                ("x: points[backing=4k#1]/ratio", "ratio", 0.7),
                ("x: rounds", "", 3.0),
                ("x: rows[bytes=16,op=read]/access_vs_memcpy", "ratio", 1.2),
                ("x: rows[bytes=16,op=read]/calls", "", 7.0),
                ("x: rows[bytes=16,op=read]/memcpy_ns", "ns", 1.5),
                ("x: rows[bytes=16,op=write]/memcpy_ns", "ns", 2.5),
            ]
        );
        // A report that is one list (`zapvm bench boot`'s rows).
        let rows = json!([{"backing": "4k", "start_to_first_exit_us": 900.0}]);
        assert_eq!(flatten("boot", &rows)[0].name, "boot: [backing=4k]/start_to_first_exit_us");
        assert_eq!(flatten("boot", &rows)[0].unit, "us");
    }

    #[test]
    fn files_go_beside_the_report_and_the_plot_and_read_back() {
        let dir = tempfile_dir();
        let json = dir.join("r.json");
        #[derive(Serialize)]
        struct Row {
            name: &'static str,
            inner: Inner,
            v: Option<f64>,
            reps: Vec<f64>,
        }
        #[derive(Serialize)]
        struct Inner {
            ns: f64,
        }
        let rows = [
            Row { name: "a,b \"c\"", inner: Inner { ns: 1.0 }, v: Some(2.0), reps: vec![0.5, 0.25] },
            Row { name: "d", inner: Inner { ns: 3.0 }, v: None, reps: vec![] },
        ];
        let [report, flat] = write_json_report("t", &json, &json!({"x_ns": 4.0})).unwrap();
        assert_eq!(report, json);
        assert_eq!(flat, dir.join("r.flat.json"));
        let back: Vec<FlatFigure> = serde_json::from_str(&std::fs::read_to_string(&flat).unwrap()).unwrap();
        assert_eq!(back, [FlatFigure { name: "t: x_ns".into(), unit: "ns".into(), value: 4.0 }]);
        let csv = write_plot_csv(&dir.join("r.svg"), &rows).unwrap();
        assert_eq!(csv, dir.join("r.csv"));
        assert_eq!(
            std::fs::read_to_string(&csv).unwrap(),
            "inner.ns,name,reps,v\n1.0,\"a,b \"\"c\"\"\",0.5;0.25,2.0\n3.0,d,,\n"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A fresh directory of this test's own.
    fn tempfile_dir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!("zapvm-bench-export-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}
