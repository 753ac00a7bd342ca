//! The Confluent Schema Registry wire format, parsed and built in this one
//! place: magic byte 0, the writer schema id as 4 bytes big-endian, then the
//! Avro datum written with that schema.

use crate::error::DecodeError;

/// The magic byte that opens every wire-format message.
pub const MAGIC: u8 = 0;
/// Bytes before the datum.
pub const HEADER_LEN: usize = 5;

/// Splits a wire-format message into its writer schema id and its datum.
pub fn split(bytes: &[u8]) -> Result<(u32, &[u8]), DecodeError> {
    let Some((header, datum)) = bytes.split_first_chunk::<HEADER_LEN>() else {
        return Err(DecodeError::WireFormat(format!("{} bytes, need at least {HEADER_LEN}", bytes.len())));
    };
    if header[0] != MAGIC {
        return Err(DecodeError::WireFormat(format!("magic byte {} (expected {MAGIC})", header[0])));
    }
    Ok((u32::from_be_bytes([header[1], header[2], header[3], header[4]]), datum))
}

/// The schema id of a wire-format message, if its header is well formed.
pub fn schema_id(bytes: &[u8]) -> Option<u32> {
    split(bytes).ok().map(|(id, _)| id)
}

/// Appends the header for `schema_id` to `out`; the datum follows it.
pub fn write_header(schema_id: u32, out: &mut Vec<u8>) {
    out.push(MAGIC);
    out.extend_from_slice(&schema_id.to_be_bytes());
}

/// A whole message: header, then `datum`.
pub fn frame(schema_id: u32, datum: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + datum.len());
    write_header(schema_id, &mut out);
    out.extend_from_slice(datum);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_split_back_and_bad_headers_are_poison() {
        let m = frame(0x0102_0304, b"datum");
        assert_eq!(&m[..5], &[0, 1, 2, 3, 4]);
        assert_eq!(split(&m), Ok((0x0102_0304, &b"datum"[..])));
        assert_eq!(schema_id(&m), Some(0x0102_0304));
        assert_eq!(split(&frame(7, b"")), Ok((7, &b""[..])));
        assert!(matches!(split(&[0, 0, 0, 0]), Err(DecodeError::WireFormat(_))));
        assert!(matches!(split(&[1, 0, 0, 0, 1, 2]), Err(DecodeError::WireFormat(_))));
        assert_eq!(schema_id(&[1, 0, 0, 0, 1]), None);
    }
}
