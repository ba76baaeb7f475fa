//! Errors of the Garden client: the typed errors rebuilt from the server's
//! error envelope, and the transport failures around them.

use crate::api::{
    ErrorEnvelope, ERROR_CONTAINER_NOT_FOUND, ERROR_EXECUTABLE_NOT_FOUND, ERROR_PROCESS_NOT_FOUND,
    ERROR_SERVICE_UNAVAILABLE, ERROR_UNRECOVERABLE,
};

/// Everything a client call can fail with.
///
/// The first six variants come from the server's error envelope and are
/// chosen by its `Type` key alone, as the Go client does. The HTTP status
/// only decides that a response is an error.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// `ContainerNotFoundError`: no container has this handle.
    #[error("unknown handle: {handle}")]
    ContainerNotFound { handle: String },

    /// `ProcessNotFoundError`: the container has no process with this id.
    #[error("unknown process: {process_id}")]
    ProcessNotFound { process_id: String },

    /// `ExecutableNotFoundError`: the process's executable does not exist.
    #[error("{message}")]
    ExecutableNotFound { message: String },

    /// `ServiceUnavailableError`: the server cannot serve requests yet.
    #[error("{cause}")]
    ServiceUnavailable { cause: String },

    /// `UnrecoverableError`: the server hit a failure it cannot recover from.
    #[error("{symptom}")]
    Unrecoverable { symptom: String },

    /// An untyped error (`Type` empty or unknown) with the server's message.
    #[error("{message}")]
    Server { status: u16, message: String },

    /// The server responded with an error status and a body that is not an
    /// error envelope, such as the router's plain-text 404.
    #[error("bad response: status {status}, body {body:?}")]
    BadResponse { status: u16, body: String },

    /// A success body that does not decode as the route's type.
    #[error("invalid {what} from the server: {source}")]
    InvalidBody {
        what: &'static str,
        #[source]
        source: crate::api::DecodeError,
    },

    /// The response or a message on a process connection broke the HTTP or
    /// Garden framing.
    #[error("protocol error on {route}: {reason}")]
    Protocol { route: String, reason: String },

    /// Connecting to the server failed.
    #[error("cannot connect to {target}: {source}")]
    Connect {
        target: String,
        #[source]
        source: std::io::Error,
    },

    /// Connecting to the server did not finish within the connect timeout.
    #[error("connecting to {target} timed out after {timeout_ms} ms")]
    ConnectTimeout { target: String, timeout_ms: u128 },

    /// Reading or writing an open connection failed.
    #[error("I/O error on {route}: {source}")]
    Io {
        route: String,
        #[source]
        source: std::io::Error,
    },

    /// Opening the stdout or stderr attach connection of a process failed
    /// after the server had started the process. The process keeps running
    /// and can be attached again by its id.
    #[error("attaching {stream} of process {process_id} failed: {source}")]
    AttachStream {
        process_id: String,
        stream: &'static str,
        #[source]
        source: Box<ClientError>,
    },

    /// The server reported that waiting for the process failed.
    #[error("process error: {message}")]
    Process { message: String },

    /// The process connection ended before the server sent an exit status,
    /// for example because the server stopped.
    #[error("process connection of {process_id} ended without an exit status")]
    NoExitStatus { process_id: String },

    /// The process handle was already waited for.
    #[error("process {process_id} was already waited for")]
    AlreadyWaited { process_id: String },

    /// An argument given to the client cannot be sent, such as a malformed
    /// target address.
    #[error("invalid {what}: {reason}")]
    InvalidArgument { what: &'static str, reason: String },
}

impl ClientError {
    /// Rebuilds the typed error that an error envelope describes.
    pub fn from_envelope(status: u16, envelope: ErrorEnvelope) -> ClientError {
        match envelope.error_type.as_str() {
            ERROR_CONTAINER_NOT_FOUND => ClientError::ContainerNotFound {
                handle: envelope.handle,
            },
            ERROR_PROCESS_NOT_FOUND => ClientError::ProcessNotFound {
                process_id: envelope.process_id,
            },
            ERROR_EXECUTABLE_NOT_FOUND => ClientError::ExecutableNotFound {
                message: envelope.message,
            },
            ERROR_SERVICE_UNAVAILABLE => ClientError::ServiceUnavailable {
                cause: envelope.message,
            },
            ERROR_UNRECOVERABLE => ClientError::Unrecoverable {
                symptom: envelope.message,
            },
            _ => ClientError::Server {
                status,
                message: envelope.message,
            },
        }
    }

    /// Decodes an error response body into its typed error.
    pub fn from_error_body(status: u16, body: &[u8]) -> ClientError {
        match crate::api::decode::<ErrorEnvelope>(body) {
            Ok(envelope) => ClientError::from_envelope(status, envelope),
            Err(_) => ClientError::BadResponse {
                status,
                body: String::from_utf8_lossy(body).into_owned(),
            },
        }
    }
}

/// Result of a client call.
pub type ClientResult<T> = Result<T, ClientError>;

#[cfg(test)]
mod tests {
    use super::*;

    fn body(error_type: &str, message: &str, handle: &str, process_id: &str) -> Vec<u8> {
        serde_json::to_vec(&ErrorEnvelope {
            error_type: error_type.into(),
            message: message.into(),
            handle: handle.into(),
            process_id: process_id.into(),
            binary: String::new(),
        })
        .unwrap()
    }

    #[test]
    fn envelope_container_not_found() {
        let error = ClientError::from_error_body(404, &body("ContainerNotFoundError", "x", "web-7", ""));
        assert!(matches!(&error, ClientError::ContainerNotFound { handle } if handle == "web-7"));
        assert_eq!(error.to_string(), "unknown handle: web-7");
    }

    #[test]
    fn envelope_process_not_found() {
        let error = ClientError::from_error_body(404, &body("ProcessNotFoundError", "x", "", "p1"));
        assert!(matches!(&error, ClientError::ProcessNotFound { process_id } if process_id == "p1"));
        assert_eq!(error.to_string(), "unknown process: p1");
    }

    #[test]
    fn envelope_other_types() {
        let error = ClientError::from_error_body(500, &body("ExecutableNotFoundError", "no exe", "", ""));
        assert!(matches!(&error, ClientError::ExecutableNotFound { message } if message == "no exe"));
        let error = ClientError::from_error_body(500, &body("ServiceUnavailableError", "starting", "", ""));
        assert!(matches!(&error, ClientError::ServiceUnavailable { cause } if cause == "starting"));
        let error = ClientError::from_error_body(500, &body("UnrecoverableError", "broken", "", ""));
        assert!(matches!(&error, ClientError::Unrecoverable { symptom } if symptom == "broken"));
    }

    #[test]
    fn envelope_untyped_keeps_message() {
        let error = ClientError::from_error_body(500, &body("", "Handle 'a' already in use", "", ""));
        assert!(matches!(&error, ClientError::Server { status: 500, .. }));
        assert_eq!(error.to_string(), "Handle 'a' already in use");
        let error = ClientError::from_error_body(500, &body("SomeFutureError", "later", "", ""));
        assert_eq!(error.to_string(), "later");
    }

    #[test]
    fn plain_text_body_is_bad_response() {
        let error = ClientError::from_error_body(404, b"404 page not found\n");
        assert!(matches!(&error, ClientError::BadResponse { status: 404, body } if body == "404 page not found\n"));
    }
}
