//! p2pcheck
pub mod sys;
