//! Golden files: small inputs whose transitions were checked by hand against
//! docs/semantics.md (tests/golden/README.md). File mode must write them
//! byte for byte. `SEGSTREAM_BLESS=1` rewrites the expected files instead.

use std::path::Path;

use segstream::{run_file, Config, FileSettings};
use segstream_decode::parse_rfc3339_millis;
use segstream_engine::EngineSettings;

fn run_case(case: &Path) -> Result<(), String> {
    let dir = tempfile::tempdir().expect("tempdir");
    let inputs: Vec<_> = ["events.jsonl", "later.jsonl"].iter().map(|f| case.join(f)).filter(|p| p.is_file()).collect();
    let until = std::fs::read_to_string(case.join("until"))
        .ok()
        .map(|u| parse_rfc3339_millis(u.trim()).expect("until is RFC 3339"));
    let output = dir.path().join("out.jsonl");
    for (i, input) in inputs.iter().enumerate() {
        let mut args = FileSettings::new(input, &output, dir.path().join("state"));
        args.until = until.filter(|_| i + 1 == inputs.len());
        let settings = match std::fs::read_to_string(case.join("config.toml")) {
            Ok(text) => Config::from_toml(&text).expect("config.toml").engine_settings().expect("valid settings"),
            Err(_) => EngineSettings::spec_default(),
        };
        let summary = run_file(&settings, &args).map_err(|e| e.to_string())?;
        assert_eq!(summary.counts.invalid, 0, "{}: golden inputs are valid", input.display());
    }
    let got = std::fs::read_to_string(&output).expect("output");
    let expected_path = case.join("expected.jsonl");
    if std::env::var_os("SEGSTREAM_BLESS").is_some() {
        std::fs::write(&expected_path, &got).expect("bless");
        return Ok(());
    }
    let expected = std::fs::read_to_string(&expected_path).unwrap_or_default();
    if got == expected {
        return Ok(());
    }
    let (g, e): (Vec<&str>, Vec<&str>) = (got.lines().collect(), expected.lines().collect());
    let first = g.iter().zip(&e).position(|(a, b)| a != b).unwrap_or(g.len().min(e.len()));
    Err(format!(
        "{}: {} lines, expected {}; first difference at line {}:\n  got:      {}\n  expected: {}",
        case.display(),
        g.len(),
        e.len(),
        first + 1,
        g.get(first).unwrap_or(&"(none)"),
        e.get(first).unwrap_or(&"(none)")
    ))
}

#[test]
fn every_golden_case_gives_its_reviewed_transitions() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/golden");
    let mut cases: Vec<_> = std::fs::read_dir(&root)
        .expect("tests/golden")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.join("events.jsonl").is_file())
        .collect();
    cases.sort();
    assert!(cases.len() >= 3, "golden cases in {}: {cases:?}", root.display());
    let failures: Vec<String> = cases.iter().filter_map(|c| run_case(c).err()).collect();
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
