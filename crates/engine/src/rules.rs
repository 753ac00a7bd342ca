//! The rules a state was built under, and moving a state to new rules
//! (ADR 008): which version is in force, whether a changed configuration is
//! refused or migrated, and how what is stored by index (history entries,
//! daily counts) is renamed under the new rules.

use std::collections::BTreeMap;

use segstream_scoring::{Group, Scorer, ScoringConfig, SegmentsConfig};
use segstream_state::HistoryEntry;
use serde::{Deserialize, Serialize};

use crate::engine::SegmentCounts;
use crate::error::EngineError;
use crate::settings::RulesPolicy;

/// Customers a migration re-evaluates between two commits at most (each
/// may rename up to `history.per_customer` kept entries).
pub const MIGRATION_BATCH: u64 = 10_000;

/// Meta key of the rules in force ([`RulesMeta`]).
pub(crate) const META_RULES: &str = "rules";
/// Meta key of a migration under way ([`MigrationProgress`]; `null` when none).
pub(crate) const META_MIGRATION: &str = "rules:migration";

/// A version of the rules, as a state records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RulesMeta {
    pub version: u32,
    pub fingerprint: u64,
    /// `[scoring, segments]` in JSON: what names the labels the state holds.
    pub rules: String,
}

impl RulesMeta {
    /// The scorer of these rules, stamping their version.
    pub fn scorer(&self) -> Result<Scorer, EngineError> {
        let (scoring, segments): (ScoringConfig, SegmentsConfig) = serde_json::from_str(&self.rules)
            .map_err(|e| EngineError::Meta { key: META_RULES, reason: format!("version {}: {e}", self.version) })?;
        let mut s = Scorer::new(scoring, segments)?;
        s.set_rules_version(self.version);
        Ok(s)
    }
}

/// A migration from one version of the rules to the next, resumable: the
/// customers are taken in id order, and `cursor` is the last one done.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationProgress {
    pub from: RulesMeta,
    pub to: RulesMeta,
    pub cursor: Option<String>,
    /// Customers re-evaluated so far.
    pub customers: u64,
    /// Transitions they produced.
    pub transitions: u64,
    /// Kept history entries that the new rules cannot name (a removed group
    /// or segment): deleted.
    pub history_dropped: u64,
}

/// What opening a state under the configured rules does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// The rules in force: nothing to do.
    Same(RulesMeta),
    /// Record these rules (a new state, or one made before rules were recorded).
    Record(RulesMeta),
    /// Start a migration.
    Migrate(MigrationProgress),
    /// Finish the migration under way.
    Resume(MigrationProgress),
}

/// Decides from what a state holds and what the configuration says (`what`
/// names the state in messages).
pub fn decide(
    what: &str,
    stored: Option<RulesMeta>,
    legacy_fingerprint: Option<u64>,
    migration: Option<MigrationProgress>,
    current: RulesMeta,
    policy: RulesPolicy,
) -> Result<Decision, EngineError> {
    if let Some(m) = migration {
        if current.fingerprint != m.to.fingerprint || policy.version.is_some_and(|v| v != m.to.version) {
            return Err(EngineError::Rules(format!(
                "a migration of the rules from version {} to {} is under way in {what} ({} customers done): \
                 restart with the configuration of version {} to finish it, then change the rules again",
                m.from.version, m.to.version, m.customers, m.to.version
            )));
        }
        return Ok(Decision::Resume(m));
    }
    let Some(stored) = stored else {
        return match legacy_fingerprint {
            Some(fp) if fp != current.fingerprint => Err(EngineError::Rules(format!(
                "the state in {what} was built under other scoring or segment rules by an earlier segstream, which \
                 did not record them, so its labels cannot be renamed under the new ones. Run it once with the \
                 configuration it was built with (that records the rules), then with the new one and --migrate-rules"
            ))),
            _ => Ok(Decision::Record(RulesMeta { version: policy.version.unwrap_or(1), ..current })),
        };
    };
    if let Some(v) = policy.version.filter(|v| *v < stored.version) {
        return Err(EngineError::Rules(format!(
            "rules_version = {v} is older than the version {} the state in {what} is under; rules cannot go back \
             (raise rules_version above {} to migrate to these rules)",
            stored.version, stored.version
        )));
    }
    let bumped = policy.version.filter(|v| *v > stored.version);
    if current.fingerprint == stored.fingerprint {
        return Ok(match bumped {
            Some(v) => Decision::Migrate(start(stored, RulesMeta { version: v, ..current })),
            None => Decision::Same(stored),
        });
    }
    let version = match (bumped, policy.version) {
        (Some(v), _) => v,
        (None, Some(v)) => {
            return Err(EngineError::Rules(format!(
                "the scoring or segment rules differ from those of the state in {what} ({}), but rules_version is \
                 still {v}: raise rules_version to migrate the state to the new rules, or restore the old ones",
                differences(&stored.rules, &current.rules)
            )))
        }
        (None, None) if policy.migrate => stored.version + 1,
        (None, None) => {
            return Err(EngineError::Rules(format!(
                "the state in {what} was built under other scoring or segment rules (version {}; {}). Its \
                 segments would not match the new rules. To move it to them, run with --migrate-rules (or raise \
                 rules_version): every customer is re-evaluated and each changed segment is a transition with \
                 cause `rules`. Or start a new state (file mode: a new --state-dir; Kafka mode: a new group id \
                 and changelog), or use the configuration it was built with",
                stored.version,
                differences(&stored.rules, &current.rules)
            )))
        }
    };
    Ok(Decision::Migrate(start(stored, RulesMeta { version, ..current })))
}

