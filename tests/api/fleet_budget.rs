//! The fleet's budget in Redis, black-box: several service processes, one
//! real Redis, one fake Cognito.
