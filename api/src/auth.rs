//! Who is calling: a shopper's session (bearer token) or the operator.

use std::future::{ready, Ready};

use futures::future::LocalBoxFuture;

use actix_web::dev::Payload;
use actix_web::{web, FromRequest, HttpRequest};
use domain::SessionId;
use sha2::{Digest, Sha256};

use crate::problem::ApiError;
use crate::AppState;

/// A request authenticated by a session's bearer token.
#[derive(Debug)]
pub struct Shopper {
    /// The session the token opened.
    pub session: SessionId,
}

/// A request carrying the operator token.
#[derive(Debug)]
pub struct Operator;

/// The SHA-256 of a bearer token, hex: what the replicated state keeps.
pub fn token_hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// The token of an `Authorization: Bearer <token>` header. The scheme is
/// matched in any case (`bearer`, `BEARER`): RFC 9110 §11.1 makes auth
/// schemes case-insensitive, and clients differ.
fn bearer(req: &HttpRequest) -> Result<&str, ApiError> {
    let value = req
        .headers()
        .get(actix_web::http::header::AUTHORIZATION)
        .ok_or(ApiError::Unauthorized("missing Authorization: Bearer token"))?;
    value
        .to_str()
        .ok()
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("Bearer"))
        .map(|(_, token)| token.trim())
        .filter(|token| !token.is_empty())
        .ok_or(ApiError::Unauthorized("Authorization must be 'Bearer <token>'"))
}

fn state(req: &HttpRequest) -> &AppState {
    req.app_data::<web::Data<AppState>>().expect("AppState is registered")
}

impl FromRequest for Shopper {
    type Error = ApiError;
    type Future = LocalBoxFuture<'static, Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        let hash = bearer(req).map(token_hash);
        let node = state(req).node.clone();
        Box::pin(async move {
            let hash = hash?;
            let lookup = |s: &domain::GroupState| s.session_by_token(&hash).map(|(session, _)| session);
            // Local first: the common case, and free. A replica that has not
            // yet applied a just-opened session confirms with a linearizable
            // read before it refuses the token.
            let session = match node.read_local(lookup) {
                Some(session) => Some(session),
                None => node.read(lookup).await?,
            };
            session.map(|session| Shopper { session }).ok_or(ApiError::Unauthorized("unknown session token"))
        })
    }
}

impl FromRequest for Operator {
    type Error = ApiError;
    type Future = Ready<Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        ready(bearer(req).and_then(|token| {
            if constant_time_eq(token.as_bytes(), state(req).operator_token.as_bytes()) {
                Ok(Operator)
            } else {
                Err(ApiError::Unauthorized("not the operator token"))
            }
        }))
    }
}

/// Compares without stopping at the first difference, so the time taken says
/// nothing about how much of a guessed token was right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
