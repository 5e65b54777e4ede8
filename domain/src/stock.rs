//! One SKU's stock counters and the only code that moves units between them.

use serde::{Deserialize, Serialize};

/// `total = available + held + sold`, always (DESIGN.md invariants 1 and 2).
///
/// All four are stored rather than deriving `available`, so that the assertion
/// after every move is a real check: a bug that moves a unit twice breaks the
/// sum instead of hiding in a derived number.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stock {
    /// Units a checkout may reserve now.
    pub available: u64,
    /// Units reserved by orders that are pending payment.
    pub held: u64,
    /// Units of paid orders.
    pub sold: u64,
    /// Every unit ever put on sale; changes only by restock.
    pub total: u64,
}

impl Stock {
    /// A fresh SKU: everything available.
    pub fn new(total: u64) -> Stock {
        Stock { available: total, held: 0, sold: 0, total }
    }

    /// available → held. The caller has checked `units <= available`.
    pub fn hold(&mut self, units: u64) {
        assert!(units <= self.available, "hold of {units} with {} available", self.available);
        self.available -= units;
        self.held += units;
        self.assert_conserved();
    }

    /// held → sold.
    pub fn confirm(&mut self, units: u64) {
        assert!(units <= self.held, "confirm of {units} with {} held", self.held);
        self.held -= units;
        self.sold += units;
        self.assert_conserved();
    }

    /// held → available.
    pub fn release(&mut self, units: u64) {
        assert!(units <= self.held, "release of {units} with {} held", self.held);
        self.held -= units;
        self.available += units;
        self.assert_conserved();
    }

    /// New units: total and available grow together.
    pub fn restock(&mut self, units: u64) {
        self.total += units;
        self.available += units;
        self.assert_conserved();
    }

    /// Conservation and no-oversell, asserted after every move: a broken sum
    /// is a loud crash the simulator finds, never a silent oversell.
    pub fn assert_conserved(&self) {
        assert_eq!(self.available + self.held + self.sold, self.total, "stock not conserved: {self:?}");
        assert!(self.held + self.sold <= self.total, "oversold: {self:?}");
    }
}
