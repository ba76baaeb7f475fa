//! The Rust Garden client. Depends on neither actix nor `crate::linux`.
