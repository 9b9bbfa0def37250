//! Sizes and durations as the CLI and the environment give them (`500MB`, `7d`).
use std::time::Duration;

/// A size that cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SizeError {
    #[error("{input:?} is not a size (e.g. 500MB, 2GiB, 1024)")]
    NotANumber { input: String },
    #[error("{input:?}: unknown size unit {unit:?} (use B, KB, MB, GB, KiB, MiB, GiB)")]
    UnknownUnit { input: String, unit: String },
}

/// A duration that cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    #[error("{input:?} is not a duration (e.g. 30m, 24h, 7d)")]
    NotANumber { input: String },
    #[error("{input:?}: unknown duration unit {unit:?} (use s, m, h, d, w)")]
    UnknownUnit { input: String, unit: String },
}

/// Parses a size: `500MB`, `2GiB`, `1.5G`, `1024` (bytes). Decimal and binary units.
pub fn parse_size(s: &str) -> Result<u64, SizeError> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.parse().map_err(|_| SizeError::NotANumber {
        input: s.to_string(),
    })?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "m" | "mb" => 1e6,
        "g" | "gb" => 1e9,
        "t" | "tb" => 1e12,
        "ki" | "kib" => 1024.0,
        "mi" | "mib" => 1024.0 * 1024.0,
        "gi" | "gib" => 1024.0 * 1024.0 * 1024.0,
        "ti" | "tib" => 1024f64.powi(4),
        other => {
            return Err(SizeError::UnknownUnit {
                input: s.to_string(),
                unit: other.to_string(),
            })
        }
    };
    Ok((n * mult).round() as u64)
}

/// Parses a duration: `30s`, `15m`, `24h`, `7d`, or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, DurationError> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| DurationError::NotANumber {
        input: s.to_string(),
    })?;
    let secs = match unit {
        "" | "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86400,
        "w" => n * 7 * 86400,
        other => {
            return Err(DurationError::UnknownUnit {
                input: s.to_string(),
                unit: other.to_string(),
            })
        }
    };
    Ok(Duration::from_secs(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_durations() {
        assert_eq!(parse_size("1024").unwrap(), 1024);
        assert_eq!(parse_size("2MiB").unwrap(), 2 << 20);
        assert_eq!(parse_size("1.5GB").unwrap(), 1_500_000_000);
        assert!(parse_size("lots").is_err());
        assert_eq!(
            parse_duration("7d").unwrap(),
            Duration::from_secs(7 * 86400)
        );
        assert_eq!(parse_duration("90").unwrap(), Duration::from_secs(90));
        assert!(parse_duration("1y").is_err());
    }
}
