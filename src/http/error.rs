//! The error envelope of failed requests.
//!
//! Every error response carries `Content-Type: application/json` and one
//! object with the five string keys `Type`, `Message`, `Handle`, `ProcessID`
//! and `Binary`, followed by `\n`. The status follows the Go server: 404 for
//! an unknown container or process, 500 for everything else (and 413 for a
//! body over the size limit, which the Go server does not have).

use crate::actors::ContainerError;
use crate::api::{self, DecodeError, ErrorEnvelope};

/// A failed request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    #[error(transparent)]
    Container(#[from] ContainerError),
    /// The body is not valid JSON for the route, or is empty.
    #[error("{0}")]
    Decode(#[from] DecodeError),
    #[error("request body is larger than the limit of {limit} bytes")]
    BodyTooLarge { limit: usize },
    #[error("reading the request body failed: {reason}")]
    BodyRead { reason: String },
    #[error("the {route} route must be the first request on its connection")]
    HijackNotFirst { route: &'static str },
}

impl ApiError {
    /// Returns the HTTP status and the envelope.
    pub fn to_envelope(&self) -> (u16, ErrorEnvelope) {
        match self {
            ApiError::Container(error) => error.to_envelope(),
            ApiError::BodyTooLarge { .. } => (413, ErrorEnvelope { message: self.to_string(), ..ErrorEnvelope::default() }),
            _ => (500, ErrorEnvelope { message: self.to_string(), ..ErrorEnvelope::default() }),
        }
    }

    /// Returns the JSON body of the envelope, ending in `\n`.
    pub fn body(&self) -> (u16, Vec<u8>) {
        let (status, envelope) = self.to_envelope();
        (status, api::encode(&envelope))
    }

    /// Returns whether the client caused the error (logged at info).
    pub fn is_client_error(&self) -> bool {
        match self {
            ApiError::Container(error) => error.is_client_error(),
            ApiError::BodyRead { .. } => false,
            _ => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn not_found_envelope() {
        let error = ApiError::from(ContainerError::NotFound { handle: "nope".into() });
        let (status, body) = error.body();
        assert_eq!(status, 404);
        assert_eq!(
            String::from_utf8(body).unwrap(),
            "{\"Type\":\"ContainerNotFoundError\",\"Message\":\"unknown handle: nope\",\"Handle\":\"nope\",\"ProcessID\":\"\",\"Binary\":\"\"}\n"
        );
    }

    #[test]
    fn decode_error_is_untyped_500() {
        let error = ApiError::from(DecodeError { message: "EOF".into() });
        let (status, envelope) = error.to_envelope();
        assert_eq!(status, 500);
        assert_eq!(envelope.error_type, "");
        assert_eq!(envelope.message, "EOF");
    }

    #[test]
    fn process_not_found_envelope() {
        let (status, envelope) = ApiError::from(ContainerError::ProcessNotFound { process_id: "p".into() }).to_envelope();
        assert_eq!(status, 404);
        assert_eq!(envelope.error_type, "ProcessNotFoundError");
        assert_eq!(envelope.process_id, "p");
        assert_eq!(envelope.message, "unknown process: p");
    }
}
