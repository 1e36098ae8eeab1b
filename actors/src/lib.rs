//! Actix integration (see issue 4).
