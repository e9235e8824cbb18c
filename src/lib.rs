//! p2pcheck
pub mod check;
pub mod driver;
pub mod protocol;
pub mod sys;
pub mod worker;
