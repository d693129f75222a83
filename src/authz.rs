//! The authorization policy (`--authz-policy`): which verified callers may
//! use which RPCs on which pools. Default-deny once configured; reloaded
//! when the file changes, keeping the old policy if the new one is invalid.
//!
//! ```yaml
//! rules:
//!   - caller: spiffe://prod.example/ns/billing/sa/api   # exact
//!     pools: [eu-west-1_AbCdEf123]                       # rpcs: GlobalSignOut
//!   - caller: spiffe://prod.example/ns/support/*        # prefix
//!     pools: ["*"]                                       # every allowed pool
//!     rpcs: [GlobalSignOut, VerifyToken]
//! ```
//!
//! A rule without `rpcs` grants GlobalSignOut only, what every rule meant
//! before VerifyToken existed: older files keep their exact meaning.

use std::path::Path;

use arc_swap::ArcSwap;
use serde::Deserialize;

use crate::{
    domain::{InvalidField, UserPoolId},
    identity::CallerId,
};

/// A rule's `caller`: the identity, or a prefix when it ends in `*`.
#[derive(Debug, Clone, PartialEq, Eq)]
enum CallerPattern {
    Exact(String),
    Prefix(String),
}

/// A rule's `pools`: listed ids, or `*` for every pool the service allows.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Pools {
    Any,
    Listed(Vec<UserPoolId>),
}

/// The RPCs a rule can grant, by their proto names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum Rpc {
    /// `GlobalSignOut`.
    GlobalSignOut,
    /// `VerifyToken`.
    VerifyToken,
    /// `WatchRevocations` (the revocation stream), named now so that
    /// policies can be written before it ships.
    WatchRevocations,
}

#[derive(Debug, Clone)]
struct Rule {
    caller: CallerPattern,
    pools: Pools,
    rpcs: Vec<Rpc>,
}

/// A parsed, validated policy.
#[derive(Debug, Clone)]
pub struct Policy {
    rules: Vec<Rule>,
}

/// Why the policy refused a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    /// No rule names this caller (or the caller is not verified).
    #[error("the caller is not allowed by the authorization policy")]
    CallerNotAllowed,
    /// Rules name the caller, but none of them this pool.
    #[error("the caller may not act on this user pool")]
    PoolNotAllowedForCaller,
    /// Rules name the caller, but none grants it this RPC.
    #[error("the caller may not use this RPC")]
    RpcNotAllowedForCaller,
}

