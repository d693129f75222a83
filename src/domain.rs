//! Validated request values. Everything a caller sends is parsed here, before
//! any upstream call, so the rest of the service only sees well-formed input.

use std::{fmt, sync::LazyLock};

use regex::Regex;

use crate::proto::GlobalSignOutRequest;

mod verify;
mod watch;
pub use verify::{BearerToken, ClientId, ExpectedUse, MAX_TOKEN_BYTES, VerifyCommand};
pub use watch::WatchCommand;

/// Cognito's documented pattern for a user pool id. `\w` is spelled out in
/// ASCII because AWS means the Java (ASCII) class, while Rust's is Unicode.
static USER_POOL_ID: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"^[A-Za-z0-9_-]+_[0-9a-zA-Z]+$").expect("user pool id pattern compiles")
});

/// Cognito's documented pattern for a username: letters, marks, symbols,
/// numbers and punctuation; so no whitespace, separators or control characters.
static USERNAME: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"^[\p{L}\p{M}\p{S}\p{N}\p{P}]+$").expect("username pattern compiles")
});

const USER_POOL_ID_MAX_CHARS: usize = 55;
const USERNAME_MAX_CHARS: usize = 128;

/// A request field that failed validation. The description is safe to return
/// to the caller: it never repeats the value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {field}: {description}")]
pub struct InvalidField {
    /// The proto field name, as the caller knows it.
    pub field: &'static str,
    /// What is wrong with it.
    pub description: &'static str,
}

/// Cognito's documented constraints on one string field: a length in
/// characters (not bytes) and a pattern.
struct FieldRule {
    field: &'static str,
    max_chars: usize,
    pattern: &'static Regex,
    length_rule: &'static str,
    pattern_rule: &'static str,
}

impl FieldRule {
    fn check(&self, value: String) -> Result<String, InvalidField> {
        let violation = |description| InvalidField {
            field: self.field,
            description,
        };
        if value.is_empty() || value.chars().count() > self.max_chars {
            return Err(violation(self.length_rule));
        }
        if !self.pattern.is_match(&value) {
            return Err(violation(self.pattern_rule));
        }
        Ok(value)
    }
}

/// A Cognito user pool id such as `us-east-1_AbCdEf123`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct UserPoolId(String);

impl UserPoolId {
    /// Accepts 1 to 55 characters matching `[\w-]+_[0-9a-zA-Z]+`.
    pub fn parse(value: impl Into<String>) -> Result<Self, InvalidField> {
        let rule = FieldRule {
            field: "user_pool_id",
            max_chars: USER_POOL_ID_MAX_CHARS,
            pattern: &USER_POOL_ID,
            length_rule: "must be 1 to 55 characters long",
            pattern_rule: "must look like <region>_<id>: letters, digits, '-' and '_' only",
        };
        rule.check(value.into()).map(Self)
    }

    /// The region the pool lives in, when the part before its id has an
    /// AWS region's shape (`us-east-1`, `us-gov-west-1`): its tokens' issuer
    /// and its keys are in that region, whatever the service's own. Checked
    /// because it becomes a host name (`cognito-idp.{region}.amazonaws.com`).
    pub fn aws_region(&self) -> Option<&str> {
        // The id after the last '_' has no '_' of its own (see `parse`).
        let (region, _) = self.0.rsplit_once('_')?;
        let parts: Vec<&str> = region.split('-').collect();
        let lower = |p: &&str| !p.is_empty() && p.bytes().all(|b| b.is_ascii_lowercase());
        let shaped = (3..=4).contains(&parts.len())
            && parts[0].len() == 2
            && parts[..parts.len() - 1].iter().all(lower)
            && parts[parts.len() - 1].bytes().all(|b| b.is_ascii_digit())
            && !parts[parts.len() - 1].is_empty();
        shaped.then_some(region)
    }

    /// The id as Cognito expects it.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for UserPoolId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for UserPoolId {
    type Err = InvalidField;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// A username, alias (email, phone) or `sub`. Personal data: `Debug` does not
/// print it, so it cannot leak into logs by accident.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Username(String);

impl Username {
    /// Accepts 1 to 128 characters matching `[\p{L}\p{M}\p{S}\p{N}\p{P}]+`.
    pub fn parse(value: impl Into<String>) -> Result<Self, InvalidField> {
        let rule = FieldRule {
            field: "username",
            max_chars: USERNAME_MAX_CHARS,
            pattern: &USERNAME,
            length_rule: "must be 1 to 128 characters long",
            pattern_rule: "must not contain whitespace, separators or control characters",
        };
        rule.check(value.into()).map(Self)
    }

    /// The raw value, for the Cognito request only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Username {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Username(<redacted>)")
    }
}

