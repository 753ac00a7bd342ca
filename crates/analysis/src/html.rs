//! One self-contained HTML page per report: CSS in the page, charts as
//! inline SVG drawn with plotters, heatmaps as coloured tables. Nothing is
//! fetched when it is opened.

use std::collections::BTreeMap;
use std::fmt::Write;

use plotters::prelude::*;

use crate::report::{Report, FEATURES};

/// Segment colours (Tableau 10, then darker variants), by segment index.
const PALETTE: [(u8, u8, u8); 14] = [
    (78, 121, 167),
    (242, 142, 43),
    (225, 87, 89),
    (118, 183, 178),
    (89, 161, 79),
    (237, 201, 72),
    (176, 122, 161),
    (255, 157, 167),
    (156, 117, 95),
    (186, 176, 172),
    (31, 119, 180),
    (44, 160, 44),
    (148, 103, 189),
    (140, 86, 75),
];

pub(crate) fn color(i: usize) -> RGBColor {
    let (r, g, b) = PALETTE[i % PALETTE.len()];
    RGBColor(r, g, b)
}

/// A segment's colour: its own for names that are colours (the health
/// group's green, yellow, red), else the palette's by index.
fn segment_rgb(name: &str, i: usize) -> (u8, u8, u8) {
    match name {
        "green" => (89, 161, 79),
        "yellow" => (237, 201, 72),
        "red" => (225, 87, 89),
        _ => PALETTE[i % PALETTE.len()],
    }
}

fn segment_color(name: &str, i: usize) -> RGBColor {
    let (r, g, b) = segment_rgb(name, i);
    RGBColor(r, g, b)
}

/// A transition record's cause as a table cell: `event e-1`, `time
/// recency`, `rules v1 → v2`, `requantile`.
fn cause_text(c: &serde_json::Value) -> String {
    let kind = c.get("kind").and_then(|k| k.as_str()).unwrap_or("");
    let detail = match (c.get("event_id").or(c.get("boundary")).and_then(|v| v.as_str()), c.get("from_version")) {
        (Some(x), _) => x.to_string(),
        (None, Some(from)) => format!("v{from} → v{}", c.get("to_version").map_or(String::new(), |v| v.to_string())),
        (None, None) => String::new(),
    };
    if detail.is_empty() {
        kind.to_string()
    } else {
        format!("{kind} {detail}")
    }
}

/// HTML-escapes text.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Whole currency units from cents, with thousands separators.
pub fn money(cents: i64) -> String {
    let units = (cents as f64 / 100.0).round() as i64;
    let digits = units.unsigned_abs().to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    if units < 0 {
        out.insert(0, '-');
    }
    out
}

pub fn count(n: u64) -> String {
    money(n as i64 * 100)
}

/// `+12`, `−3`, or `0`.
fn signed(n: u64, sign: char) -> String {
    if n == 0 {
        "0".into()
    } else {
        format!("{sign}{}", count(n))
    }
}

pub fn pct(x: Option<f64>) -> String {
    x.map_or_else(|| "–".into(), |x| format!("{:.1}%", x * 100.0))
}

pub fn num(x: Option<f64>, digits: usize) -> String {
    x.map_or_else(|| "–".into(), |x| format!("{x:.digits$}"))
}

/// A cell coloured from white (0) to `hue` (1).
pub fn heat_cell(text: &str, level: Option<f64>, hue: (u8, u8, u8)) -> String {
    match level {
        None => format!("<td class=\"n\">{}</td>", esc(text)),
        Some(l) => {
            let l = l.clamp(0.0, 1.0);
            let mix = |c: u8| (255.0 - (255.0 - f64::from(c)) * l).round() as u8;
            let fg = if l > 0.6 { "#fff" } else { "#222" };
            format!(
                "<td class=\"n\" style=\"background:rgb({},{},{});color:{fg}\">{}</td>",
                mix(hue.0),
                mix(hue.1),
                mix(hue.2),
                esc(text)
            )
        }
    }
}

pub const BLUE: (u8, u8, u8) = (33, 102, 172);
pub const RED: (u8, u8, u8) = (178, 24, 43);
pub const GREEN: (u8, u8, u8) = (27, 120, 55);

