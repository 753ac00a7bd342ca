//! Reading the deployment files (`deploy/`) in tests: the metric names the
//! dashboard and the alert rules use.
#![allow(dead_code)] // each test binary uses its part

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

pub fn deploy(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy").join(path)
}

/// The metric names a PromQL expression uses (segstream's and the process's).
pub fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut word = String::new();
    for c in expr.chars().chain(std::iter::once(' ')) {
        if c.is_ascii_alphanumeric() || c == '_' || c == ':' {
            word.push(c);
        } else {
            if word.starts_with("segstream_") || word.starts_with("process_") {
                names.push(std::mem::take(&mut word));
            }
            word.clear();
        }
    }
    names
}

/// Every metric the Grafana dashboard and the Prometheus alert rules use.
pub fn deploy_metric_names() -> BTreeSet<String> {
    let dashboard = std::fs::read_to_string(deploy("grafana/dashboards/segstream.json")).expect("dashboard");
    let d: serde_json::Value = serde_json::from_str(&dashboard).expect("dashboard JSON");
    let mut names = BTreeSet::new();
    for p in d["panels"].as_array().into_iter().flatten() {
        for t in p["targets"].as_array().into_iter().flatten() {
            names.extend(metric_names(t["expr"].as_str().unwrap_or("")));
        }
    }
    // The alert rules: every `expr:` (block scalars included).
    let alerts = std::fs::read_to_string(deploy("prometheus/alerts.yml")).expect("alerts");
    let mut in_expr = false;
    for line in alerts.lines() {
        let t = line.trim_start();
        if let Some(rest) = t.strip_prefix("expr:") {
            names.extend(metric_names(rest));
            in_expr = true;
        } else if in_expr && !t.is_empty() && !t.contains(": ") && !t.ends_with(':') && !t.starts_with('-') {
            names.extend(metric_names(t));
        } else {
            in_expr = false;
        }
    }
    names
}
