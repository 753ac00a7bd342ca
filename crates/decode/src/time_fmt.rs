use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// Milliseconds in a day: `day(t) = floor(t / DAY_MS)` (SPEC §2).
pub const DAY_MS: i64 = 86_400_000;

/// Parses an RFC 3339 timestamp (any offset) into UTC epoch milliseconds.
/// Sub-millisecond digits are truncated toward the past.
pub fn parse_rfc3339_millis(s: &str) -> Result<i64, String> {
    let t = OffsetDateTime::parse(s, &Rfc3339).map_err(|_| {
        let hint = if s.len() == 10 { " (a date alone is not enough: add a time and an offset)" } else { "" };
        format!(
            "expected an RFC 3339 time such as 2026-03-01T10:00:00Z or 2026-03-01T10:00:00.250+02:00, \
             or integer epoch milliseconds{hint}"
        )
    })?;
    let nanos = t.unix_timestamp_nanos();
    i64::try_from(nanos.div_euclid(1_000_000)).map_err(|_| "out of range".to_string())
}

/// Formats epoch milliseconds as RFC 3339 UTC with exactly three fraction digits,
/// e.g. `2026-03-01T00:00:00.000Z`.
pub fn format_rfc3339_millis(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let milli = ms.rem_euclid(1000);
    match OffsetDateTime::from_unix_timestamp(secs) {
        Ok(t) => format!(
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute(),
            t.second(),
            milli
        ),
        Err(_) => format!("{ms}ms"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_offsets_and_fractions() {
        assert_eq!(parse_rfc3339_millis("1970-01-01T00:00:00Z"), Ok(0));
        assert_eq!(parse_rfc3339_millis("1970-01-01T01:00:00.5+01:00"), Ok(500));
        assert_eq!(parse_rfc3339_millis("1970-01-01T00:00:00.0019Z"), Ok(1));
        assert_eq!(parse_rfc3339_millis("1969-12-31T23:59:59.9995Z"), Ok(-1));
        assert!(parse_rfc3339_millis("2026-13-01T00:00:00Z").is_err());
        assert!(parse_rfc3339_millis("yesterday").is_err());
    }

    #[test]
    fn formats_with_millis() {
        assert_eq!(format_rfc3339_millis(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(format_rfc3339_millis(1_772_323_200_123), "2026-03-01T00:00:00.123Z");
        assert_eq!(format_rfc3339_millis(-1), "1969-12-31T23:59:59.999Z");
        let t = 1_700_000_000_042;
        assert_eq!(parse_rfc3339_millis(&format_rfc3339_millis(t)), Ok(t));
    }
}
