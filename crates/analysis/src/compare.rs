//! What-if: the same history under two configurations, and what differs —
//! segment sizes day by day, where customers end up, transitions added and
//! removed per day, example customers.

use std::collections::{BTreeMap, HashMap};

use segstream_decode::{format_rfc3339_millis, DAY_MS};
use serde::Serialize;
use xxhash_rust::xxh3::xxh3_64;

use crate::model::{day_label, Dataset};

#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    pub period: ComparisonPeriod,
    pub groups: Vec<GroupDiffRow>,
    pub sizes: Vec<SizeDiffRow>,
    pub moved: Vec<MovedRow>,
    #[serde(rename = "daily_transitions")]
    pub daily: Vec<DailyDiffRow>,
    pub examples: Vec<Example>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ComparisonPeriod {
    pub from: String,
    pub to: String,
    /// Customers with a segment at `to` under each configuration.
    pub customers_baseline: u64,
    pub customers_candidate: u64,
    /// Customers whose segment at `to` differs in at least one group both
    /// configurations have (a group only one has is in `groups`).
    pub customers_moved: u64,
}

/// One group's totals; a group only one configuration has counts all its
/// transitions as added (or removed).
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct GroupDiffRow {
    pub group: String,
    pub in_baseline: bool,
    pub in_candidate: bool,
    /// Customers whose segment at `to` differs.
    pub customers_moved: u64,
    pub transitions_baseline: u64,
    pub transitions_candidate: u64,
    /// Transitions (customer, from, to, at) only the candidate has.
    pub added: u64,
    /// Transitions only the baseline has.
    pub removed: u64,
}

/// Customers in a segment at the end of a day under both configurations.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct SizeDiffRow {
    pub day: String,
    pub group: String,
    pub segment: String,
    pub baseline: u64,
    pub candidate: u64,
    pub difference: i64,
}

