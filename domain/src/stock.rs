//! One SKU's stock counters and the only code that moves units between them.

use serde::{Deserialize, Serialize};

/// `total = available + escrowed + held + sold + unsettled`, always
/// (DESIGN.md invariants 1 and 2).
///
/// All four are stored rather than deriving `available`, so that the assertion
/// after every move is a real check: a bug that moves a unit twice breaks the
/// sum instead of hiding in a derived number.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stock {
    /// Units on sale that are not in escrow. While escrow is off (no DR
    /// copy), a checkout reserves from here.
    pub available: u64,
    /// Units granted to the region that takes writes and not yet held: the
    /// DR copy has heard, or is about to hear, that they may be sold. Once
    /// escrow is on, a checkout reserves only from here.
    pub escrowed: u64,
    /// Units reserved by orders that are pending payment.
    pub held: u64,
    /// Units of paid orders.
    pub sold: u64,
    /// Units a failover took out of sale: the old primary region may have
    /// sold them after the DR copy's last entry. Failback settles them.
    pub unsettled: u64,
    /// Every unit ever put on sale; changes only by restock.
    pub total: u64,
}

impl Stock {
    /// A fresh SKU: everything available.
    pub fn new(total: u64) -> Stock {
        Stock { available: total, escrowed: 0, held: 0, sold: 0, unsettled: 0, total }
    }

    /// Units a shopper can still buy: available or escrowed.
    pub fn for_sale(&self) -> u64 {
        self.available + self.escrowed
    }

    /// available → held. The caller has checked `units <= available`.
    pub fn hold(&mut self, units: u64) {
        assert!(units <= self.available, "hold of {units} with {} available", self.available);
        self.available -= units;
        self.held += units;
        self.assert_conserved();
    }

    /// available → escrowed. The caller has checked `units <= available`.
    pub fn grant(&mut self, units: u64) {
        assert!(units <= self.available, "grant of {units} with {} available", self.available);
        self.available -= units;
        self.escrowed += units;
        self.assert_conserved();
    }

    /// escrowed → held. The caller has checked `units <= escrowed`.
    pub fn hold_escrowed(&mut self, units: u64) {
        assert!(units <= self.escrowed, "hold of {units} with {} escrowed", self.escrowed);
        self.escrowed -= units;
        self.held += units;
        self.assert_conserved();
    }

    /// held → unsettled: an order pending at a failover ended unpaid, but
    /// the old primary may have let its units go to someone else.
    pub fn release_unsettled(&mut self, units: u64) {
        assert!(units <= self.held, "release of {units} with {} held", self.held);
        self.held -= units;
        self.unsettled += units;
        self.assert_conserved();
    }

    /// unsettled → available: units a failover took out of sale that
    /// failback found nobody bought. The caller has checked
    /// `units <= unsettled`.
    pub fn return_unsettled(&mut self, units: u64) {
        assert!(units <= self.unsettled, "return of {units} with {} unsettled", self.unsettled);
        self.unsettled -= units;
        self.available += units;
        self.assert_conserved();
    }

    /// escrowed → unsettled, all of it: what a failover does, because the
    /// old primary may have sold any escrowed unit after the copy's cut.
    /// Returns how many units moved.
    pub fn unsettle_escrow(&mut self) -> u64 {
        let units = std::mem::take(&mut self.escrowed);
        self.unsettled += units;
        self.assert_conserved();
        units
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

    /// `total = available + escrowed + held + sold + unsettled`: no unit
    /// made or lost.
    pub fn is_conserved(&self) -> bool {
        self.available + self.escrowed + self.held + self.sold + self.unsettled == self.total
    }

    /// Conservation and no-oversell, asserted after every move: a broken sum
    /// is a loud crash the simulator finds, never a silent oversell.
    pub fn assert_conserved(&self) {
        assert!(self.is_conserved(), "stock not conserved: {self:?}");
        assert!(self.held + self.sold <= self.total, "oversold: {self:?}");
    }
}
