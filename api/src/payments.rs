//! The built-in test payment provider. Its answer depends only on the token,
//! so every decline path can be exercised on purpose.

use crate::problem::ApiError;

/// Approves or declines a charge of `amount_minor` for `token`.
pub fn authorize(token: &str, _amount_minor: u64) -> Result<(), ApiError> {
    match token {
        "tok_approve" => Ok(()),
        "tok_decline" => Err(ApiError::PaymentDeclined("the card was declined")),
        "tok_insufficient_funds" => Err(ApiError::PaymentDeclined("insufficient funds")),
        _ => Err(ApiError::Malformed(
            "unknown payment_token: use tok_approve, tok_decline or tok_insufficient_funds".into(),
        )),
    }
}