pub const STYLE: &str = r#"
body{font-family:-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;margin:0;color:#222;background:#fafafa}
main{max-width:1180px;margin:0 auto;padding:24px}
h1{font-size:26px;margin:0 0 4px}h2{font-size:20px;margin:32px 0 8px;border-bottom:2px solid #ddd;padding-bottom:4px}
h3{font-size:16px;margin:20px 0 6px}p.lead{color:#555;margin:0 0 16px}p.note{color:#666;font-size:13px;max-width:900px}
.cards{display:flex;gap:12px;flex-wrap:wrap;margin:12px 0}.card{background:#fff;border:1px solid #ddd;border-radius:6px;padding:10px 14px;min-width:150px}
.card b{display:block;font-size:22px}.card span{color:#666;font-size:12px}.card.risk b{color:#b2182b}
table{border-collapse:collapse;background:#fff;font-size:13px;margin:6px 0 12px}th,td{border:1px solid #e3e3e3;padding:3px 7px;text-align:left}
th{background:#f0f0f0;font-weight:600}td.n{text-align:right;font-variant-numeric:tabular-nums}
.bar{display:inline-block;height:10px;background:#4e79a7;vertical-align:middle;margin-right:6px}
.legend span{display:inline-block;margin:2px 10px 2px 0;font-size:12px}.legend i{display:inline-block;width:10px;height:10px;margin-right:4px;vertical-align:middle}
.chart{background:#fff;border:1px solid #ddd;border-radius:6px;padding:6px;display:inline-block;margin:4px 8px 4px 0;vertical-align:top}
.grid{display:flex;flex-wrap:wrap;gap:8px}details{margin:6px 0}summary{cursor:pointer;color:#335}
"#;

/// A stacked area chart: one series per name, one value per x.
pub fn stacked_area(title: &str, x_labels: &[String], series: &[(String, Vec<f64>)], w: u32, h: u32) -> String {
    let mut svg = String::new();
    if x_labels.is_empty() {
        return svg;
    }
    {
        let root = SVGBackend::with_string(&mut svg, (w, h)).into_drawing_area();
        let _ = root.fill(&WHITE);
        let n = x_labels.len();
        let mut tops = vec![0.0f64; n];
        let mut layers = Vec::new();
        for (_, values) in series {
            for (t, v) in tops.iter_mut().zip(values) {
                *t += v;
            }
            layers.push(tops.clone());
        }
        let max = tops.iter().copied().fold(1.0, f64::max) * 1.05;
        let built = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 15))
            .margin(8)
            .x_label_area_size(28)
            .y_label_area_size(56)
            .build_cartesian_2d(0..(n.max(2) - 1), 0f64..max);
        let Ok(mut chart) = built else { return String::new() };
        let labels = x_labels.to_vec();
        let _ = chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(6)
            .x_label_formatter(&|i| labels.get(*i).cloned().unwrap_or_default())
            .y_label_formatter(&|v| count(*v as u64))
            .label_style(("sans-serif", 11))
            .draw();
        for (i, layer) in layers.iter().enumerate().rev() {
            let c = segment_color(&series[i].0, i);
            let _ =
                chart.draw_series(AreaSeries::new(layer.iter().copied().enumerate(), 0.0, c.mix(0.85)).border_style(c));
        }
        let _ = root.present();
    }
    inline(svg)
}

/// Lines over x labels, each (name, colour index, values); a colour index
/// of 100 or more is colour `index − 100`, faded.
pub fn lines(title: &str, x_labels: &[String], series: &[(String, usize, Vec<f64>)], w: u32, h: u32) -> String {
    let mut svg = String::new();
    if x_labels.is_empty() {
        return svg;
    }
    {
        let root = SVGBackend::with_string(&mut svg, (w, h)).into_drawing_area();
        let _ = root.fill(&WHITE);
        let n = x_labels.len();
        let max = series.iter().flat_map(|s| s.2.iter().copied()).fold(1.0, f64::max) * 1.1;
        let min = series.iter().flat_map(|s| s.2.iter().copied()).fold(0.0, f64::min) * 1.1;
        let built = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 15))
            .margin(8)
            .x_label_area_size(28)
            .y_label_area_size(48)
            .build_cartesian_2d(0..(n.max(2) - 1), min..max);
        let Ok(mut chart) = built else { return String::new() };
        let labels = x_labels.to_vec();
        let _ = chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(6)
            .x_label_formatter(&|i| labels.get(*i).cloned().unwrap_or_default())
            .y_label_formatter(&|v| format!("{v:.0}"))
            .label_style(("sans-serif", 11))
            .draw();
        for (name, c, values) in series {
            let c = if *c >= 100 { color(*c - 100).mix(0.35) } else { color(*c).mix(1.0) };
            if let Ok(s) = chart.draw_series(LineSeries::new(values.iter().copied().enumerate(), c.stroke_width(2))) {
                s.label(name.clone())
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 14, y)], c.stroke_width(2)));
            }
        }
        // Many series: the caller puts the legend under the chart instead.
        if series.len() <= 6 {
            let _ = chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK.mix(0.3))
                .label_font(("sans-serif", 11))
                .position(SeriesLabelPosition::UpperLeft)
                .draw();
        }
        let _ = root.present();
    }
    inline(svg)
}

/// SVG inside HTML needs no namespace declaration: without it the page
/// holds no URL at all.
fn inline(svg: String) -> String {
    svg.replace(" xmlns=\"http://www.w3.org/2000/svg\"", "")
}

pub fn legend(names: &[String]) -> String {
    let mut out = String::from("<div class=\"legend\">");
    for (i, n) in names.iter().enumerate() {
        let (r, g, b) = segment_rgb(n, i);
        let _ = write!(out, "<span><i style=\"background:rgb({r},{g},{b})\"></i>{}</span>", esc(n));
    }
    out.push_str("</div>");
    out
}

/// A legend of palette colours by index (the colours `lines` draws with):
/// solid for the candidate, faded for the baseline.
fn palette_legend(items: &[(String, usize)]) -> String {
    let mut out = String::from("<div class=\"legend\">");
    for (name, i) in items {
        let (r, g, b) = PALETTE[i % PALETTE.len()];
        let _ = write!(
            out,
            "<span><i style=\"background:rgb({r},{g},{b})\"></i><i style=\"background:rgba({r},{g},{b},0.35)\"></i>{}</span>",
            esc(name)
        );
    }
    out.push_str("<span>(solid: candidate, faded: baseline)</span></div>");
    out
}

pub fn page(title: &str, body: &str) -> String {
    format!(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{}</title>\
         <meta name=\"viewport\" content=\"width=device-width,initial-scale=1\"><style>{STYLE}</style></head>\
         <body><main>{body}</main></body></html>\n",
        esc(title)
    )
}

/// The report as one HTML page.
pub fn render_report(r: &Report) -> String {
    let mut b = String::new();
    let p = &r.period;
    let _ = write!(
        b,
        "<h1>Segment report</h1><p class=\"lead\">{} to {} · {}</p>",
        esc(&p.from),
        esc(&p.to),
        esc(&p.source)
    );
    if p.end_size_differences > 0 {
        let _ = write!(
            b,
            "<p class=\"note\" style=\"color:#b2182b\"><b>The transitions and the state disagree at the end \
             ({} customer-segment differences)</b>: the transitions file is incomplete or from another run. Sizes \
             over time, flows and validation use the transitions; current sizes, breakdowns and clusters the state.</p>",
            count(p.end_size_differences)
        );
    }
    if let Some(n) = p.unmatched_transitions.filter(|n| *n > 0) {
        let _ = write!(
            b,
            "<p class=\"note\" style=\"color:#b2182b\"><b>{} transitions of the period differ between the \
             transitions file and the engine's run of the input</b>: the file is incomplete or was made with \
             other rules or other input. The tables use the file.</p>",
            count(n)
        );
    }
    let has = |g: &str, seg: &str| r.current.iter().any(|c| c.group == g && c.segment == seg);
    let mrr_of = |g: &str, segs: &[&str]| -> i64 {
        r.current.iter().filter(|c| c.group == g && segs.contains(&c.segment.as_str())).map(|c| c.mrr_cents).sum()
    };
    let mut risk = String::new();
    let at_risk: Vec<&str> = ["at_risk", "cant_lose"].into_iter().filter(|s| has("rfm", s)).collect();
    if !at_risk.is_empty() {
        let _ = write!(
            risk,
            "<div class=\"card risk\"><b>{}</b><span>MRR in rfm {}</span></div>",
            money(mrr_of("rfm", &at_risk)),
            esc(&at_risk.join(" + "))
        );
    }
    if has("health", "red") {
        let _ = write!(
            risk,
            "<div class=\"card risk\"><b>{}</b><span>MRR in health red</span></div>",
            money(mrr_of("health", &["red"]))
        );
    }
    let _ = write!(
        b,
        "<div class=\"cards\"><div class=\"card\"><b>{}</b><span>customers at the end</span></div>\
         <div class=\"card\"><b>{}</b><span>MRR at the end</span></div>{risk}\
         <div class=\"card\"><b>{}</b><span>transitions in the period</span></div>\
         <div class=\"card\"><b>{}</b><span>input events ({} duplicates ignored, {} invalid records skipped)</span></div></div>",
        count(p.customers),
        money(p.mrr_cents),
        count(p.transitions),
        count(p.events),
        count(p.duplicate_events),
        count(p.invalid_records)
    );

    // Sizes.
    b.push_str(
        "<h2>1. Segment sizes</h2><p class=\"note\">Customers in each segment at the end of each day \
        (from the transitions), and at the end of the period with their MRR (from the state).</p>",
    );
    let mut groups: Vec<&str> = Vec::new();
    for c in &r.current {
        if !groups.contains(&c.group.as_str()) {
            groups.push(&c.group);
        }
    }
    for g in &groups {
        let rows: Vec<_> = r.sizes_over_time.iter().filter(|s| s.group == *g).collect();
        let mut days: Vec<String> = Vec::new();
        let mut per: BTreeMap<usize, (String, Vec<f64>)> = BTreeMap::new();
        let segs: Vec<String> = r.current.iter().filter(|c| c.group == *g).map(|c| c.segment.clone()).collect();
        for s in &rows {
            if days.last() != Some(&s.day) {
                days.push(s.day.clone());
            }
            let i = segs.iter().position(|x| *x == s.segment).unwrap_or(0);
            per.entry(i).or_insert_with(|| (s.segment.clone(), Vec::new())).1.push(s.customers as f64);
        }
        let series: Vec<(String, Vec<f64>)> = per.into_values().collect();
        let _ = write!(
            b,
            "<h3>{}</h3><div class=\"chart\">{}{}</div>",
            esc(g),
            stacked_area(&format!("{g}: customers per segment"), &days, &series, 760, 300),
            legend(&segs)
        );
        b.push_str("<table><tr><th>segment</th><th>customers</th><th>share</th><th>MRR</th><th>share of MRR</th></tr>");
        for c in r.current.iter().filter(|c| c.group == *g) {
            let _ = write!(
                b,
                "<tr><td>{}</td><td class=\"n\">{}</td><td><span class=\"bar\" style=\"width:{:.0}px\"></span>{}</td>\
                 <td class=\"n\">{}</td><td><span class=\"bar\" style=\"width:{:.0}px;background:#e15759\"></span>{}</td></tr>",
                esc(&c.segment),
                count(c.customers),
                c.share * 120.0,
                pct(Some(c.share)),
                money(c.mrr_cents),
                c.mrr_share * 120.0,
                pct(Some(c.mrr_share))
            );
        }
        b.push_str("</table>");
    }

    // Flows.
    b.push_str(
        "<h2>2. Flows</h2><p class=\"note\">Transitions in the period, from the row's segment to the \
        column's (— is no segment: a new customer, or an erased one).</p>",
    );
    for g in &groups {
        let segs: Vec<String> = r.current.iter().filter(|c| c.group == *g).map(|c| c.segment.clone()).collect();
        let mut keys: Vec<Option<String>> = vec![None];
        keys.extend(segs.iter().cloned().map(Some));
        let cell = |f: &Option<String>, t: &Option<String>| {
            r.flows.iter().find(|x| x.group == *g && &x.from == f && &x.to == t).map_or(0, |x| x.transitions)
        };
        let max = r.flows.iter().filter(|x| x.group == *g).map(|x| x.transitions).max().unwrap_or(1).max(1);
        let _ = write!(b, "<details open><summary>{}</summary><table><tr><th>from \\ to</th>", esc(g));
        for t in &keys {
            let _ = write!(b, "<th>{}</th>", esc(t.as_deref().unwrap_or("—")));
        }
        b.push_str("</tr>");
        for f in &keys {
            let _ = write!(b, "<tr><th>{}</th>", esc(f.as_deref().unwrap_or("—")));
            for t in &keys {
                let n = cell(f, t);
                b.push_str(&heat_cell(
                    &if n > 0 { count(n) } else { String::new() },
                    Some((n as f64 / max as f64).sqrt()),
                    BLUE,
                ));
            }
            b.push_str("</tr>");
        }
        b.push_str("</table></details>");
    }
    let mut watched: Vec<(String, String)> = Vec::new();
    for w in &r.weekly {
        if !watched.iter().any(|(g, s)| *g == w.group && *s == w.segment) {
            watched.push((w.group.clone(), w.segment.clone()));
        }
    }
    b.push_str("<div class=\"grid\">");
    for (g, s) in &watched {
        let rows: Vec<_> = r.weekly.iter().filter(|w| &w.group == g && &w.segment == s).collect();
        let weeks: Vec<String> = rows.iter().map(|w| w.week.clone()).collect();
        let series = vec![
            ("inflow".to_string(), 4usize, rows.iter().map(|w| w.inflow as f64).collect()),
            ("outflow".to_string(), 2usize, rows.iter().map(|w| w.outflow as f64).collect()),
        ];
        let _ = write!(
            b,
            "<div class=\"chart\">{}</div>",
            lines(&format!("{g} {s}: transitions per week (first and last may be partial)"), &weeks, &series, 560, 260)
        );
    }
    b.push_str("</div>");

    // Cohorts.
    b.push_str(
        "<h2>3. Cohort retention</h2><p class=\"note\">Accounts by the month of their first event. \
        Active: share of the cohort with an activity event in that month. MRR: the cohort's MRR at the month's \
        end over its MRR at the end of its first month. Months marked * are not over at the end of the period.</p>",
    );
    let mut cohort_names: Vec<String> = Vec::new();
    for c in &r.cohorts {
        if !cohort_names.contains(&c.cohort) {
            cohort_names.push(c.cohort.clone());
        }
    }
    let width = r.cohorts.iter().map(|c| c.months_since).max().unwrap_or(0);
    for (title, hue, mrr) in [("share active", BLUE, false), ("MRR retention", GREEN, true)] {
        let _ = write!(b, "<h3>{title}</h3><table><tr><th>cohort</th><th>accounts</th>");
        for k in 0..=width {
            let _ = write!(b, "<th>+{k}</th>");
        }
        b.push_str("</tr>");
        for name in &cohort_names {
            let row: Vec<_> = r.cohorts.iter().filter(|c| &c.cohort == name).collect();
            let accounts = row.first().map_or(0, |c| c.accounts);
            let _ = write!(b, "<tr><th>{}</th><td class=\"n\">{}</td>", esc(name), count(accounts));
            for k in 0..=width {
                match row.iter().find(|c| c.months_since == k) {
                    None => b.push_str("<td></td>"),
                    Some(c) => {
                        let v = if mrr { c.mrr_share } else { Some(c.active_share) };
                        let text = pct(v);
                        let text = if c.partial { format!("{text}*") } else { text };
                        b.push_str(&heat_cell(&text, v.map(|x| x.min(1.0)), hue));
                    }
                }
            }
            b.push_str("</tr>");
        }
        b.push_str("</table>");
    }

    // Validation.
    b.push_str(
        "<h2>4. Are the segments meaningful?</h2><p class=\"note\">Substantial: size and share at the end. \
        Stable: median length of the stays that ended, and the share of entries still in the segment 30 days \
        later. Predictive: share of entries followed within the horizon (90 days, or the longest of 60 and 30 days \
        the period can observe) by a cancellation or erasure (churn), or by a lower MRR (downgrade), and its lift over the rate of all entries of the group. Distinct: effect size \
        (Cohen's d) of each feature against the rest of the customers; |d| ≥ 0.8 is large.</p>",
    );
    for g in &groups {
        // The longest horizon the period can observe (entries at least that long before its end).
        let horizon = crate::report::HORIZONS_DAYS
            .into_iter()
            .rev()
            .find(|h| r.predictive.iter().any(|p| p.group == *g && p.horizon_days == *h && p.entries > 0))
            .unwrap_or(crate::report::HORIZONS_DAYS[0]);
        let _ = write!(
            b,
            "<details open><summary>{}</summary><table><tr><th>segment</th><th>customers</th><th>share</th><th>MRR</th>\
             <th>entries</th><th>median dwell (days)</th><th>still there at 30 d</th><th>churn {horizon} d</th><th>lift</th>\
             <th>downgrade {horizon} d</th><th>lift</th>",
            esc(g)
        );
        for f in FEATURES {
            let _ = write!(b, "<th>d({f})</th>");
        }
        b.push_str("</tr>");
        for v in r.validation.iter().filter(|v| v.group == *g) {
            let pred = |o: &str| {
                r.predictive
                    .iter()
                    .find(|p| p.group == *g && p.segment == v.segment && p.outcome == o && p.horizon_days == horizon)
            };
            let (c, d) = (pred("churn"), pred("downgrade"));
            let rate_cell = |p: Option<&crate::report::PredictiveRow>| match p {
                Some(p) if p.entries > 0 => format!("{} <small>of {}</small>", pct(p.rate), count(p.entries)),
                _ => "–".to_string(),
            };
            let lift_cell = |p: Option<&crate::report::PredictiveRow>| {
                let l = p.and_then(|p| p.lift);
                heat_cell(&num(l, 2), l.map(|l| ((l - 1.0) / 2.0).clamp(0.0, 1.0)), RED)
            };
            let _ = write!(
                b,
                "<tr><td>{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td>\
                 <td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td>{}<td class=\"n\">{}</td>{}",
                esc(&v.segment),
                count(v.customers),
                pct(Some(v.share)),
                money(v.mrr_cents),
                count(v.entries),
                match v.median_dwell_days {
                    Some(_) => format!("{} <small>of {}</small>", num(v.median_dwell_days, 1), count(v.completed_stays)),
                    None => "–".into(),
                },
                match v.still_there_30d {
                    Some(_) => format!("{} <small>of {}</small>", pct(v.still_there_30d), count(v.entries_observed_30d)),
                    None => "–".into(),
                },
                rate_cell(c),
                lift_cell(c),
                rate_cell(d),
                lift_cell(d)
            );
            for f in FEATURES {
                let e = r
                    .features
                    .iter()
                    .find(|x| x.group == *g && x.segment == v.segment && x.feature == f)
                    .and_then(|x| x.effect_size);
                let hue = if e.unwrap_or(0.0) < 0.0 { RED } else { BLUE };
                b.push_str(&heat_cell(&num(e, 2), e.map(|e| (e.abs() / 2.0).min(1.0)), hue));
            }
            b.push_str("</tr>");
        }
        b.push_str("</table></details>");
    }

    // Breakdowns.
    b.push_str(
        "<h2>5. Who is in each segment</h2><p class=\"note\">Share of each segment's customers by firmographic \
        value (profile events) and by each attribute or survey answer asked for with --breakdown (a list attribute \
        counts a customer under each of its values); the CSV and JSON have every group.</p>",
    );
    let mut dims: Vec<&str> = Vec::new();
    for x in &r.breakdowns {
        if !dims.contains(&x.dimension.as_str()) {
            dims.push(&x.dimension);
        }
    }
    for g in &groups {
        let _ = write!(b, "<details open><summary>{}</summary>", esc(g));
        for dim in &dims {
            let rows: Vec<_> = r.breakdowns.iter().filter(|x| x.group == *g && x.dimension == *dim).collect();
            let mut values: Vec<&str> = Vec::new();
            for x in &rows {
                if !values.contains(&x.value.as_str()) {
                    values.push(&x.value);
                }
            }
            // Bands in their order; names alphabetically, `other` and `unknown` last.
            let rank = |v: &str| -> (usize, String) {
                let bands = ["1-10", "11-50", "51-200", "201-1000", "1001-5000", "5001+"];
                match (bands.iter().position(|b| *b == v), v) {
                    (Some(i), _) => (i, String::new()),
                    (None, "other") => (100, String::new()),
                    (None, "unknown") => (101, String::new()),
                    (None, _) => (50, v.to_string()),
                }
            };
            values.sort_by_key(|v| rank(v));
            let _ = write!(b, "<h3>{}</h3><table><tr><th>segment</th>", esc(dim));
            for v in &values {
                let _ = write!(b, "<th>{}</th>", esc(v));
            }
            b.push_str("</tr>");
            for seg in r.current.iter().filter(|c| c.group == *g && c.customers > 0) {
                let _ = write!(b, "<tr><th>{}</th>", esc(&seg.segment));
                for v in &values {
                    let share =
                        rows.iter().find(|x| x.segment == seg.segment && x.value == *v).map(|x| x.share_of_segment);
                    b.push_str(&heat_cell(&pct(share.or(Some(0.0))), share.or(Some(0.0)), BLUE));
                }
                b.push_str("</tr>");
            }
            b.push_str("</table>");
        }
        b.push_str("</details>");
    }

    // Discovery.
    b.push_str("<h2>6. Discovery: k-means against the rules</h2>");
    match &r.discovery {
        None => b.push_str("<p class=\"note\">Too few customers for clustering.</p>"),
        Some(d) => {
            let _ = write!(
                b,
                "<p class=\"note\">k-means (linfa) over standardised R, F, M, adoption and health; k = {} has the best \
                 silhouette of 2..8. Adjusted Rand index against the {} segments: {:.3} (1: the same grouping, 0: \
                 chance).</p><table><tr><th>k</th>",
                d.k,
                esc(&d.group),
                d.adjusted_rand_index
            );
            for s in &d.silhouette {
                let _ = write!(b, "<td class=\"n\">{}</td>", s.k);
            }
            b.push_str("</tr><tr><th>silhouette</th>");
            for s in &d.silhouette {
                let _ = write!(b, "<td class=\"n\">{:.3}</td>", s.silhouette);
            }
            b.push_str("</tr></table><h3>Cluster profiles (means)</h3><table><tr><th>cluster</th><th>customers</th><th>share</th>\
                <th>R</th><th>F</th><th>M</th><th>adoption</th><th>health</th><th>MRR</th><th>mostly</th></tr>");
            for c in &d.clusters {
                let _ = write!(
                    b,
                    "<tr><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{:.2}</td>\
                     <td class=\"n\">{:.2}</td><td class=\"n\">{:.2}</td><td class=\"n\">{:.1}</td><td class=\"n\">{:.1}</td>\
                     <td class=\"n\">{}</td><td>{}</td></tr>",
                    c.cluster,
                    count(c.customers),
                    pct(Some(c.share)),
                    c.r,
                    c.f,
                    c.m,
                    c.adoption,
                    c.health,
                    money((c.mrr * 100.0) as i64),
                    esc(&c.main_segment)
                );
            }
            b.push_str("</table>");
            let mut segs: Vec<&str> = Vec::new();
            for c in r.current.iter().filter(|c| c.group == d.group) {
                segs.push(&c.segment);
            }
            let _ = write!(
                b,
                "<h3>Clusters against {} segments (customers)</h3><table><tr><th>cluster</th>",
                esc(&d.group)
            );
            for s in &segs {
                let _ = write!(b, "<th>{}</th>", esc(s));
            }
            b.push_str("</tr>");
            for c in &d.clusters {
                let _ = write!(b, "<tr><th>{}</th>", c.cluster);
                for s in &segs {
                    let n = d
                        .contingency
                        .iter()
                        .find(|x| x.cluster == c.cluster && x.segment == *s)
                        .map_or(0, |x| x.customers);
                    let share = if c.customers > 0 { n as f64 / c.customers as f64 } else { 0.0 };
                    b.push_str(&heat_cell(&if n > 0 { count(n) } else { String::new() }, Some(share), BLUE));
                }
                b.push_str("</tr>");
            }
            b.push_str("</table>");
        }
    }
    page("segstream report", &b)
}

/// A comparison of two configurations as one HTML page.
pub fn render_comparison(c: &crate::compare::Comparison) -> String {
    let mut b = String::new();
    let p = &c.period;
    let added: u64 = c.groups.iter().map(|g| g.added).sum();
    let removed: u64 = c.groups.iter().map(|g| g.removed).sum();
    let _ = write!(
        b,
        "<h1>What the new rules would do</h1><p class=\"lead\">The same input events replayed through the engine \
         under the baseline and the candidate configuration, {} to {}</p>\
         <div class=\"cards\"><div class=\"card risk\"><b>{}</b><span>customers in another segment at the end of the period</span></div>\
         <div class=\"card\"><b>+{}</b><span>transitions added</span></div>\
         <div class=\"card\"><b>−{}</b><span>transitions removed</span></div>\
         <div class=\"card\"><b>{}</b><span>customers (baseline / candidate: {})</span></div></div>",
        esc(&p.from),
        esc(&p.to),
        count(p.customers_moved),
        count(added),
        count(removed),
        count(p.customers_baseline),
        count(p.customers_candidate)
    );
    b.push_str(
        "<h2>Per group</h2><table><tr><th>group</th><th>customers moved</th><th>transitions (baseline)</th>\
        <th>transitions (candidate)</th><th>added</th><th>removed</th></tr>",
    );
    for g in &c.groups {
        let note = match (g.in_baseline, g.in_candidate) {
            (true, false) => " (baseline only)",
            (false, true) => " (candidate only)",
            _ => "",
        };
        let _ = write!(
            b,
            "<tr><td>{}{note}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td></tr>",
            esc(&g.group),
            count(g.customers_moved),
            count(g.transitions_baseline),
            count(g.transitions_candidate),
            signed(g.added, '+'),
            signed(g.removed, '−')
        );
    }
    b.push_str("</table>");

    b.push_str("<h2>Where customers end</h2><p class=\"note\">Customers whose segment at the end differs, by \
        (baseline segment → candidate segment).</p><table><tr><th>group</th><th>baseline</th><th>candidate</th><th>customers</th></tr>");
    let max = c.moved.iter().map(|m| m.customers).max().unwrap_or(1).max(1);
    for m in &c.moved {
        let _ = write!(
            b,
            "<tr><td>{}</td><td>{}</td><td>{}</td>{}</tr>",
            esc(&m.group),
            esc(m.baseline.as_deref().unwrap_or("—")),
            esc(m.candidate.as_deref().unwrap_or("—")),
            heat_cell(&count(m.customers), Some(m.customers as f64 / max as f64), BLUE)
        );
    }
    b.push_str("</table>");

    b.push_str(
        "<h2>Segment sizes over time</h2><p class=\"note\">Solid: candidate; the baseline's line is the \
        lighter one of the same colour. Only segments whose size differs on some day.</p><div class=\"grid\">",
    );
    let mut groups: Vec<&str> = Vec::new();
    for g in &c.groups {
        groups.push(&g.group);
    }
    for g in &groups {
        let rows: Vec<_> = c.sizes.iter().filter(|s| s.group == *g).collect();
        let mut days: Vec<String> = Vec::new();
        let mut segs: Vec<&str> = Vec::new();
        for r in &rows {
            if days.last() != Some(&r.day) {
                days.push(r.day.clone());
            }
            if !segs.contains(&r.segment.as_str()) {
                segs.push(&r.segment);
            }
        }
        let mut series = Vec::new();
        let mut shown = Vec::new();
        let one_sided = c.groups.iter().any(|x| x.group == *g && !(x.in_baseline && x.in_candidate));
        for (i, s) in segs.iter().enumerate() {
            let mine: Vec<_> = rows.iter().filter(|r| r.segment == *s).collect();
            if mine.iter().all(|r| r.difference == 0) {
                continue;
            }
            shown.push((s.to_string(), i));
            series.push((format!("{s} (candidate)"), i, mine.iter().map(|r| r.candidate as f64).collect::<Vec<_>>()));
            if !one_sided {
                series.push((format!("{s} (baseline)"), i + 100, mine.iter().map(|r| r.baseline as f64).collect()));
            }
        }
        if !series.is_empty() {
            let _ = write!(
                b,
                "<div class=\"chart\">{}{}</div>",
                lines(&format!("{g}: customers"), &days, &series, 560, 300),
                if series.len() > 6 { palette_legend(&shown) } else { String::new() }
            );
        }
    }
    b.push_str("</div>");

    b.push_str("<h2>Transitions per day</h2>");
    // Every day of the period (from the size rows), differences or not.
    let mut days: Vec<String> = Vec::new();
    for s in &c.sizes {
        if days.last() != Some(&s.day) {
            days.push(s.day.clone());
        }
    }
    if c.daily.is_empty() {
        b.push_str("<p class=\"note\">No transition differs.</p>");
    } else {
        let added: Vec<f64> =
            days.iter().map(|d| c.daily.iter().filter(|x| &x.day == d).map(|x| x.added as f64).sum()).collect();
        let removed: Vec<f64> = days
            .iter()
            .map(|d| -c.daily.iter().filter(|x| &x.day == d).map(|x| x.removed as f64).sum::<f64>())
            .collect();
        let series = vec![("added".to_string(), 4usize, added), ("removed".to_string(), 2usize, removed)];
        let _ = write!(
            b,
            "<div class=\"chart\">{}</div><p class=\"note\">Transitions only the candidate has (added) and only the baseline has (removed), per day.</p>",
            lines("transitions added (+) and removed (−) per day", &days, &series, 760, 280)
        );
    }

    b.push_str(
        "<h2>Examples</h2><p class=\"note\">Customers who end elsewhere, with their last transitions under \
        each configuration: the cause and the scores explain the move.</p>",
    );
    for e in &c.examples {
        let _ = write!(
            b,
            "<h3>{} · {}: {} → {}</h3><div class=\"grid\">",
            esc(&e.customer_id),
            esc(&e.group),
            esc(e.baseline.as_deref().unwrap_or("—")),
            esc(e.candidate.as_deref().unwrap_or("—"))
        );
        for (title, ts) in [("baseline", &e.baseline_transitions), ("candidate", &e.candidate_transitions)] {
            let _ = write!(b, "<table><tr><th colspan=\"5\">{title}</th></tr><tr><th>at</th><th>from → to</th><th>cause</th><th>R F M</th><th>health</th></tr>");
            for t in ts {
                let s = |k: &str| t.get(k).and_then(|v| v.as_str()).unwrap_or("—").to_string();
                let cause = t.get("cause").map_or(String::new(), cause_text);
                let sc = |k: &str| {
                    t.get("scores")
                        .and_then(|s| s.get(k))
                        .and_then(|v| v.as_u64())
                        .map_or("–".into(), |v| v.to_string())
                };
                let _ = write!(
                    b,
                    "<tr><td>{}</td><td>{} → {}</td><td>{}</td><td>{} {} {}</td><td class=\"n\">{}</td></tr>",
                    esc(&s("at")),
                    esc(&s("from")),
                    esc(&s("to")),
                    esc(&cause),
                    sc("R"),
                    sc("F"),
                    sc("M"),
                    sc("health")
                );
            }
            b.push_str("</table>");
        }
        b.push_str("</div>");
    }
    page("segstream simulate", &b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn money_and_escapes() {
        assert_eq!(money(123_456_789), "1,234,568");
        assert_eq!(money(-99_900), "-999");
        assert_eq!(money(0), "0");
        assert_eq!(esc("<a href=\"x\">&'"), "&lt;a href=&quot;x&quot;&gt;&amp;&#39;");
    }

    #[test]
    fn every_cause_has_a_cell() {
        let cell = |v: serde_json::Value| cause_text(&v);
        assert_eq!(cell(serde_json::json!({"kind": "event", "event_id": "e-1"})), "event e-1");
        assert_eq!(cell(serde_json::json!({"kind": "time", "boundary": "recency"})), "time recency");
        assert_eq!(cell(serde_json::json!({"kind": "rules", "from_version": 1, "to_version": 2})), "rules v1 → v2");
        assert_eq!(cell(serde_json::json!({"kind": "requantile"})), "requantile");
    }

    #[test]
    fn charts_are_inline_svg() {
        let days = vec!["2026-01-01".to_string(), "2026-01-02".to_string()];
        let svg = stacked_area("t", &days, &[("a".into(), vec![1.0, 2.0]), ("b".into(), vec![3.0, 1.0])], 300, 200);
        assert!(svg.starts_with("<svg"), "{svg}");
        assert!(svg.contains("<polygon") || svg.contains("<path"), "{svg}");
    }
}
