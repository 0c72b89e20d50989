//! Errors of the protocol layer.
//!
//! Every decoding error is a protocol violation by the peer: the caller answers
//! with an ErrorResponse carrying [`WireError::sqlstate`] and closes.

/// A protocol or authentication error.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The message ended before a field did (a missing NUL, a short fixed field).
    #[error("truncated {0}")]
    Truncated(&'static str),
    /// A length field that is negative or smaller than its message allows.
    #[error("invalid length {len} for {what}")]
    BadLength { what: &'static str, len: i64 },
    /// A length beyond what the protocol phase allows; dropped before allocating.
    #[error("{what} length {len} exceeds the maximum of {max}")]
    TooLarge {
        what: &'static str,
        len: u64,
        max: u64,
    },
    /// The startup packet asked for a protocol whose major version is not 3.
    #[error("unsupported frontend protocol {major}.{minor}: server supports 3.0 to 3.0")]
    UnsupportedProtocol { major: u16, minor: u16 },
    /// Text that must be UTF-8 is not.
    #[error("invalid UTF-8 in {0}")]
    Utf8(&'static str),
    /// A required field or parameter is absent.
    #[error("missing {0}")]
    MissingField(&'static str),
    /// Any other protocol violation.
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// A malformed or unexpected SCRAM message.
    #[error("malformed SCRAM message: {0}")]
    Scram(&'static str),
    /// Wrong password or SCRAM proof.
    #[error("password authentication failed")]
    AuthFailed,
    /// A stored password secret (SCRAM or md5) that cannot be parsed.
    #[error("invalid password secret: {0}")]
    InvalidSecret(&'static str),
}

impl WireError {
    /// The SQLSTATE to report to the peer: `28P01` (invalid_password) for
    /// [`WireError::AuthFailed`], `0A000` (feature_not_supported, as PostgreSQL
    /// does) for [`WireError::UnsupportedProtocol`], `08P01`
    /// (protocol_violation) for everything else.
    pub fn sqlstate(&self) -> &'static str {
        match self {
            WireError::AuthFailed => "28P01",
            WireError::UnsupportedProtocol { .. } => "0A000",
            _ => "08P01",
        }
    }
}

/// Result of the protocol layer.
pub type Result<T> = std::result::Result<T, WireError>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlstates() {
        assert_eq!(WireError::AuthFailed.sqlstate(), "28P01");
        assert_eq!(WireError::Truncated("x").sqlstate(), "08P01");
        assert_eq!(WireError::Scram("x").sqlstate(), "08P01");
        assert_eq!(
            WireError::UnsupportedProtocol { major: 2, minor: 0 }.sqlstate(),
            "0A000"
        );
        assert_eq!(
            WireError::TooLarge {
                what: "startup packet",
                len: 1 << 30,
                max: 10_000
            }
            .to_string(),
            "startup packet length 1073741824 exceeds the maximum of 10000"
        );
    }
}
