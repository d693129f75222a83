//! The WatchRevocations request, parsed at the edge: up to 100 pools (none:
//! the default pool) and an optional cursor.

use super::{InvalidField, UserPoolId};
use crate::{proto::WatchRevocationsRequest, revocation::Cursor};

/// More pools than a deployment serves is a caller's bug.
const MAX_POOLS: usize = 100;

/// What a watcher asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchCommand {
    /// The pools; `None` is the server's default pool. Never empty.
    pub user_pool_ids: Vec<Option<UserPoolId>>,
    /// Where to resume.
    pub cursor: Option<Cursor>,
}

impl TryFrom<WatchRevocationsRequest> for WatchCommand {
    type Error = InvalidField;

    fn try_from(request: WatchRevocationsRequest) -> Result<Self, InvalidField> {
        if request.user_pool_ids.len() > MAX_POOLS {
            return Err(InvalidField {
                field: "user_pool_ids",
                description: "at most 100 pools",
            });
        }
        let mut user_pool_ids = request
            .user_pool_ids
            .into_iter()
            .map(|pool| {
                if pool.is_empty() {
                    return Ok(None);
                }
                UserPoolId::parse(pool).map(Some).map_err(|_| InvalidField {
                    field: "user_pool_ids",
                    description: "each must be 1 to 55 characters matching [\\w-]+_[0-9a-zA-Z]+",
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        if user_pool_ids.is_empty() {
            user_pool_ids.push(None);
        }
        let cursor = match request.cursor.as_str() {
            "" => None,
            text => Some(text.parse().map_err(|_| InvalidField {
                field: "cursor",
                description: "must be a cursor this service sent, or empty",
            })?),
        };
        Ok(Self {
            user_pool_ids,
            cursor,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(pools: &[&str], cursor: &str) -> WatchRevocationsRequest {
        WatchRevocationsRequest {
            user_pool_ids: pools.iter().map(|p| (*p).to_owned()).collect(),
            cursor: cursor.to_owned(),
        }
    }

    #[test]
    fn no_pools_is_the_default_pool_and_no_cursor_is_a_replay() {
        let command = WatchCommand::try_from(request(&[], "")).expect("as set up");
        assert_eq!(command.user_pool_ids, [None]);
        assert_eq!(command.cursor, None);
    }

    #[test]
    fn pools_and_cursors_are_checked() {
        let ok = WatchCommand::try_from(request(&["eu-west-1_abc", ""], "0123456789abcdef.17-0"))
            .expect("as set up");
        assert_eq!(ok.user_pool_ids.len(), 2);
        assert!(ok.cursor.is_some());
        let field =
            |r: WatchRevocationsRequest| WatchCommand::try_from(r).expect_err("refused").field;
        assert_eq!(field(request(&["no pool"], "")), "user_pool_ids");
        assert_eq!(field(request(&["eu-west-1_abc"], "made-up")), "cursor");
        let many: Vec<String> = (0..101).map(|i| format!("eu-west-1_p{i}")).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        assert_eq!(field(request(&many, "")), "user_pool_ids");
    }
}
