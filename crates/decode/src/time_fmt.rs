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
    let mut out = Vec::with_capacity(24);
    write_rfc3339_millis(ms, &mut out);
    String::from_utf8(out).expect("ASCII")
}

/// Appends [`format_rfc3339_millis`]'s text to `out`, without allocating
/// (once per transition written).
pub fn write_rfc3339_millis(ms: i64, out: &mut Vec<u8>) {
    let secs = ms.div_euclid(1000);
    let milli = ms.rem_euclid(1000);
    let Ok(t) = OffsetDateTime::from_unix_timestamp(secs) else {
        out.extend_from_slice(format!("{ms}ms").as_bytes());
        return;
    };
    let Ok(year) = u32::try_from(t.year()) else {
        // Before year 0: as `{:04}` writes it.
        out.extend_from_slice(padded(t, milli).as_bytes());
        return;
    };
    let mut b = *b"0000-00-00T00:00:00.000Z";
    let mut put = |at: usize, width: usize, mut v: u32| {
        for i in (at..at + width).rev() {
            b[i] = b'0' + (v % 10) as u8;
            v /= 10;
        }
    };
    put(0, 4, year);
    put(5, 2, u32::from(u8::from(t.month())));
    put(8, 2, u32::from(t.day()));
    put(11, 2, u32::from(t.hour()));
    put(14, 2, u32::from(t.minute()));
    put(17, 2, u32::from(t.second()));
    put(20, 3, milli as u32);
    out.extend_from_slice(&b);
}

/// The same text through `format!`'s zero padding: years before 0, and the
/// reference the digit-by-digit writer is tested against.
fn padded(t: OffsetDateTime, milli: i64) -> String {
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        milli
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_like_the_padded_format_across_the_range() {
        let padded = |ms: i64| {
            let t = OffsetDateTime::from_unix_timestamp(ms.div_euclid(1000)).expect("in range");
            padded(t, ms.rem_euclid(1000))
        };
        let mut ms = -62_200_000_000_000i64; // before year 1
        while ms < 253_402_300_799_999 {
            assert_eq!(format_rfc3339_millis(ms), padded(ms), "{ms}");
            ms += 7_777_777_777_777 / 997 * 13 + 1;
        }
        assert_eq!(format_rfc3339_millis(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(format_rfc3339_millis(-1), "1969-12-31T23:59:59.999Z");
        assert_eq!(format_rfc3339_millis(253_402_300_799_999), "9999-12-31T23:59:59.999Z");
        assert_eq!(format_rfc3339_millis(i64::MAX), format!("{}ms", i64::MAX));
    }

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
