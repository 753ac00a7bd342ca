//! The two encodings segstream reads and writes: JSON and Avro.

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// How records are encoded: in a file (JSON lines, Avro container file) or
/// on a topic (one JSON object per message, Avro in the Schema Registry wire
/// format, see [`crate::wire`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    #[default]
    Json,
    Avro,
}

impl Format {
    /// `.avro` is Avro; anything else is JSON lines.
    pub fn from_path(path: &Path) -> Self {
        match path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase).as_deref() {
            Some("avro") => Self::Avro,
            _ => Self::Json,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Json => "json",
            Self::Avro => "avro",
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Format {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "json" => Ok(Self::Json),
            "avro" => Ok(Self::Avro),
            other => Err(format!("unknown format `{other}` (expected json or avro)")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_from_paths_and_names() {
        assert_eq!(Format::from_path(Path::new("a/b.AVRO")), Format::Avro);
        assert_eq!(Format::from_path(Path::new("a/b.jsonl")), Format::Json);
        assert_eq!(Format::from_path(Path::new("noext")), Format::Json);
        assert_eq!("Avro".parse::<Format>(), Ok(Format::Avro));
        assert!("xml".parse::<Format>().expect_err("not a format").contains("xml"));
        assert_eq!(Format::Json.to_string(), "json");
    }
}
