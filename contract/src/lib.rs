//! What `netboot` and `netboot-datapath` agree on. Both binaries depend on
//! this crate and on nothing else of each other (docs/contracts.md).
//!
//! - [`errors`]: how an error and its causes are printed — each cause once,
//!   outermost first (`a: b: c`), with control and bidi characters escaped.

pub mod errors;
