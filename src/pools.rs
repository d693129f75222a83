//! Which user pools this deployment may act on, and which one an empty
//! `user_pool_id` means.

use crate::{domain::UserPoolId, error::SignOutError};

/// The default pool and the optional allow list, fixed at start.
#[derive(Debug, Clone, Default)]
pub struct PoolPolicy {
    default: Option<UserPoolId>,
    allowed: Option<Vec<UserPoolId>>,
}

/// The default pool is outside the allow list: the server would refuse its
/// own default, so this is a configuration error caught at start.
#[derive(Debug, thiserror::Error)]
#[error("the default user pool {0} is not in the allowed user pool ids")]
pub struct DefaultPoolNotAllowed(UserPoolId);

impl PoolPolicy {
    /// An empty `allowed` list means every pool is allowed.
    pub fn new(
        default: Option<UserPoolId>,
        allowed: Vec<UserPoolId>,
    ) -> Result<Self, DefaultPoolNotAllowed> {
        let allowed = (!allowed.is_empty()).then_some(allowed);
        let policy = Self { default, allowed };
        if let Some(default) = &policy.default
            && !policy.allows(default)
        {
            return Err(DefaultPoolNotAllowed(default.clone()));
        }
        Ok(policy)
    }

    /// The pool a request acts on: its own or the default, if allowed.
    pub fn resolve(&self, requested: Option<UserPoolId>) -> Result<UserPoolId, SignOutError> {
        let pool = requested
            .or_else(|| self.default.clone())
            .ok_or(SignOutError::UserPoolRequired)?;
        if self.allows(&pool) {
            Ok(pool)
        } else {
            Err(SignOutError::UserPoolNotAllowed)
        }
    }

    fn allows(&self, pool: &UserPoolId) -> bool {
        self.allowed
            .as_ref()
            .is_none_or(|allowed| allowed.contains(pool))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(id: &str) -> UserPoolId {
        UserPoolId::parse(id).expect("valid pool id")
    }

    #[test]
    fn an_empty_request_pool_falls_back_to_the_default() {
        let policy = PoolPolicy::new(Some(pool("eu-west-1_A")), vec![]).expect("valid");
        assert_eq!(policy.resolve(None).expect("resolves"), pool("eu-west-1_A"));
    }

    #[test]
    fn no_pool_and_no_default_is_refused() {
        let policy = PoolPolicy::default();
        assert!(matches!(
            policy.resolve(None),
            Err(SignOutError::UserPoolRequired)
        ));
    }

    #[test]
    fn without_an_allow_list_any_pool_is_allowed() {
        let policy = PoolPolicy::default();
        assert!(policy.resolve(Some(pool("eu-west-1_Z"))).is_ok());
    }

    #[test]
    fn a_pool_outside_the_allow_list_is_refused() {
        let policy = PoolPolicy::new(None, vec![pool("eu-west-1_A")]).expect("valid");
        assert!(policy.resolve(Some(pool("eu-west-1_A"))).is_ok());
        assert!(matches!(
            policy.resolve(Some(pool("eu-west-1_B"))),
            Err(SignOutError::UserPoolNotAllowed)
        ));
    }

    #[test]
    fn a_default_outside_the_allow_list_is_a_configuration_error() {
        let result = PoolPolicy::new(Some(pool("eu-west-1_B")), vec![pool("eu-west-1_A")]);
        assert!(result.is_err());
    }
}
