//! The admin API's bearer-token check, compared in constant time.

use subtle::ConstantTimeEq;
use tonic::service::Interceptor;
use tonic::{Request, Status};

/// Requires `authorization: Bearer <admin token>` on every call.
#[derive(Clone)]
pub struct AdminAuth {
    expected: Vec<u8>,
}

impl std::fmt::Debug for AdminAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminAuth(<token>)")
    }
}

impl AdminAuth {
    /// Checks calls against `token`.
    pub fn new(token: &str) -> Self {
        AdminAuth {
            expected: format!("Bearer {token}").into_bytes(),
        }
    }
}

impl Interceptor for AdminAuth {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        match request.metadata().get("authorization") {
            None => Err(Status::unauthenticated(
                "missing authorization: send `authorization: Bearer <admin token>`",
            )),
            Some(value) if bool::from(value.as_bytes().ct_eq(&self.expected)) => Ok(request),
            Some(_) => Err(Status::unauthenticated("invalid admin token")),
        }
    }
}
