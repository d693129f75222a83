//! The caller's id: from a verified certificate, or declared in a header.

use std::fmt;

use crate::domain::InvalidField;

/// Longest caller id accepted from the caller-id header.
const CALLER_ID_MAX_CHARS: usize = 128;

/// Longest identity accepted from a verified certificate (a SPIFFE id may be
/// 2048 bytes in theory; real ones are far shorter).
const VERIFIED_ID_MAX_BYTES: usize = 512;

/// Who is calling, from a trusted identity or the caller-id header.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CallerId(String);

impl CallerId {
    /// The id of callers that send none.
    pub fn anonymous() -> Self {
        Self("anonymous".into())
    }

    /// 1 to 128 characters of `A-Z a-z 0-9 . _ - : / @`: service names,
    /// SPIFFE ids, emails of service accounts.
    pub fn parse(value: &str) -> Result<Self, InvalidField> {
        let allowed = |c: char| c.is_ascii_alphanumeric() || "._-:/@".contains(c);
        if value.is_empty() || value.len() > CALLER_ID_MAX_CHARS || !value.chars().all(allowed) {
            return Err(Self::INVALID);
        }
        Ok(Self(value.to_owned()))
    }

    /// An identity from a verified certificate: any text without control
    /// characters, up to 512 bytes (a CN may hold spaces or non-ASCII).
    pub fn verified(value: String) -> Result<Self, InvalidField> {
        if value.is_empty()
            || value.len() > VERIFIED_ID_MAX_BYTES
            || value.chars().any(char::is_control)
        {
            return Err(Self::INVALID);
        }
        Ok(Self(value))
    }

    /// What a malformed caller id is told.
    pub const INVALID: InvalidField = InvalidField {
        field: "caller id header",
        description: "must be 1 to 128 characters of A-Z a-z 0-9 . _ - : / @",
    };

    /// The id, for logs and metric labels.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for CallerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spiffe_ids_and_service_names_are_valid_caller_ids() {
        for id in [
            "billing",
            "spiffe://prod.example/ns/pay/sa/api",
            "svc@corp.example",
            "a-b_c.d",
        ] {
            assert!(CallerId::parse(id).is_ok(), "{id}");
        }
        for id in ["", "has space", "ünï", "new\nline", &"x".repeat(129)] {
            assert!(CallerId::parse(id).is_err(), "{id:?}");
        }
    }
}