/// A validated GlobalSignOut request. The pool is still optional here: the
/// server's [`crate::pools::PoolPolicy`] decides which pool an empty one means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignOutRequest {
    /// The pool the caller named, if any.
    pub user_pool_id: Option<UserPoolId>,
    /// The user to sign out.
    pub username: Username,
}

impl TryFrom<GlobalSignOutRequest> for SignOutRequest {
    type Error = InvalidField;

    fn try_from(request: GlobalSignOutRequest) -> Result<Self, Self::Error> {
        let user_pool_id = match request.user_pool_id.as_str() {
            "" => None,
            _ => Some(UserPoolId::parse(request.user_pool_id)?),
        };
        Ok(Self {
            user_pool_id,
            username: Username::parse(request.username)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn a_real_looking_pool_id_is_accepted() {
        let id = UserPoolId::parse("us-east-1_AbCdEf123").expect("valid");
        assert_eq!(id.as_str(), "us-east-1_AbCdEf123");
    }

    #[test]
    fn pool_ids_that_break_the_pattern_are_rejected() {
        for bad in [
            "",
            "us-east-1",
            "_abc",
            "us-east-1_",
            "us-east-1_ab-c",
            "us-east-1_ab c",
            "us east-1_abc",
            "us-east-1_é",
            "ü_abc",
            "us-east-1_abc\n",
        ] {
            assert!(UserPoolId::parse(bad).is_err(), "{bad:?} was accepted");
        }
        let too_long = format!("us-east-1_{}", "a".repeat(46));
        assert_eq!(too_long.len(), 56);
        assert!(UserPoolId::parse(too_long).is_err());
    }

    #[test]
    fn usernames_may_be_emails_subs_and_non_latin_names() {
        for good in [
            "alice",
            "alice@example.com",
            "+14155550100",
            "8f3b1c2e-6a7d-4e5f-9a0b-1c2d3e4f5a6b",
            "Zoë_Ñúñez",
            "用户名",
            "😀",
        ] {
            assert!(Username::parse(good).is_ok(), "{good:?} was rejected");
        }
    }

    #[test]
    fn usernames_with_whitespace_or_control_characters_are_rejected() {
        for bad in [
            "",
            "alice smith",
            " alice",
            "alice\t",
            "al\u{0}ice",
            "bob\u{2028}",
        ] {
            let err = Username::parse(bad).expect_err(bad);
            assert_eq!(err.field, "username");
        }
    }

    #[test]
    fn username_length_counts_characters_not_bytes() {
        assert!(Username::parse("é".repeat(128)).is_ok());
        assert!(Username::parse("é".repeat(129)).is_err());
    }

    #[test]
    fn username_debug_output_never_shows_the_value() {
        let username = Username::parse("alice@example.com").expect("valid");
        let debug = format!(
            "{:?}",
            SignOutRequest {
                user_pool_id: None,
                username
            }
        );
        assert!(!debug.contains("alice"), "{debug}");
    }

    #[test]
    fn an_empty_pool_in_the_request_means_the_default() {
        let parsed = SignOutRequest::try_from(GlobalSignOutRequest {
            user_pool_id: String::new(),
            username: "alice".into(),
        })
        .expect("valid");
        assert_eq!(parsed.user_pool_id, None);
    }

    #[test]
    fn the_first_invalid_field_is_named() {
        let err = SignOutRequest::try_from(GlobalSignOutRequest {
            user_pool_id: "nope".into(),
            username: String::new(),
        })
        .expect_err("invalid");
        assert_eq!(err.field, "user_pool_id");
    }

    // Generators that share nothing with the parser's patterns: valid pool
    // ids from a region-like shape; valid usernames from hand-picked Unicode
    // blocks whose every character is a letter, mark, number, punctuation
    // or symbol (checked against the Unicode charts, not against a regex);
    // invalid characters from std's `is_whitespace` / `is_control` and a
    // list of format, private-use, unassigned and separator characters.
    fn pool_id_strategy() -> impl Strategy<Value = String> {
        ("[a-z]{2}-[a-z]{4,9}-[1-9]", "[0-9a-zA-Z]{1,40}")
            .prop_filter("fits 55", |(r, s)| r.len() + 1 + s.len() <= 55)
            .prop_map(|(region, suffix)| format!("{region}_{suffix}"))
    }

    fn visible_char() -> impl Strategy<Value = char> {
        prop_oneof![
            prop::char::range('!', '~'),                 // ASCII graphic: L, N, P, S
            prop::char::range('\u{00C0}', '\u{00FF}'),   // Latin-1 letters (and × ÷, Sm)
            prop::char::range('\u{0410}', '\u{044F}'),   // Cyrillic А..я
            prop::char::range('\u{0300}', '\u{036F}'),   // combining diacritical marks (Mn)
            prop::char::range('\u{4E00}', '\u{9FFF}'),   // CJK unified ideographs
            prop::char::range('\u{FF10}', '\u{FF19}'),   // fullwidth digits (Nd)
            prop::char::range('\u{1F600}', '\u{1F64F}'), // emoticons (So)
        ]
    }

    /// Outside the documented classes, yet neither whitespace nor control
    /// for std: format (Cf), private use (Co), unassigned (Cn), surrogates
    /// cannot be chars, and the line and paragraph separators (Zl, Zp) with
    /// a no-break space (Zs).
    fn invisible_char() -> impl Strategy<Value = char> {
        prop::sample::select(vec![
            '\u{00AD}', '\u{200B}', '\u{200D}', '\u{FEFF}', '\u{E000}', '\u{F8FF}', '\u{0378}',
            '\u{2028}', '\u{2029}', '\u{00A0}',
        ])
    }

    proptest! {
        #[test]
        fn generated_pool_ids_are_accepted(id in pool_id_strategy()) {
            prop_assert!(UserPoolId::parse(id).is_ok());
        }

        #[test]
        fn visible_usernames_up_to_128_chars_are_accepted(
            name in proptest::collection::vec(visible_char(), 1..=128)
        ) {
            let name: String = name.into_iter().collect();
            prop_assert!(Username::parse(name).is_ok());
        }

        #[test]
        fn usernames_over_128_chars_are_rejected(
            name in proptest::collection::vec(visible_char(), 129..300)
        ) {
            let name: String = name.into_iter().collect();
            prop_assert!(Username::parse(name).is_err());
        }

        #[test]
        fn a_whitespace_or_control_char_anywhere_rejects_a_username(
            name in proptest::collection::vec(visible_char(), 1..100),
            bad in any::<char>().prop_filter("ws or control", |c| c.is_whitespace() || c.is_control()),
            at in any::<prop::sample::Index>(),
        ) {
            let mut name = name;
            name.insert(at.index(name.len() + 1), bad);
            let name: String = name.into_iter().collect();
            prop_assert!(Username::parse(name).is_err());
        }

        #[test]
        fn a_format_private_or_unassigned_char_anywhere_rejects_a_username(
            name in proptest::collection::vec(visible_char(), 1..100),
            bad in invisible_char(),
            at in any::<prop::sample::Index>(),
        ) {
            let mut name = name;
            name.insert(at.index(name.len() + 1), bad);
            let name: String = name.into_iter().collect();
            prop_assert!(Username::parse(name).is_err());
        }

        #[test]
        fn a_non_ascii_or_space_char_anywhere_rejects_a_pool_id(
            id in pool_id_strategy(),
            bad in any::<char>().prop_filter("not allowed", |c| !(c.is_ascii_alphanumeric() || *c == '_' || *c == '-')),
            at in any::<prop::sample::Index>(),
        ) {
            let mut chars: Vec<char> = id.chars().collect();
            chars.insert(at.index(chars.len() + 1), bad);
            let id: String = chars.into_iter().collect();
            prop_assert!(UserPoolId::parse(id).is_err());
        }
    }
}

/// Hostile input: arbitrary bytes through the same decode and validation the
/// server runs, thousands of cases per CI run (`FUZZ_CASES=1000000` for a
/// longer run). Nothing may panic; whatever validates must be usable.
#[cfg(test)]
mod hostile_input {
    use proptest::prelude::*;
    use prost::Message;

    use super::*;
    use crate::pools::PoolPolicy;

    fn config() -> ProptestConfig {
        let cases = std::env::var("FUZZ_CASES")
            .ok()
            .and_then(|n| n.parse().ok())
            .unwrap_or(4096);
        ProptestConfig::with_cases(cases)
    }

    fn decode_and_validate(bytes: &[u8]) {
        let Ok(message) = GlobalSignOutRequest::decode(bytes) else {
            return;
        };
        let Ok(request) = SignOutRequest::try_from(message) else {
            return;
        };
        assert!(!request.username.expose().is_empty());
        let default = UserPoolId::parse("us-east-1_Default").expect("valid");
        let pools = PoolPolicy::new(Some(default), vec![]).expect("policy");
        let pool = pools.resolve(request.user_pool_id).expect("allowed");
        assert!(pool.as_str().contains('_'));
    }

    proptest! {
        #![proptest_config(config())]

        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            decode_and_validate(&bytes);
        }

        #[test]
        fn well_formed_messages_with_hostile_strings_never_panic(
            pool in ".{0,80}",
            username in ".{0,200}",
            unknown_field in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            let mut bytes = GlobalSignOutRequest { user_pool_id: pool, username }.encode_to_vec();
            // An unknown field (number 15, length-delimited) must be skipped.
            bytes.push(0x7a);
            prost::encoding::encode_varint(unknown_field.len() as u64, &mut bytes);
            bytes.extend_from_slice(&unknown_field);
            decode_and_validate(&bytes);
        }
    }
}
