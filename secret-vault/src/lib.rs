//! The secret vault (DESIGN.md §3, `research/secrets.md` §5.5): the only place in a sandbox
//! process that holds secret values, and the one question it answers per request head —
//! substitute here or not, and why.
//!
//! - [`vault::Vault`] is the pure core: a table of [`msb_schema::secret::SecretSpec`]s with
//!   their values, and [`vault::Vault::substitute`], a function of the table, the flow's
//!   identity and the head. A value is put into a head only when every gate holds: the TLS
//!   name is one of the secret's hosts, the destination was resolved for that name, the
//!   upstream certificate was verified for it, the request's authority is that name, and
//!   the location (header in scope, query when asked) is enabled. Never the path; never
//!   the body.
//! - [`actor::SecretVault`] is its shell. The gateway holds a ref narrowed to
//!   [`msb_schema::secret::VaultQuery`], the control side one narrowed to
//!   [`msb_schema::secret::VaultControl`].
//!
//! Invariants: values live in [`vault::Locked`] buffers (allocated once, never
//! reallocated, locked against swapping where the system allows, wiped on rotation, removal
//! and drop); no value is ever formatted, logged or serialised; every buffer that held a
//! value on its way into a head is zeroized.

#![forbid(unsafe_code)]

pub mod actor;
pub mod vault;

pub use actor::{SecretVault, VaultArgs, VaultMsg};
pub use vault::Vault;
