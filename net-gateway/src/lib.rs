//! The network gateway's pure core (DESIGN.md §6): the one address classifier
//! ([`classify`]), the egress/ingress policy ([`policy`]) and DNS answering with its pin set
//! ([`dns`]), what a flow says it is for and the denials programs read ([`sniff`]), and the
//! packet stack that joins them ([`stack`]). The smoltcp stack, DNS, the
//! dialer and published ports build on these; every decision about an address goes through
//! [`classify::Classifier`] and every decision about a flow through [`policy::Policy`].
//!
//! Invariants: nothing here does I/O or sees guest memory; every input is a parsed value
//! (addresses as [`std::net::IpAddr`], names as checked [`policy::DomainName`]s).

#![forbid(unsafe_code)]

pub mod classify;
pub mod dns;
pub mod policy;
pub mod sniff;
pub mod stack;
