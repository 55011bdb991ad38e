//! Symbolization of user stacks on one long-lived thread (blazesym).
