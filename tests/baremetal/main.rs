//! Bare-metal VMM tests: placeholder replaced below.
