//! Every way proxying one request can fail, classified in ONE place.
//!
//! Like pingora's `ErrorSource`, each [`ProxyError`] says where it came from (downstream client,
//! upstream endpoint, or meshgate itself), which status the client gets, and whether the request
//! may be retried on another endpoint. The proxy loop asks [`ProxyError::retryable`] and nothing
//! else; the response is built by [`ProxyError::status`] and [`ProxyError::body`].

use http::{Method, StatusCode};

/// Who caused a failure (for logs and metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorSource {
    Downstream,
    Upstream,
    Internal,
}

/// One failed attempt to proxy a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ProxyError {
    /// No router of the entrypoint matches the request.
    #[error("no route")]
    NoRoute,
    /// The request is malformed in a way hyper let through (no host on HTTP/1.0, bad URI).
    #[error("bad request")]
    BadRequest,
    /// The router's service has no endpoint for its HTTP port, or all are down/ejected/tried.
    #[error("no endpoint available")]
    NoEndpoint,
    /// TCP connect refused or failed (request never sent).
    #[error("connect to upstream failed")]
    ConnectFailed,
    /// TCP connect or TLS handshake did not finish within the service's connect timeout.
    #[error("connect to upstream timed out")]
    ConnectTimeout,
    /// The request was accepted by a pooled connection but never written (it closed first).
    #[error("upstream connection closed before the request was sent")]
    NotSent,
    /// The connection failed after the request (or part of it) was written, before a response.
    #[error("upstream connection reset before the response")]
    ResetBeforeResponse,
    /// No response head within the service's response timeout.
    #[error("upstream response timed out")]
    ResponseTimeout,
    /// The upstream answered something that is not valid HTTP, or refused the upgrade.
    #[error("invalid upstream response")]
    UpstreamProtocol,
    /// A bug or resource problem in meshgate.
    #[error("internal error")]
    Internal,
}

impl ProxyError {
    pub fn source(self) -> ErrorSource {
        match self {
            ProxyError::NoRoute | ProxyError::BadRequest => ErrorSource::Downstream,
            ProxyError::Internal => ErrorSource::Internal,
            _ => ErrorSource::Upstream,
        }
    }

    /// The status the downstream client gets.
    pub fn status(self) -> StatusCode {
        match self {
            ProxyError::NoRoute => StatusCode::NOT_FOUND,
            ProxyError::BadRequest => StatusCode::BAD_REQUEST,
            ProxyError::NoEndpoint => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::ConnectFailed
            | ProxyError::NotSent
            | ProxyError::ResetBeforeResponse
            | ProxyError::UpstreamProtocol => StatusCode::BAD_GATEWAY,
            ProxyError::ConnectTimeout | ProxyError::ResponseTimeout => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// A short body for the client: static, so error responses allocate nothing.
    pub fn body(self) -> &'static str {
        match self {
            ProxyError::NoRoute => "404 no route matches this host and path\n",
            ProxyError::BadRequest => "400 bad request\n",
            ProxyError::NoEndpoint => "503 no endpoint available for this service\n",
            ProxyError::ConnectFailed | ProxyError::NotSent => "502 upstream unreachable\n",
            ProxyError::ResetBeforeResponse => "502 upstream closed the connection\n",
            ProxyError::UpstreamProtocol => "502 invalid upstream response\n",
            ProxyError::ConnectTimeout => "504 upstream connect timed out\n",
            ProxyError::ResponseTimeout => "504 upstream response timed out\n",
            ProxyError::Internal => "500 internal error\n",
        }
    }

    /// May this request be tried again on a different endpoint?
    ///
    /// Never-sent requests are always safe. A request that reached an endpoint is only retried
    /// when its method is idempotent (RFC 9110 §9.2.2) and the connection died before any
    /// response: the endpoint may have acted on it, and repeating is harmless only for those.
    /// A timeout is not retried: the endpoint is probably still working on it.
    pub fn retryable(self, method: &Method) -> bool {
        match self {
            ProxyError::ConnectFailed | ProxyError::ConnectTimeout | ProxyError::NotSent => true,
            ProxyError::ResetBeforeResponse => is_idempotent(method),
            _ => false,
        }
    }

    /// Does this failure count against the endpoint's passive health?
    pub fn is_connect_failure(self) -> bool {
        matches!(self, ProxyError::ConnectFailed | ProxyError::ConnectTimeout)
    }
}

/// RFC 9110 idempotent methods.
pub fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}

/// Classify an error of hyper-util's pooled client by walking its source chain.
pub fn classify_client_error(err: &hyper_util::client::legacy::Error) -> ProxyError {
    use std::error::Error as _;
    if err.is_connect() {
        let mut src = err.source();
        while let Some(e) = src {
            if let Some(io) = e.downcast_ref::<std::io::Error>() {
                if io.kind() == std::io::ErrorKind::TimedOut {
                    return ProxyError::ConnectTimeout;
                }
            }
            src = e.source();
        }
        return ProxyError::ConnectFailed;
    }
    let mut src = err.source();
    while let Some(e) = src {
        if let Some(h) = e.downcast_ref::<hyper::Error>() {
            if let Some(c) = classify_hyper_kind(h) {
                return c;
            }
        }
        if e.downcast_ref::<std::io::Error>().is_some() {
            return ProxyError::ResetBeforeResponse;
        }
        src = e.source();
    }
    // HTTP/2 stream errors (RST_STREAM, GOAWAY) end here: hyper does not expose h2's reason.
    // Treated as a reset: retried only when idempotent, which is safe either way.
    ProxyError::ResetBeforeResponse
}

fn classify_hyper_kind(h: &hyper::Error) -> Option<ProxyError> {
    if h.is_canceled() {
        Some(ProxyError::NotSent)
    } else if h.is_incomplete_message() || h.is_closed() {
        Some(ProxyError::ResetBeforeResponse)
    } else if h.is_parse() || h.is_parse_status() {
        Some(ProxyError::UpstreamProtocol)
    } else {
        None
    }
}

/// Classify an error of a hyper HTTP/1 connection (meshgate's own pool) whose request was NOT
/// handed back (`try_send_request` returns never-written requests, and those are `NotSent`):
/// the request may have been written, so even hyper's "canceled" (connection task gone) is a
/// reset, retried only for idempotent methods; so is anything not recognised (I/O errors).
pub fn classify_hyper_error(err: &hyper::Error) -> ProxyError {
    match classify_hyper_kind(err) {
        Some(ProxyError::NotSent) | None => ProxyError::ResetBeforeResponse,
        Some(c) => c,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_and_retry_rules() {
        assert_eq!(ProxyError::NoRoute.status(), 404);
        assert_eq!(ProxyError::NoEndpoint.status(), 503);
        assert_eq!(ProxyError::ConnectFailed.status(), 502);
        assert_eq!(ProxyError::ConnectTimeout.status(), 504);
        assert_eq!(ProxyError::ResponseTimeout.status(), 504);
        assert!(ProxyError::ConnectFailed.retryable(&Method::POST));
        assert!(ProxyError::NotSent.retryable(&Method::POST));
        assert!(ProxyError::ResetBeforeResponse.retryable(&Method::GET));
        assert!(!ProxyError::ResetBeforeResponse.retryable(&Method::POST));
        assert!(!ProxyError::ResponseTimeout.retryable(&Method::GET));
        assert_eq!(ProxyError::NoRoute.source(), ErrorSource::Downstream);
    }
}
