//! Transports (see issue 3).
