//! The one authentication layer every RPC passes ([`Auth`], on the coordinator), and
//! the client side of it ([`Bearer`]). Open when no token is configured; with a token, a
//! request must carry `authorization: Bearer <token>` (compared in constant time).
use tonic::{Request, Status};

/// Adds `authorization: Bearer <token>` to every request when a token is set.
#[derive(Clone)]
pub struct Bearer(Option<String>);

impl Bearer {
    pub fn new(token: Option<String>) -> Self {
        Bearer(token)
    }
}

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(t) = &self.0 {
            let v = format!("Bearer {t}")
                .parse()
                .map_err(|_| Status::invalid_argument("token is not a valid header"))?;
            req.metadata_mut().insert("authorization", v);
        }
        Ok(req)
    }
}

#[derive(Clone, Default)]
pub struct Auth {
    token: Option<String>,
}

impl Auth {
    /// `None` accepts every request (the default until tokens are handed out).
    pub fn new(token: Option<String>) -> Self {
        Auth {
            token: token.filter(|t| !t.is_empty()),
        }
    }

    /// A tonic interceptor.
    pub fn check(&self, req: Request<()>) -> Result<Request<()>, Status> {
        let Some(token) = &self.token else {
            return Ok(req);
        };
        let given = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if constant_time_eq(given.as_bytes(), token.as_bytes()) {
            Ok(req)
        } else {
            Err(Status::unauthenticated(
                "missing or wrong token: pass the coordinator's token (DBUILD_TOKEN)",
            ))
        }
    }
}

/// Compares without an early exit, so timing says nothing about where a guess went wrong.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = (a.len() ^ b.len()) as u8;
    for (i, x) in b.iter().enumerate() {
        diff |= a.get(i).copied().unwrap_or(0) ^ x;
    }
    diff == 0 && a.len() == b.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_without_a_token_closed_with_one() {
        assert!(Auth::new(None).check(Request::new(())).is_ok());
        let auth = Auth::new(Some("s3cret".into()));
        assert!(auth.check(Request::new(())).is_err());
        let mut ok = Request::new(());
        ok.metadata_mut()
            .insert("authorization", "Bearer s3cret".parse().unwrap());
        assert!(auth.check(ok).is_ok());
        let mut bad = Request::new(());
        bad.metadata_mut()
            .insert("authorization", "Bearer s3cres".parse().unwrap());
        assert!(auth.check(bad).is_err());
        assert!(!constant_time_eq(b"abc", b"abcd"));
    }
}
