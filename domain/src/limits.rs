//! Bounds on everything a request can make the state hold. A limit gives
//! backpressure a place to act and keeps one shopper from growing the state
//! without bound. The API validates against the same functions before it
//! proposes anything, and the state machine validates again, because the log
//! must never apply a command that breaks a bound.

use crate::types::{Line, Rejection};

/// Longest SKU code, in bytes.
pub const SKU_LEN_MAX: usize = 64;
/// Longest sale name, in bytes.
pub const SALE_NAME_LEN_MAX: usize = 200;
/// Longest shopper id, in bytes.
pub const SHOPPER_LEN_MAX: usize = 128;
/// Longest idempotency key, in bytes.
pub const IDEMPOTENCY_KEY_LEN_MAX: usize = 128;
/// Most distinct SKUs in one cart or one order.
pub const CART_LINES_MAX: usize = 32;
/// Most units of one SKU in one cart line or order line.
pub const LINE_QTY_MAX: u32 = 10_000;
/// Most units one sale may hold in total (restocks included).
pub const SALE_STOCK_MAX: u64 = 1_000_000_000;
/// Highest unit price, in minor currency units (10^10 major units).
pub const PRICE_MINOR_MAX: u64 = 1_000_000_000_000;
/// Most checkouts (idempotency keys) one session may decide, placed or
/// refused; it bounds the keys and orders a session keeps.
pub const CHECKOUTS_PER_SESSION_MAX: usize = 256;
/// How long a session that holds no order pending payment or paid stays
/// open without a write (a cart change, a checkout, or its last order
/// cancelled or expiring), in leader time: six hours. It closes with its
/// cancelled and expired orders.
pub const SESSION_IDLE_MS: u64 = 6 * 60 * 60 * 1000;
/// Most such idle sessions a group keeps open. One more closes the one
/// idle longest: anyone may open a session, so without a bound a script
/// could grow every replica and snapshot without end.
pub const IDLE_SESSIONS_MAX: usize = 500_000;
/// Restock idempotency keys one SKU remembers, the latest ones: a retry of
/// an older one adds its units again.
pub const RESTOCKS_KEPT: usize = 64;
/// Most sales one group holds.
pub const SALES_MAX: usize = 100_000;
/// Longest region name, in bytes.
pub const REGION_LEN_MAX: usize = 64;
/// Drill records kept; the oldest goes first.
pub const DRILLS_KEPT: usize = 100;
/// Session ids a failover skips: sessions the lost primary may have opened
/// after the DR copy's last entry keep ids no new session reuses.
pub const SESSIONS_SKIPPED_AT_FAILOVER: u64 = 1 << 32;
/// Largest drill record, in bytes.
pub const DRILL_RECORD_BYTES_MAX: usize = 64 * 1024;

/// Checks a SKU code: 1 to [`SKU_LEN_MAX`] bytes of `[A-Za-z0-9._-]`, so it is
/// safe in a URL path segment and a metric label.
pub fn validate_sku(sku: &str) -> Result<(), Rejection> {
    let ok = !sku.is_empty()
        && sku.len() <= SKU_LEN_MAX
        && sku.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(Rejection::Invalid(format!("sku must be 1 to {SKU_LEN_MAX} characters of A-Z, a-z, 0-9, '.', '_' or '-'")))
    }
}

/// Checks an idempotency key: 1 to [`IDEMPOTENCY_KEY_LEN_MAX`] visible ASCII characters.
pub fn validate_idempotency_key(key: &str) -> Result<(), Rejection> {
    if !key.is_empty() && key.len() <= IDEMPOTENCY_KEY_LEN_MAX && key.bytes().all(|b| b.is_ascii_graphic()) {
        Ok(())
    } else {
        Err(Rejection::Invalid(format!(
            "Idempotency-Key must be 1 to {IDEMPOTENCY_KEY_LEN_MAX} visible ASCII characters"
        )))
    }
}

/// Checks a shopper id: 1 to [`SHOPPER_LEN_MAX`] visible ASCII characters.
pub fn validate_shopper(shopper: &str) -> Result<(), Rejection> {
    if !shopper.is_empty() && shopper.len() <= SHOPPER_LEN_MAX && shopper.bytes().all(|b| b.is_ascii_graphic()) {
        Ok(())
    } else {
        Err(Rejection::Invalid(format!("shopper must be 1 to {SHOPPER_LEN_MAX} visible ASCII characters")))
    }
}

/// Checks one quantity: at least 1, at most [`LINE_QTY_MAX`].
pub fn validate_qty(qty: u32) -> Result<(), Rejection> {
    if (1..=LINE_QTY_MAX).contains(&qty) {
        Ok(())
    } else {
        Err(Rejection::Invalid(format!("qty must be between 1 and {LINE_QTY_MAX}")))
    }
}

/// Checks the lines of an order: 1 to [`CART_LINES_MAX`] lines, valid SKUs and
/// quantities, each SKU once (a repeated SKU is ambiguous, not summed).
pub fn validate_lines(lines: &[Line]) -> Result<(), Rejection> {
    if lines.is_empty() {
        return Err(Rejection::EmptyOrder);
    }
    if lines.len() > CART_LINES_MAX {
        return Err(Rejection::Invalid(format!("an order has at most {CART_LINES_MAX} lines")));
    }
    for (i, line) in lines.iter().enumerate() {
        validate_sku(&line.sku)?;
        validate_qty(line.qty)?;
        if lines[..i].iter().any(|earlier| earlier.sku == line.sku) {
            return Err(Rejection::Invalid(format!("sku {} appears twice", line.sku)));
        }
    }
    Ok(())
}
