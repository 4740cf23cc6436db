//! The connection to otnd: checked before anything is sent, opened on the first call, the API
//! key attached to every request. And the one way a failed call is reported.

use std::{fmt, time::Duration};

use otnd::pb::{
    opt_in_service_client::OptInServiceClient, page_service_client::PageServiceClient,
    send_service_client::SendServiceClient, story_service_client::StoryServiceClient,
};
use tokio::sync::OnceCell;
use tonic::{
    Code, Request, Status,
    metadata::{AsciiMetadataValue, MetadataValue},
    service::{Interceptor, interceptor::InterceptedService},
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint},
};

use crate::{cli::Connection, usage_error};

/// A call that did not succeed: printed as `otnctl: <CODE>: <message>`, exit code 1.
pub struct Failure {
    pub code: Code,
    pub message: String,
}

impl From<Status> for Failure {
    fn from(status: Status) -> Self {
        Failure {
            code: status.code(),
            message: status.message().to_string(),
        }
    }
}

impl Failure {
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        Failure {
            code,
            message: message.into(),
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // One line that cannot steer the terminal, whatever otnd quotes back.
        let message: String = self
            .message
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
            .chars()
            .map(|c| {
                if c.is_control() {
                    c.escape_unicode().to_string()
                } else {
                    c.to_string()
                }
            })
            .collect();
        let message = if message.is_empty() {
            "(no message)".to_string()
        } else {
            message
        };
        write!(f, "{}: {message}", code_name(self.code))
    }
}

/// gRPC's canonical names, as every gRPC tool spells them.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// Puts the API key on every request. The value is marked sensitive so that tonic and hyper
/// never show it in their own debug output.
#[derive(Clone)]
pub struct Auth(Option<AsciiMetadataValue>);

impl Interceptor for Auth {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

type Svc = InterceptedService<Channel, Auth>;

/// Where and how to reach otnd, checked; the channel opened once, on the first call.
pub struct Conn {
    endpoint: Endpoint,
    addr: String,
    auth: Auth,
    channel: OnceCell<Channel>,
}

impl Conn {
    /// Checks the connection flags, exiting with a usage error (2) when one is wrong: nothing
    /// has been sent yet.
    pub fn new(connection: &Connection) -> Conn {
        let addr = connection.addr.trim().to_string();
        let uri: http::Uri = addr.parse().unwrap_or_else(|_| {
            usage_error(format!(
                "--addr: '{addr}' is not an address; expected http://HOST:PORT or https://HOST:PORT"
            ))
        });
        let scheme = uri.scheme_str().unwrap_or_default().to_string();
        if !matches!(scheme.as_str(), "http" | "https") || uri.host().is_none() {
            usage_error(format!(
                "--addr: '{addr}' must start with http:// or https:// and name a host"
            ));
        }
        let mut endpoint = Endpoint::from(uri)
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true);
        match (&connection.tls_ca, scheme.as_str()) {
            (Some(path), "https") => {
                let pem = std::fs::read(path).unwrap_or_else(|e| {
                    usage_error(format!("--tls-ca: cannot read {}: {e}", path.display()))
                });
                let tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem));
                endpoint = endpoint
                    .tls_config(tls)
                    .unwrap_or_else(|e| usage_error(format!("--tls-ca: {e}")));
            }
            (Some(_), _) => usage_error("--tls-ca needs an https:// address (--addr)"),
            (None, "https") => usage_error(
                "--addr https://… needs --tls-ca (or OTN_TLS_CA): the CA that signs otnd's \
                 certificate",
            ),
            (None, _) => {}
        }
        let auth = match &connection.api_key {
            None => Auth(None),
            Some(key) => {
                let key = key.trim();
                if key.is_empty() {
                    usage_error("--api-key (OTN_API_KEY) is empty");
                }
                let mut value: AsciiMetadataValue =
                    MetadataValue::try_from(format!("Bearer {key}")).unwrap_or_else(|_| {
                        usage_error(
                            "--api-key (OTN_API_KEY) must be printable ASCII without line breaks",
                        )
                    });
                value.set_sensitive(true);
                Auth(Some(value))
            }
        };
        Conn {
            endpoint,
            addr,
            auth,
            channel: OnceCell::new(),
        }
    }

    async fn channel(&self) -> Result<Channel, Failure> {
        self.channel
            .get_or_try_init(|| async {
                self.endpoint.connect().await.map_err(|e| {
                    Failure::new(
                        Code::Unavailable,
                        format!(
                            "cannot connect to otnd at {}: {}",
                            self.addr,
                            root_cause(&e)
                        ),
                    )
                })
            })
            .await
            .cloned()
    }

    pub async fn pages(&self) -> Result<PageServiceClient<Svc>, Failure> {
        Ok(PageServiceClient::with_interceptor(
            self.channel().await?,
            self.auth.clone(),
        ))
    }

    pub async fn optins(&self) -> Result<OptInServiceClient<Svc>, Failure> {
        Ok(OptInServiceClient::with_interceptor(
            self.channel().await?,
            self.auth.clone(),
        ))
    }

    pub async fn stories(&self) -> Result<StoryServiceClient<Svc>, Failure> {
        Ok(StoryServiceClient::with_interceptor(
            self.channel().await?,
            self.auth.clone(),
        ))
    }

    pub async fn sends(&self) -> Result<SendServiceClient<Svc>, Failure> {
        Ok(SendServiceClient::with_interceptor(
            self.channel().await?,
            self.auth.clone(),
        ))
    }
}

/// The innermost cause ("Connection refused (os error 111)"), which says more than tonic's
/// "transport error".
fn root_cause(error: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = error;
    while let Some(source) = cause.source() {
        cause = source;
    }
    cause.to_string()
}
