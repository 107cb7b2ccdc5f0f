//! Reading back the benches' files for other tools: the flat `[{name, unit, value}]` export
//! beside a JSON report and the CSV beside a plot.

#![allow(dead_code)]

use std::path::Path;

/// The flat export at `path`: a non-empty JSON list of `{name, unit, value}` objects with unique
/// names, each `bench: ...`, each value a finite number; returned as (name, unit, value).
pub fn read_flat(path: &Path, bench: &str) -> Vec<(String, String, f64)> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let list: Vec<serde_json::Value> = serde_json::from_str(&text).expect("the flat export is a JSON list");
    assert!(!list.is_empty(), "{text}");
    let figures: Vec<(String, String, f64)> = list
        .iter()
        .map(|f| {
            let object = f.as_object().expect("an object");
            assert_eq!(object.len(), 3, "name, unit and value only: {f}");
            let name = f["name"].as_str().expect("a name").to_string();
            assert!(name.starts_with(&format!("{bench}: ")), "{name}");
            let value = f["value"].as_f64().expect("a number");
            assert!(value.is_finite(), "{f}");
            (name, f["unit"].as_str().expect("a unit").to_string(), value)
        })
        .collect();
    let mut names: Vec<&str> = figures.iter().map(|f| f.0.as_str()).collect();
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), figures.len(), "names are unique: {text}");
    figures
}

/// The CSV at `path`: a header and `rows` lines of as many fields (no field here needs quoting);
/// returned as the header and the rows.
pub fn read_csv(path: &Path, rows: usize) -> (Vec<String>, Vec<Vec<String>>) {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut lines = text.lines().map(|l| l.split(',').map(str::to_string).collect::<Vec<_>>());
    let header = lines.next().expect("a header line");
    let body: Vec<Vec<String>> = lines.collect();
    assert_eq!(body.len(), rows, "{text}");
    for line in &body {
        assert_eq!(line.len(), header.len(), "{text}");
    }
    (header, body)
}

/// The cells of column `name` of a CSV read by [`read_csv`].
pub fn column<'a>(csv: &'a (Vec<String>, Vec<Vec<String>>), name: &str) -> Vec<&'a str> {
    let i = csv.0.iter().position(|c| c == name).unwrap_or_else(|| panic!("no column {name}: {:?}", csv.0));
    csv.1.iter().map(|row| row[i].as_str()).collect()
}