/// A policy file that cannot be used, with the place it went wrong.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// The file is not UTF-8.
    #[error("{0}")]
    NotUtf8(#[from] std::str::Utf8Error),
    /// The file is not valid TOML, or not a policy.
    #[error("{0}")]
    Toml(#[from] toml::de::Error),
    /// The file is not valid YAML, or not a policy.
    #[error("{0}")]
    Yaml(#[from] serde_yaml_ng::Error),
    /// The file name says no format.
    #[error("the file name must end in .toml, .yaml or .yml")]
    UnknownFormat,
    /// One rule is invalid.
    #[error("rules[{index}]: {source}")]
    Rule {
        /// Its place in `rules`, from 0.
        index: usize,
        /// What is wrong with it.
        source: RuleError,
    },
}

/// What is wrong with one rule.
#[derive(Debug, thiserror::Error)]
pub enum RuleError {
    /// `caller: ""`.
    #[error("caller: must not be empty")]
    EmptyCaller,
    /// A `*` other than the last character.
    #[error("caller: `*` is only allowed at the end (a prefix)")]
    MisplacedWildcard,
    /// `pools: []`.
    #[error("pools: list at least one pool id, or \"*\"")]
    NoPools,
    /// `rpcs: []`.
    #[error(
        "rpcs: list at least one of GlobalSignOut, VerifyToken, WatchRevocations, or leave it out"
    )]
    NoRpcs,
    /// A pool id that is not one.
    #[error("pools: {id:?}: {}", source.description)]
    Pool {
        /// The id as written.
        id: String,
        /// Why it is not a pool id.
        source: InvalidField,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    rules: Vec<RuleFile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleFile {
    caller: String,
    pools: Vec<String>,
    rpcs: Option<Vec<Rpc>>,
}

impl Policy {
    /// Parses a policy file's contents; `path` decides the format (`.toml`,
    /// `.yaml`, `.yml`).
    pub fn parse(path: &Path, contents: &[u8]) -> Result<Self, PolicyError> {
        let text = std::str::from_utf8(contents)?;
        let extension = path.extension().and_then(|e| e.to_str()).unwrap_or("");
        let file: PolicyFile = match extension {
            "toml" => toml::from_str(text)?,
            "yaml" | "yml" => serde_yaml_ng::from_str(text)?,
            _ => return Err(PolicyError::UnknownFormat),
        };
        let rules = file
            .rules
            .into_iter()
            .enumerate()
            .map(|(index, rule)| {
                Rule::parse(rule).map_err(|source| PolicyError::Rule { index, source })
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { rules })
    }

    /// Number of rules, for the startup log.
    pub fn len(&self) -> usize {
        self.rules.len()
    }

    /// True when the policy has no rules (and so denies every call).
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Whether any rule names `caller` (verified, or `None`).
    pub fn knows(&self, caller: Option<&CallerId>) -> Result<(), Denied> {
        let caller = caller.ok_or(Denied::CallerNotAllowed)?;
        if self
            .rules
            .iter()
            .any(|rule| rule.caller.matches(caller.as_str()))
        {
            Ok(())
        } else {
            Err(Denied::CallerNotAllowed)
        }
    }

    /// Whether `caller` (verified, or `None`) may use `rpc` on `pool`. A
    /// caller may use every pool of every rule that matches it and grants
    /// the RPC.
    pub fn authorize(
        &self,
        caller: Option<&CallerId>,
        rpc: Rpc,
        pool: &UserPoolId,
    ) -> Result<(), Denied> {
        self.knows(caller)?;
        let granting: Vec<&Rule> = caller.map_or_else(Vec::new, |caller| {
            self.rules
                .iter()
                .filter(|rule| rule.caller.matches(caller.as_str()) && rule.rpcs.contains(&rpc))
                .collect()
        });
        if granting.is_empty() {
            return Err(Denied::RpcNotAllowedForCaller);
        }
        if granting.iter().any(|rule| rule.pools.contains(pool)) {
            Ok(())
        } else {
            Err(Denied::PoolNotAllowedForCaller)
        }
    }
}

impl Rule {
    fn parse(rule: RuleFile) -> Result<Self, RuleError> {
        let caller = match rule.caller.strip_suffix('*') {
            _ if rule.caller.is_empty() => return Err(RuleError::EmptyCaller),
            Some(prefix) if !prefix.contains('*') => CallerPattern::Prefix(prefix.to_owned()),
            None if !rule.caller.contains('*') => CallerPattern::Exact(rule.caller),
            _ => return Err(RuleError::MisplacedWildcard),
        };
        if rule.pools.is_empty() {
            return Err(RuleError::NoPools);
        }
        let pools = if rule.pools == ["*"] {
            Pools::Any
        } else {
            let pools = rule.pools.iter().map(|id| {
                UserPoolId::parse(id).map_err(|source| RuleError::Pool {
                    id: id.clone(),
                    source,
                })
            });
            Pools::Listed(pools.collect::<Result<_, _>>()?)
        };
        let rpcs = match rule.rpcs {
            None => vec![Rpc::GlobalSignOut],
            Some(rpcs) if rpcs.is_empty() => return Err(RuleError::NoRpcs),
            Some(rpcs) => rpcs,
        };
        Ok(Self {
            caller,
            pools,
            rpcs,
        })
    }
}

impl CallerPattern {
    fn matches(&self, caller: &str) -> bool {
        match self {
            Self::Exact(id) => id == caller,
            Self::Prefix(prefix) => caller.starts_with(prefix.as_str()),
        }
    }
}

impl Pools {
    fn contains(&self, pool: &UserPoolId) -> bool {
        match self {
            Self::Any => true,
            Self::Listed(pools) => pools.contains(pool),
        }
    }
}

/// The policy in force; swapped by the reloader.
pub type CurrentPolicy = ArcSwap<Policy>;

#[cfg(test)]
mod tests {
    use super::*;

    const YAML: &str = r#"
rules:
  - caller: spiffe://prod/ns/billing/sa/api
    pools: [eu-west-1_Billing1]
  - caller: spiffe://prod/ns/support/*
    pools: ["*"]
  - caller: spiffe://prod/ns/billing/*
    pools: [eu-west-1_Shared1]
"#;

    fn pool(id: &str) -> UserPoolId {
        UserPoolId::parse(id).expect("pool")
    }

    fn caller(id: &str) -> CallerId {
        CallerId::verified(id.into()).expect("caller")
    }

    fn yaml(text: &str) -> Result<Policy, PolicyError> {
        Policy::parse(Path::new("policy.yaml"), text.as_bytes())
    }

    #[test]
    fn exact_and_prefix_rules_grant_the_union_of_their_pools() {
        let policy = yaml(YAML).expect("valid");
        let billing = caller("spiffe://prod/ns/billing/sa/api");
        assert_eq!(
            policy.authorize(
                Some(&billing),
                Rpc::GlobalSignOut,
                &pool("eu-west-1_Billing1")
            ),
            Ok(())
        );
        assert_eq!(
            policy.authorize(
                Some(&billing),
                Rpc::GlobalSignOut,
                &pool("eu-west-1_Shared1")
            ),
            Ok(())
        );
        assert_eq!(
            policy.authorize(
                Some(&billing),
                Rpc::GlobalSignOut,
                &pool("eu-west-1_Other1")
            ),
            Err(Denied::PoolNotAllowedForCaller)
        );
        let support = caller("spiffe://prod/ns/support/sa/desk");
        assert_eq!(
            policy.authorize(
                Some(&support),
                Rpc::GlobalSignOut,
                &pool("eu-west-1_Other1")
            ),
            Ok(())
        );
    }

    #[test]
    fn unknown_and_unverified_callers_are_denied() {
        let policy = yaml(YAML).expect("valid");
        let stranger = caller("spiffe://prod/ns/billing-evil/sa/x");
        assert_eq!(
            policy.authorize(
                Some(&stranger),
                Rpc::GlobalSignOut,
                &pool("eu-west-1_Shared1")
            ),
            Err(Denied::CallerNotAllowed),
            "a prefix ending in / does not match a sibling namespace"
        );
        assert_eq!(
            policy.authorize(None, Rpc::GlobalSignOut, &pool("eu-west-1_Billing1")),
            Err(Denied::CallerNotAllowed)
        );
    }

    #[test]
    fn rules_grant_only_the_rpcs_they_name_and_globalsignout_when_silent() {
        let policy = yaml(
            r#"
rules:
  - caller: spiffe://prod/ns/billing/sa/api
    pools: [eu-west-1_Billing1]
  - caller: spiffe://prod/ns/gateway/*
    pools: ["*"]
    rpcs: [VerifyToken]
"#,
        )
        .expect("valid");
        let billing = caller("spiffe://prod/ns/billing/sa/api");
        let gateway = caller("spiffe://prod/ns/gateway/sa/edge");
        let billing_pool = pool("eu-west-1_Billing1");
        assert_eq!(
            policy.authorize(Some(&billing), Rpc::GlobalSignOut, &billing_pool),
            Ok(())
        );
        assert_eq!(
            policy.authorize(Some(&billing), Rpc::VerifyToken, &billing_pool),
            Err(Denied::RpcNotAllowedForCaller),
            "a rule without rpcs means what it meant before VerifyToken"
        );
        assert_eq!(
            policy.authorize(Some(&gateway), Rpc::VerifyToken, &billing_pool),
            Ok(())
        );
        assert_eq!(
            policy.authorize(Some(&gateway), Rpc::GlobalSignOut, &billing_pool),
            Err(Denied::RpcNotAllowedForCaller)
        );
        assert!(
            yaml("rules:\n  - caller: a\n    pools: [\"*\"]\n    rpcs: []\n")
                .expect_err("empty rpcs")
                .to_string()
                .contains("rules[0]: rpcs")
        );
        assert!(yaml("rules:\n  - caller: a\n    pools: [\"*\"]\n    rpcs: [Nope]\n").is_err());
    }

    #[test]
    fn the_rpc_and_the_pool_must_be_granted_by_the_same_rule() {
        let policy = yaml(
            r#"
rules:
  - caller: spiffe://prod/ns/billing/sa/api
    pools: [eu-west-1_SignOut1]
  - caller: spiffe://prod/ns/billing/sa/api
    pools: [eu-west-1_Verify1]
    rpcs: [VerifyToken]
"#,
        )
        .expect("valid");
        let billing = caller("spiffe://prod/ns/billing/sa/api");
        let (sign_out_pool, verify_pool) = (pool("eu-west-1_SignOut1"), pool("eu-west-1_Verify1"));
        let allowed = |rpc, pool| policy.authorize(Some(&billing), rpc, pool);

        assert_eq!(allowed(Rpc::GlobalSignOut, &sign_out_pool), Ok(()));
        assert_eq!(allowed(Rpc::VerifyToken, &verify_pool), Ok(()));
        assert_eq!(
            allowed(Rpc::VerifyToken, &sign_out_pool),
            Err(Denied::PoolNotAllowedForCaller),
            "VerifyToken from one rule, the pool from the other"
        );
        assert_eq!(
            allowed(Rpc::GlobalSignOut, &verify_pool),
            Err(Denied::PoolNotAllowedForCaller)
        );
    }

    #[test]
    fn toml_is_the_same_policy() {
        let toml = r#"
[[rules]]
caller = "spiffe://prod/ns/billing/sa/api"
pools = ["eu-west-1_Billing1"]
"#;
        let policy = Policy::parse(Path::new("p.toml"), toml.as_bytes()).expect("valid");
        let billing = caller("spiffe://prod/ns/billing/sa/api");
        assert_eq!(
            policy.authorize(
                Some(&billing),
                Rpc::GlobalSignOut,
                &pool("eu-west-1_Billing1")
            ),
            Ok(())
        );
    }

    #[test]
    fn invalid_policies_say_where() {
        for (text, expected) in [
            ("rules:\n  - caller: a\n    pools: [x]\n", "rules[0]: pools"),
            (
                "rules:\n  - caller: a*b\n    pools: [\"*\"]\n",
                "rules[0]: caller",
            ),
            (
                "rules:\n  - caller: ''\n    pools: [\"*\"]\n",
                "rules[0]: caller",
            ),
            ("rules:\n  - caller: a\n    pools: []\n", "rules[0]: pools"),
            (
                "rules:\n  - caller: a\n    pool: [\"*\"]\n",
                "unknown field",
            ),
            ("rule: []\n", "unknown field"),
            ("rules: [", "did not find expected node content"),
        ] {
            let error = yaml(text).expect_err(text).to_string();
            assert!(error.contains(expected), "{text:?}: {error}");
        }
        assert!(Policy::parse(Path::new("policy.json"), b"{}").is_err());
    }

    proptest::proptest! {
        #[test]
        fn any_text_parses_or_is_refused_without_panicking(text in "(?s).{0,400}") {
            let _ = yaml(&text);
            let _ = Policy::parse(Path::new("p.toml"), text.as_bytes());
        }
    }
}
