//! The network gateway's pure core (DESIGN.md §6): the one address classifier
//! ([`classify`]), the egress/ingress policy ([`policy`]) and DNS answering with its pin set
//! ([`dns`]), what a flow says it is for and the denials programs read ([`sniff`]), and the
//! packet stack that joins them ([`stack`]); [`actor`] is the shell that gives the stack
//! host sockets, an upstream resolver and the audit file. Every decision about an address goes through
//! [`classify::Classifier`] and every decision about a flow through [`policy::Policy`].
//!
//! Invariants: nothing but [`actor`] does I/O; nothing sees guest memory; every input is a parsed value
//! (addresses as [`std::net::IpAddr`], names as checked [`policy::DomainName`]s).

#![forbid(unsafe_code)]

pub mod actor;
pub mod classify;
pub mod dialer;
pub mod dns;
pub mod http1;
pub mod limit;
pub mod placeholders;
pub mod policy;
#[cfg(test)]
mod review_tests;
pub mod sniff;
pub mod stack;
#[cfg(test)]
mod test_guest;
pub mod tls;