/// Customers whose segment at `to` is `baseline` under the baseline and
/// `candidate` under the candidate (only pairs that differ).
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct MovedRow {
    pub group: String,
    pub baseline: Option<String>,
    pub candidate: Option<String>,
    pub customers: u64,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct DailyDiffRow {
    pub day: String,
    pub group: String,
    pub added: u64,
    pub removed: u64,
}

/// A customer who ends elsewhere, with the transitions that explain it
/// under each configuration (filled by the caller from the transition files).
#[derive(Debug, Clone, Serialize)]
pub struct Example {
    pub customer_id: String,
    pub group: String,
    pub baseline: Option<String>,
    pub candidate: Option<String>,
    pub baseline_transitions: Vec<serde_json::Value>,
    pub candidate_transitions: Vec<serde_json::Value>,
}

/// Labels at `to` of one run: (customer id, group name) → segment name.
fn final_labels(ds: &Dataset, to: i64) -> HashMap<(String, String), String> {
    let mut out = HashMap::new();
    for m in ds.moves().iter().filter(|m| m.at <= to) {
        let key = (ds.customer_id(m.customer).to_string(), ds.names.group_name(m.group).to_string());
        match m.to {
            Some(s) => out.insert(key, ds.names.segment_name(m.group, s).to_string()),
            None => out.remove(&key),
        };
    }
    out
}

/// Daily sizes of one run: (day, group, segment) → customers.
fn daily_sizes(ds: &Dataset, from: i64, to: i64) -> BTreeMap<(i64, String, String), u64> {
    let mut counts: BTreeMap<(String, String), i64> = BTreeMap::new();
    for g in &ds.names.groups {
        for s in &g.segments {
            counts.insert((g.name.clone(), s.clone()), 0);
        }
    }
    let mut out = BTreeMap::new();
    let mut moves = ds.moves().iter().peekable();
    for day in from.div_euclid(DAY_MS)..=to.div_euclid(DAY_MS) {
        let end = ((day + 1) * DAY_MS).min(to + 1);
        while let Some(m) = moves.next_if(|m| m.at < end) {
            let g = ds.names.group_name(m.group);
            if let Some(s) = m.from {
                *counts.entry((g.to_string(), ds.names.segment_name(m.group, s).to_string())).or_default() -= 1;
            }
            if let Some(s) = m.to {
                *counts.entry((g.to_string(), ds.names.segment_name(m.group, s).to_string())).or_default() += 1;
            }
        }
        for ((g, s), n) in &counts {
            out.insert((day, g.clone(), s.clone()), (*n).max(0) as u64);
        }
    }
    out
}

/// A customer's differing groups: (group, baseline segment, candidate segment).
type Moves = Vec<(String, Option<String>, Option<String>)>;

/// How many examples a comparison shows.
pub const EXAMPLES: usize = 10;

/// Compares two runs of the same history over `[from, to]`.
pub fn compare(baseline: &Dataset, candidate: &Dataset, from: i64, to: i64) -> Comparison {
    let mut groups: Vec<String> = baseline.names.groups.iter().map(|g| g.name.clone()).collect();
    for g in &candidate.names.groups {
        if !groups.contains(&g.name) {
            groups.push(g.name.clone());
        }
    }

    // Where customers end.
    let (lb, lc) = (final_labels(baseline, to), final_labels(candidate, to));
    let mut moved_pairs: BTreeMap<(String, Option<String>, Option<String>), u64> = BTreeMap::new();
    let mut moved_customers: BTreeMap<String, Moves> = BTreeMap::new();
    let mut keys: Vec<&(String, String)> = lb.keys().chain(lc.keys().filter(|k| !lb.contains_key(*k))).collect();
    keys.sort();
    for key in keys {
        let (b, c) = (lb.get(key), lc.get(key));
        if b != c {
            let (b, c) = (b.cloned(), c.cloned());
            *moved_pairs.entry((key.1.clone(), b.clone(), c.clone())).or_default() += 1;
            moved_customers.entry(key.0.clone()).or_default().push((key.1.clone(), b, c));
        }
    }
    let moved = moved_pairs
        .into_iter()
        .map(|((group, baseline, candidate), customers)| MovedRow { group, baseline, candidate, customers })
        .collect();

    // Transitions added and removed, per day and group.
    // Keyed by hashes of (customer) and (from, to), the instant and the group.
    type Key = (u64, u64, i64, usize);
    let gindex = |name: &str| groups.iter().position(|g| g == name).unwrap_or(0);
    let key_of = |ds: &Dataset, m: &crate::model::Move| -> Key {
        let label = |s: Option<u16>| s.map_or("\u{1}", |s| ds.names.segment_name(m.group, s));
        let pair = format!("{}\0{}", label(m.from), label(m.to));
        (
            xxh3_64(ds.customer_id(m.customer).as_bytes()),
            xxh3_64(pair.as_bytes()),
            m.at,
            gindex(ds.names.group_name(m.group)),
        )
    };
    let mut balance: HashMap<Key, i64> = HashMap::new();
    let mut totals: HashMap<usize, (u64, u64)> = HashMap::new();
    for m in baseline.moves().iter().filter(|m| m.at >= from && m.at <= to) {
        let k = key_of(baseline, m);
        totals.entry(k.3).or_default().0 += 1;
        *balance.entry(k).or_default() -= 1;
    }
    for m in candidate.moves().iter().filter(|m| m.at >= from && m.at <= to) {
        let k = key_of(candidate, m);
        totals.entry(k.3).or_default().1 += 1;
        *balance.entry(k).or_default() += 1;
    }
    let mut per_day: BTreeMap<(i64, usize), (u64, u64)> = BTreeMap::new();
    for ((_, _, at, g), n) in balance {
        let cell = per_day.entry((at.div_euclid(DAY_MS), g)).or_default();
        if n > 0 {
            cell.0 += n as u64;
        } else {
            cell.1 += n.unsigned_abs();
        }
    }
    let mut group_rows: Vec<GroupDiffRow> = groups
        .iter()
        .map(|g| {
            let (tb, tc) = totals.get(&gindex(g)).copied().unwrap_or_default();
            GroupDiffRow {
                group: g.clone(),
                in_baseline: baseline.names.group(g).is_some(),
                in_candidate: candidate.names.group(g).is_some(),
                customers_moved: moved_customers.values().filter(|v| v.iter().any(|x| &x.0 == g)).count() as u64,
                transitions_baseline: tb,
                transitions_candidate: tc,
                added: 0,
                removed: 0,
            }
        })
        .collect();
    let mut daily = Vec::new();
    for ((day, g), (added, removed)) in per_day {
        if added == 0 && removed == 0 {
            continue;
        }
        group_rows[g].added += added;
        group_rows[g].removed += removed;
        daily.push(DailyDiffRow { day: day_label(day), group: groups[g].clone(), added, removed });
    }

    // Sizes day by day.
    let (sb, sc) = (daily_sizes(baseline, from, to), daily_sizes(candidate, from, to));
    let mut size_keys: Vec<&(i64, String, String)> =
        sb.keys().chain(sc.keys().filter(|k| !sb.contains_key(*k))).collect();
    let order = |g: &str| groups.iter().position(|x| x == g).unwrap_or(usize::MAX);
    let seg_order = |g: &str, s: &str| {
        let pos = |ds: &Dataset| ds.names.group(g).and_then(|gi| ds.names.segment(gi, s)).map(usize::from);
        pos(baseline).or(pos(candidate).map(|p| p + 1000)).unwrap_or(usize::MAX)
    };
    size_keys.sort_by_key(|(d, g, s)| (*d, order(g), seg_order(g, s)));
    let sizes = size_keys
        .into_iter()
        .map(|k| {
            let (b, c) = (sb.get(k).copied().unwrap_or(0), sc.get(k).copied().unwrap_or(0));
            SizeDiffRow {
                day: day_label(k.0),
                group: k.1.clone(),
                segment: k.2.clone(),
                baseline: b,
                candidate: c,
                difference: c as i64 - b as i64,
            }
        })
        .collect();

    // Examples: spread over the ids by hash, the same for the same data.
    let mut chosen: Vec<(&String, &Moves)> = moved_customers.iter().collect();
    chosen.sort_by_key(|(id, _)| (xxh3_64(id.as_bytes()), (*id).clone()));
    let examples = chosen
        .into_iter()
        .take(EXAMPLES)
        .map(|(id, v)| {
            let shared = |g: &str| baseline.names.group(g).is_some() && candidate.names.group(g).is_some();
            (id, v.iter().find(|m| shared(&m.0)).unwrap_or(&v[0]))
        })
        .map(|(id, m)| Example {
            customer_id: id.clone(),
            group: m.0.clone(),
            baseline: m.1.clone(),
            candidate: m.2.clone(),
            baseline_transitions: Vec::new(),
            candidate_transitions: Vec::new(),
        })
        .collect();

    Comparison {
        period: ComparisonPeriod {
            from: format_rfc3339_millis(from),
            to: format_rfc3339_millis(to),
            customers_baseline: lb.keys().map(|k| &k.0).collect::<std::collections::HashSet<_>>().len() as u64,
            customers_candidate: lc.keys().map(|k| &k.0).collect::<std::collections::HashSet<_>>().len() as u64,
            customers_moved: moved_customers
                .values()
                .filter(|v| {
                    v.iter().any(|(g, _, _)| baseline.names.group(g).is_some() && candidate.names.group(g).is_some())
                })
                .count() as u64,
        },
        groups: group_rows,
        sizes,
        moved,
        daily,
        examples,
    }
}