fn start(from: RulesMeta, to: RulesMeta) -> MigrationProgress {
    MigrationProgress { from, to, cursor: None, customers: 0, transitions: 0, history_dropped: 0 }
}

/// The settings that differ between two rule texts, as dotted paths (at most five).
pub(crate) fn differences(old: &str, new: &str) -> String {
    fn walk(path: &str, a: &serde_json::Value, b: &serde_json::Value, out: &mut Vec<String>) {
        use serde_json::Value::Object;
        match (a, b) {
            (Object(x), Object(y)) => {
                let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
                for k in keys {
                    let null = serde_json::Value::Null;
                    let p = if path.is_empty() { k.clone() } else { format!("{path}.{k}") };
                    walk(&p, x.get(k).unwrap_or(&null), y.get(k).unwrap_or(&null), out);
                }
            }
            _ if a != b => {
                let short = |v: &serde_json::Value| {
                    let t = if v.is_null() { "unset".to_string() } else { v.to_string() };
                    (t.len() <= 40).then_some(t)
                };
                match (short(a), short(b)) {
                    (Some(x), Some(y)) => out.push(format!("{path} {x} → {y}")),
                    _ => out.push(path.to_string()),
                }
            }
            _ => {}
        }
    }
    let parse = |s: &str| serde_json::from_str::<serde_json::Value>(s).unwrap_or_default();
    let (a, b) = (parse(old), parse(new));
    let mut out = Vec::new();
    // [scoring, segments]
    for (i, name) in ["scoring", "segments"].iter().enumerate() {
        walk(name, &a[i], &b[i], &mut out);
    }
    match out.len() {
        0 => "no setting differs".into(),
        n if n > 5 => format!("changed: {} and {} more", out[..5].join(", "), n - 5),
        _ => format!("changed: {}", out.join(", ")),
    }
}

/// What differs between the rules a state recorded (meta `rules`, if it
/// has it) and `current` (the text of [`crate::EngineSettings::rules_json`]),
/// for messages of readers that refuse a state of other rules.
pub fn rules_mismatch(stored: Option<&[u8]>, current: &str) -> String {
    match stored.and_then(|v| serde_json::from_slice::<RulesMeta>(v).ok()) {
        Some(m) => format!("rules version {}; {}", m.version, differences(&m.rules, current)),
        None => "the state did not record its rules".into(),
    }
}

/// Renames group and segment indexes of the old rules to those of the new.
pub(crate) struct Renaming {
    /// Old group index → new group index and, per old segment index, the new one.
    groups: Vec<Option<(u16, Vec<Option<u16>>)>>,
    /// Every index stays what it was (the same groups and segments in the
    /// same order, e.g. a threshold changed).
    identity: bool,
}

impl Renaming {
    pub(crate) fn new(old: &[Group], new: &[Group]) -> Self {
        let groups = old
            .iter()
            .map(|g| {
                let ng = new.iter().position(|n| n.name == g.name)?;
                let segs = g
                    .segments
                    .iter()
                    .map(|s| new[ng].segments.iter().position(|n| n == s).and_then(|i| u16::try_from(i).ok()))
                    .collect();
                Some((u16::try_from(ng).ok()?, segs))
            })
            .collect();
        let identity = old == new;
        Self { groups, identity }
    }

