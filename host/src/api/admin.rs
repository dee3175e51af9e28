//! Who may manage. Every management handler takes an [`Admin`], the extractor that
//! checks the bearer token, so a new management route cannot forget the check; the
//! upload route, which shares its path with inference, runs the same check by hand.

use super::{ApiError, AppState};
use axum::http::HeaderMap;

/// Proof that the request may manage (see [`check_admin`]).
pub struct Admin {
    /// The caller proved it holds the token (see [`is_admin`]): answers may show full
    /// internal errors.
    pub full_errors: bool,
}

impl Admin {
    /// The same check as the extractor, for a handler that learns only from its path
    /// whether it manages.
    pub fn check(state: &AppState, headers: &HeaderMap) -> Result<Admin, ApiError> {
        check_admin(state, headers)?;
        Ok(Admin {
            full_errors: is_admin(state, headers),
        })
    }
}

impl axum::extract::FromRequestParts<AppState> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        Admin::check(state, &parts.headers)
    }
}

/// Whether this request may manage: always under `open`, with `Authorization: Bearer
/// <token>` under `token`, never under `off` (its routes are not even mounted).
fn check_admin(state: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    use crate::config::Management;
    let token = match (state.management, &state.admin_token) {
        (Management::Open, _) => return Ok(()),
        (Management::Off, _) | (Management::Token, None) => {
            return Err(ApiError::NotFound(
                "the management API is off on this server (--management off)".into(),
            ))
        }
        (Management::Token, Some(token)) => token,
    };
    // The scheme is case-insensitive (RFC 9110); the token is compared as sent.
    let given = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim());
    match given {
        Some(g) if token.matches(g) => Ok(()),
        Some(_) => Err(ApiError::Unauthorized("the bearer token is wrong".into())),
        None => Err(ApiError::Unauthorized(
            "the management API needs `Authorization: Bearer <token>` (the server's --admin-token-file)"
                .into(),
        )),
    }
}

/// Whether the caller proved it is the administrator: a token is configured and the
/// request carries it. Only then do answers show full internal errors (a failed load's
/// libtorch error with paths and stack frames); everyone else gets the public reason.
pub(crate) fn is_admin(state: &AppState, headers: &HeaderMap) -> bool {
    state.management == crate::config::Management::Token && check_admin(state, headers).is_ok()
}

/// A version's error as this caller may see it (see [`is_admin`]).
pub(crate) fn error_for(admin: bool, status: &crate::lifecycle::VersionStatus) -> Option<String> {
    if admin {
        status.error.clone()
    } else {
        status.public_error()
    }
}
