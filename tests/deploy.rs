//! The deployment files parse, and mean what segstream does: the dashboard
//! and the alert rules name only metrics segstream exports (checked against
//! a running engine's `/metrics` by `tests/kafka.rs`,
//! `output_equals_file_mode_and_poison_records_go_to_the_dead_letter_topic`), the manifests use
//! the probes, ports and environment the binary serves and reads.
//!
//! No Docker engine or Kubernetes cluster is needed: these are static checks
//! (README, "Deploy").

#[path = "support/deploy.rs"]
mod deploy_support;

use deploy_support::{deploy, deploy_metric_names, metric_names};
use yaml_rust2::{Yaml, YamlLoader};

fn yaml_docs(path: &str) -> Vec<Yaml> {
    let text = std::fs::read_to_string(deploy(path)).unwrap_or_else(|e| panic!("{path}: {e}"));
    YamlLoader::load_from_str(&text).unwrap_or_else(|e| panic!("{path} is not YAML: {e}"))
}

/// segstream accepts the configuration as its Kafka mode resolves it.
fn resolves(toml_text: &str) {
    let cfg = segstream::Config::from_toml(toml_text).expect("segstream reads the configuration");
    cfg.engine_settings().expect("valid engine settings");
    let over = segstream_kafka::KafkaOverrides::default();
    segstream_kafka::KafkaSettings::resolve(
        cfg.kafka.as_ref().expect("a [kafka] section"),
        &over,
        &segstream_kafka::KafkaEnvironment::default(),
    )
    .expect("valid Kafka settings");
}

#[test]
fn metric_names_are_read_from_promql() {
    assert_eq!(
        metric_names("sum by (le) (rate(segstream_commit_duration_seconds_bucket[5m])) / process_open_fds{job=\"x\"}"),
        vec!["segstream_commit_duration_seconds_bucket", "process_open_fds"]
    );
}

#[test]
fn the_alert_rules_metrics_are_all_read() {
    // The multi-line expressions' metrics too (the check in tests/kafka.rs
    // relies on this list).
    let names = deploy_metric_names();
    for m in ["segstream_consumer_lag_records", "segstream_input_events_total", "segstream_output_transitions_total"] {
        assert!(names.contains(m), "{m} in {names:?}");
    }
}

#[test]
fn the_dashboard_is_grafana_json_with_queries() {
    let text = std::fs::read_to_string(deploy("grafana/dashboards/segstream.json")).expect("dashboard");
    let d: serde_json::Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    assert_eq!(d["uid"], "segstream");
    let panels = d["panels"].as_array().expect("panels");
    let queries: Vec<&str> = panels
        .iter()
        .flat_map(|p| p["targets"].as_array().into_iter().flatten())
        .filter_map(|t| t["expr"].as_str())
        .collect();
    assert!(queries.len() >= 15, "{} queries", queries.len());
    for q in &queries {
        assert!(!metric_names(q).is_empty(), "a query without a segstream metric: {q}");
    }
    let titles: Vec<&str> = panels.iter().filter_map(|p| p["title"].as_str()).collect();
    for wanted in
        ["Consumer lag", "Commit latency", "Restore", "Dead letters", "segment sizes", "at_risk and champions"]
    {
        assert!(titles.iter().any(|t| t.contains(wanted)), "a panel about {wanted}: {titles:?}");
    }
    // Provisioning points Grafana at the dashboards' directory.
    let prov = &yaml_docs("grafana/provisioning/dashboards/segstream.yaml")[0];
    assert_eq!(prov["providers"][0]["options"]["path"].as_str(), Some("/var/lib/grafana/dashboards"));
    let ds = &yaml_docs("grafana/provisioning/datasources/prometheus.yaml")[0];
    assert_eq!(ds["datasources"][0]["uid"].as_str(), Some("prometheus"), "the uid the dashboard's panels use");
}

#[test]
fn alert_rules_parse_and_cover_what_an_sre_pages_on() {
    let rules = &yaml_docs("prometheus/alerts.yml")[0];
    let list = rules["groups"][0]["rules"].as_vec().expect("rules");
    let names: Vec<&str> = list.iter().filter_map(|r| r["alert"].as_str()).collect();
    for wanted in [
        "SegstreamLagGrowing",
        "SegstreamNoCommit",
        "SegstreamDeadLetterRate",
        "SegstreamPartitionStuck",
        "SegstreamAtRiskInflowHigh",
    ] {
        assert!(names.contains(&wanted), "{wanted} in {names:?}");
    }
    for r in list {
        let expr = r["expr"].as_str().unwrap_or_else(|| panic!("an expr in {r:?}"));
        assert!(!r["annotations"]["summary"].is_badvalue(), "a summary for {:?}", r["alert"]);
        assert!(!metric_names(expr).is_empty() || expr.contains("up{"), "{:?} uses no metric: {expr}", r["alert"]);
    }
    let prom = &yaml_docs("prometheus/prometheus.yml")[0];
    assert_eq!(prom["rule_files"][0].as_str(), Some("/etc/prometheus/alerts.yml"));
}

#[test]
fn the_compose_file_runs_kafka_segstream_prometheus_and_grafana() {
    let c = &yaml_docs("docker-compose.yml")[0];
    for s in ["kafka", "topics", "segstream", "prometheus", "grafana", "schema-registry"] {
        assert!(!c["services"][s].is_badvalue(), "service {s}");
    }
    let config = c["configs"]["segstream"]["content"].as_str().expect("segstream's config");
    let parsed: toml::Value = toml::from_str(config).expect("segstream's config is TOML");
    assert_eq!(parsed["kafka"]["metrics_addr"].as_str(), Some("0.0.0.0:9464"));
    let topics = c["services"]["topics"]["command"][0].as_str().expect("topic creation");
    assert!(topics.contains("segstream.changelog") && topics.contains("cleanup.policy=compact"), "{topics}");
    // The configuration as segstream itself reads it.
    resolves(config);
}

#[test]
fn the_kubernetes_manifest_uses_the_probes_and_environment_segstream_serves() {
    let docs = yaml_docs("kubernetes/segstream.yaml");
    let kind = |k: &str| docs.iter().find(|d| d["kind"].as_str() == Some(k)).unwrap_or_else(|| panic!("a {k}"));
    let sts = kind("StatefulSet");
    let c = &sts["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(c["livenessProbe"]["httpGet"]["path"].as_str(), Some("/healthz"));
    assert_eq!(c["readinessProbe"]["httpGet"]["path"].as_str(), Some("/readyz"));
    let env: Vec<&str> = c["env"].as_vec().expect("env").iter().filter_map(|e| e["name"].as_str()).collect();
    assert!(env.contains(&"SEGSTREAM_HTTP_ADVERTISED_URL") && env.contains(&"SEGSTREAM_LOG_FORMAT"), "{env:?}");
    assert_eq!(c["envFrom"][0]["secretRef"]["name"].as_str(), Some("segstream-credentials"));
    assert!(!sts["spec"]["volumeClaimTemplates"][0].is_badvalue(), "a volume per pod for the state");
    assert!(!kind("PodDisruptionBudget")["spec"]["maxUnavailable"].is_badvalue());
    let secret = kind("Secret");
    for (k, _) in secret["stringData"].as_hash().expect("secret data") {
        let k = k.as_str().expect("name");
        assert!(
            segstream_kafka::property_from_env(k).is_some() || k == segstream_kafka::REGISTRY_USER_INFO_ENV,
            "{k} is an environment variable segstream reads"
        );
    }
    let config = kind("ConfigMap")["data"]["segstream.toml"].as_str().expect("config");
    resolves(config);
}