    pub(crate) fn is_identity(&self) -> bool {
        self.identity
    }

    /// The new (group, segment) of an old one, if the new rules name it.
    pub(crate) fn label(&self, group: u16, segment: u16) -> Option<(u16, u16)> {
        let (g, segs) = self.groups.get(usize::from(group))?.as_ref()?;
        Some((*g, (*segs.get(usize::from(segment))?)?))
    }

    /// A history entry under the new rules; `None` when they cannot name it.
    pub(crate) fn history(&self, e: &HistoryEntry) -> Option<HistoryEntry> {
        let (g, segs) = self.groups.get(usize::from(e.group))?.as_ref()?;
        let seg = |s: Option<u16>| -> Option<Option<u16>> {
            match s {
                None => Some(None),
                Some(s) => Some(Some((*segs.get(usize::from(s))?)?)),
            }
        };
        Some(HistoryEntry { group: *g, from: seg(e.from)?, to: seg(e.to)?, ..e.clone() })
    }

    /// Day counts under the new rules (segments they cannot name are left out).
    pub(crate) fn counts(&self, counts: &SegmentCounts) -> SegmentCounts {
        let mut out = BTreeMap::new();
        for (&(g, s), c) in counts {
            if let Some(k) = self.label(g, s) {
                out.insert(k, *c);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(version: u32, fingerprint: u64, rules: &str) -> RulesMeta {
        RulesMeta { version, fingerprint, rules: rules.into() }
    }

    const OLD: &str = r#"[{"recency":{"thresholds_days":[7,14,30,60]}},{}]"#;
    const NEW: &str = r#"[{"recency":{"thresholds_days":[7,14,21,60]}},{}]"#;

    #[test]
    fn a_changed_rule_needs_a_migration_asked_for_by_flag_or_version() {
        let stored = || Some(meta(2, 1, OLD));
        let new = || meta(0, 9, NEW);
        let refuse = decide("d", stored(), None, None, new(), RulesPolicy::default()).expect_err("changed");
        let text = refuse.to_string();
        assert!(text.contains("--migrate-rules") && text.contains("scoring.recency.thresholds_days"), "{text}");
        let flag = RulesPolicy { version: None, migrate: true };
        match decide("d", stored(), None, None, new(), flag).expect("migrates") {
            Decision::Migrate(m) => assert_eq!((m.from.version, m.to.version), (2, 3)),
            other => panic!("{other:?}"),
        }
        let bump = RulesPolicy { version: Some(5), migrate: false };
        match decide("d", stored(), None, None, new(), bump).expect("migrates") {
            Decision::Migrate(m) => assert_eq!((m.to.version, m.to.fingerprint), (5, 9)),
            other => panic!("{other:?}"),
        }
        let same_version = RulesPolicy { version: Some(2), migrate: true };
        assert!(decide("d", stored(), None, None, new(), same_version).is_err(), "a version names one set of rules");
        let older = RulesPolicy { version: Some(1), migrate: true };
        assert!(decide("d", stored(), None, None, new(), older).is_err());
        let unchanged = decide("d", stored(), None, None, meta(0, 1, OLD), RulesPolicy::default()).expect("same");
        assert_eq!(unchanged, Decision::Same(meta(2, 1, OLD)));
    }

    #[test]
    fn a_migration_under_way_is_finished_under_its_own_target_only() {
        let m = start(meta(1, 1, OLD), meta(2, 9, NEW));
        let d = decide("d", Some(meta(1, 1, OLD)), None, Some(m.clone()), meta(0, 9, NEW), RulesPolicy::default());
        assert_eq!(d.expect("resumes"), Decision::Resume(m.clone()));
        let other = decide("d", Some(meta(1, 1, OLD)), None, Some(m), meta(0, 1, OLD), RulesPolicy::default());
        assert!(other.expect_err("the old rules").to_string().contains("under way"));
    }

    #[test]
    fn a_state_from_before_recorded_rules_is_recorded_or_refused() {
        let rec = decide("d", None, Some(1), None, meta(0, 1, OLD), RulesPolicy::default()).expect("records");
        assert_eq!(rec, Decision::Record(meta(1, 1, OLD)));
        let flag = RulesPolicy { version: None, migrate: true };
        assert!(decide("d", None, Some(1), None, meta(0, 9, NEW), flag).is_err(), "old labels cannot be named");
    }
}
