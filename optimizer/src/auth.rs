//! Bearer tokens with roles. Tokens come from the config or the environment, are compared in
//! constant time, and are never logged; failures answer 401/403 without detail.

use axum::http::HeaderMap;
use serde::Deserialize;

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Decisions and reads.
    Reader,
    /// Everything, including changes.
    Admin,
}

/// A configured token.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    /// Who uses it: the actor in the audit log.
    pub name: String,
    /// Its role.
    pub role: Role,
    /// The token itself (prefer `token_env`).
    #[serde(default)]
    pub token: Option<String>,
    /// Name of an environment variable holding the token.
    #[serde(default)]
    pub token_env: Option<String>,
}

/// A resolved token.
#[derive(Clone)]
pub struct Token {
    /// Actor name.
    pub name: String,
    /// Role.
    pub role: Role,
    secret: Vec<u8>,
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Token")
            .field("name", &self.name)
            .field("role", &self.role)
            .field("secret", &"<redacted>")
            .finish()
    }
}

impl TokenConfig {
    /// Resolve the secret; an error names the token and the missing source.
    pub fn resolve(&self, i: usize) -> Result<Token, String> {
        let secret = match (&self.token, &self.token_env) {
            (Some(t), None) => t.clone(),
            (None, Some(var)) => std::env::var(var).map_err(|_| {
                format!(
                    "tokens[{i}] ({}): environment variable {var} is not set",
                    self.name
                )
            })?,
            _ => {
                return Err(format!(
                    "tokens[{i}] ({}): set exactly one of `token` and `token_env`",
                    self.name
                ));
            }
        };
        if secret.len() < 8 {
            return Err(format!(
                "tokens[{i}] ({}): a token must be at least 8 characters",
                self.name
            ));
        }
        Ok(Token {
            name: self.name.clone(),
            role: self.role,
            secret: secret.into_bytes(),
        })
    }
}

/// Equal in time independent of where the first difference is.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for i in 0..a.len().max(b.len()) {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0);
        diff |= usize::from(x ^ y);
    }
    diff == 0
}

/// Why a request was not allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denied {
    /// No valid token.
    Unauthenticated,
    /// A valid token without the role.
    Forbidden,
}

/// Who is calling.
#[derive(Debug, Clone)]
pub struct Caller {
    /// The actor name (the token's name, or `anonymous` when auth is off).
    pub name: String,
    /// Its role.
    pub role: Role,
}

/// Check the `Authorization: Bearer …` header against the tokens for `need`.
pub fn check(
    tokens: &[Token],
    open: bool,
    headers: &HeaderMap,
    need: Role,
) -> Result<Caller, Denied> {
    if open {
        return Ok(Caller {
            name: "anonymous".into(),
            role: Role::Admin,
        });
    }
    let presented = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim)
        .ok_or(Denied::Unauthenticated)?;
    // Compare against every token so the time does not tell which one matched.
    let mut found: Option<&Token> = None;
    for t in tokens {
        if constant_time_eq(t.secret.as_slice(), presented.as_bytes()) {
            found = Some(t);
        }
    }
    let t = found.ok_or(Denied::Unauthenticated)?;
    if t.role < need {
        return Err(Denied::Forbidden);
    }
    Ok(Caller {
        name: t.name.clone(),
        role: t.role,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens() -> Vec<Token> {
        [
            ("ops", Role::Admin, "admin-secret-1"),
            ("dash", Role::Reader, "reader-secret-1"),
        ]
        .iter()
        .enumerate()
        .map(|(i, (n, r, s))| {
            TokenConfig {
                name: n.to_string(),
                role: *r,
                token: Some(s.to_string()),
                token_env: None,
            }
            .resolve(i)
            .unwrap()
        })
        .collect()
    }

    fn bearer(t: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("authorization", format!("Bearer {t}").parse().unwrap());
        h
    }

    #[test]
    fn roles_are_enforced() {
        let t = tokens();
        assert_eq!(
            check(&t, false, &bearer("admin-secret-1"), Role::Admin)
                .unwrap()
                .name,
            "ops"
        );
        assert_eq!(
            check(&t, false, &bearer("reader-secret-1"), Role::Reader)
                .unwrap()
                .name,
            "dash"
        );
        assert_eq!(
            check(&t, false, &bearer("reader-secret-1"), Role::Admin).unwrap_err(),
            Denied::Forbidden
        );
        assert_eq!(
            check(&t, false, &bearer("nope-nope-nope"), Role::Reader).unwrap_err(),
            Denied::Unauthenticated
        );
        assert_eq!(
            check(&t, false, &HeaderMap::new(), Role::Reader).unwrap_err(),
            Denied::Unauthenticated
        );
    }

    #[test]
    fn comparison_is_exact() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
        assert!(!constant_time_eq(b"", b"a"));
    }

    #[test]
    fn secrets_are_not_printed() {
        let s = format!("{:?}", tokens());
        assert!(!s.contains("secret-1"), "{s}");
    }
}
