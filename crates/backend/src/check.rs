//! Finding a misconfigured store before it is used: what opening a store can tell from its
//! settings (a plain-HTTP endpoint that is not allowed, no source of credentials), and the
//! start-up check ([`crate::Backend::check`]) that writes a marker object and tells each
//! failure as what the user should change.

use std::time::Duration;

use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey, AwsCredentialProvider};
use object_store::client::ClientConfigKey;

use crate::Error;

/// Why a store cannot be used as configured; each message says what to change.
#[derive(Debug, thiserror::Error)]
pub enum Unusable {
    /// No credentials are configured, and none could be had from the instance metadata.
    #[error(
        "no credentials found for {url}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN for temporary ones), or AWS_WEB_IDENTITY_TOKEN_FILE and AWS_ROLE_ARN, or run where container or instance credentials are available ({tried}); AWS_SKIP_SIGNATURE=true reaches a public bucket without credentials"
    )]
    NoCredentials {
        /// The store URL.
        url: String,
        /// What was tried.
        tried: &'static str,
        /// Why the instance metadata gave none, if it was asked.
        #[source]
        source: Option<object_store::Error>,
    },
    /// The bucket (or container) does not exist.
    #[error(
        "bucket {bucket:?} of {url} does not exist{}; create it, or correct the store URL or the endpoint",
        at(.endpoint)
    )]
    NoBucket {
        /// The store URL.
        url: String,
        /// The bucket's name.
        bucket: String,
        /// The endpoint, if not the provider's default.
        endpoint: Option<String>,
        /// The store's answer.
        #[source]
        source: Box<Error>,
    },
    /// The store refused the credentials or denied access.
    #[error(
        "access to {url} denied: check the credentials (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, ...) and that they may write under the prefix"
    )]
    AccessDenied {
        /// The store URL.
        url: String,
        /// The store's answer.
        #[source]
        source: Box<Error>,
    },
    /// An `http://` endpoint while plain HTTP is not allowed.
    #[error(
        "the endpoint {endpoint} of {url} is plain http://, which is refused unless AWS_ALLOW_HTTP=true is set; set it to allow unencrypted connections, or use an https:// endpoint"
    )]
    HttpNotAllowed {
        /// The store URL.
        url: String,
        /// The endpoint.
        endpoint: String,
    },
    /// An `https://` endpoint that answers plain HTTP.
    #[error(
        "the endpoint {endpoint} of {url} answers plain HTTP, not TLS: write it as http://{authority} and set AWS_ALLOW_HTTP=true"
    )]
    TlsMismatch {
        /// The store URL.
        url: String,
        /// The endpoint.
        endpoint: String,
        /// Its host and port.
        authority: String,
        /// The failure of the TLS connection.
        #[source]
        source: Box<Error>,
    },
    /// The store did not answer within the store timeout.
    #[error(
        "the store {url} did not answer within {timeout:?}; check the endpoint and the network"
    )]
    Unreachable {
        /// The store URL.
        url: String,
        /// The timeout.
        timeout: Duration,
        /// The last failure.
        #[source]
        source: Box<Error>,
    },
}

fn at(endpoint: &Option<String>) -> String {
    endpoint
        .as_ref()
        .map_or_else(String::new, |e| format!(" at {e}"))
}

impl From<Unusable> for Error {
    fn from(u: Unusable) -> Self {
        Error::Unusable(Box::new(u))
    }
}

/// `url` without the user name and password it may carry, for messages.
pub(crate) fn without_credentials(url: &url::Url) -> String {
    let mut shown = url.clone();
    if shown.password().is_some() || !shown.username().is_empty() {
        // Both fail only for URLs that cannot have credentials.
        let _ = shown.set_username("");
        let _ = shown.set_password(None);
    }
    shown.to_string()
}

/// What the start-up check needs to know of a cloud store beyond its `ObjectStore`.
#[derive(Debug, Clone, Default)]
pub(crate) struct Setup {
    /// The store URL, without credentials.
    pub(crate) url: String,
    /// Whether the store is reached over the network (S3, GCS, Azure).
    pub(crate) cloud: bool,
    /// The bucket or container.
    pub(crate) bucket: Option<String>,
    /// A custom endpoint (S3), such as `http://127.0.0.1:9000`.
    pub(crate) endpoint: Option<String>,
    /// S3 credentials that come from the instance metadata service: the check asks for
    /// them first, so that their absence is told as such.
    pub(crate) instance_credentials: Option<AwsCredentialProvider>,
    /// A `file://` store whose directory did not exist and was created by opening it.
    pub(crate) root_created: bool,
}

/// A setting of `builder` as a boolean, parsed as object_store parses it.
fn truthy(value: Option<String>) -> bool {
    value.is_some_and(|v| {
        matches!(
            v.to_ascii_lowercase().as_str(),
            "1" | "true" | "on" | "yes" | "y"
        )
    })
}

/// Whether an environment variable is set to a true value.
pub(crate) fn env_truthy(name: &str) -> bool {
    truthy(std::env::var(name).ok())
}

/// Where the credentials of an S3 store will come from, in object_store's order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum S3Credentials {
    /// Given (keys, web identity, container credentials), or not needed (unsigned).
    Configured,
    /// The instance metadata service, the fallback when nothing is configured.
    InstanceMetadata,
}

/// Checks the settings of an S3 store before it is built: a plain-HTTP endpoint must be
/// allowed, and with no credentials configured the instance metadata service must not be
/// disabled (`AWS_EC2_METADATA_DISABLED`, the AWS SDKs' variable).
pub(crate) fn check_s3_settings(
    url: &str,
    builder: &AmazonS3Builder,
    metadata_disabled: bool,
) -> Result<(Option<String>, S3Credentials), Unusable> {
    let get = |key: AmazonS3ConfigKey| builder.get_config_value(&key);
    let endpoint = get(AmazonS3ConfigKey::S3Endpoint).or_else(|| get(AmazonS3ConfigKey::Endpoint));
    if let Some(e) = &endpoint
        && e.get(..7)
            .is_some_and(|s| s.eq_ignore_ascii_case("http://"))
        && !truthy(get(AmazonS3ConfigKey::Client(ClientConfigKey::AllowHttp)))
    {
        return Err(Unusable::HttpNotAllowed {
            url: url.to_owned(),
            endpoint: e.clone(),
        });
    }
    let configured = get(AmazonS3ConfigKey::AccessKeyId).is_some()
        || get(AmazonS3ConfigKey::SecretAccessKey).is_some()
        || (get(AmazonS3ConfigKey::WebIdentityTokenFile).is_some()
            && get(AmazonS3ConfigKey::RoleArn).is_some())
        || get(AmazonS3ConfigKey::ContainerCredentialsRelativeUri).is_some()
        || (get(AmazonS3ConfigKey::ContainerCredentialsFullUri).is_some()
            && get(AmazonS3ConfigKey::ContainerAuthorizationTokenFile).is_some())
        || truthy(get(AmazonS3ConfigKey::SkipSignature));
    if configured {
        return Ok((endpoint, S3Credentials::Configured));
    }
    if metadata_disabled {
        return Err(Unusable::NoCredentials {
            url: url.to_owned(),
            tried: "the environment; the instance metadata service is disabled by AWS_EC2_METADATA_DISABLED",
            source: None,
        });
    }
    Ok((endpoint, S3Credentials::InstanceMetadata))
}

/// Whether the server at `endpoint` (an `https://` URL) speaks plain HTTP on its port: it
/// answers a plain HTTP request with an HTTP status line. Returns the endpoint's
/// `host:port` if so.
pub(crate) async fn answers_plain_http(endpoint: &str) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let url = url::Url::parse(endpoint).ok()?;
    if url.scheme() != "https" {
        return None;
    }
    let host = url.host_str()?.to_owned();
    let port = url.port_or_known_default()?;
    let authority = format!("{host}:{port}");
    let talk = async {
        let mut stream = tokio::net::TcpStream::connect((host.as_str(), port))
            .await
            .ok()?;
        let request = format!("HEAD / HTTP/1.0\r\nHost: {host}\r\n\r\n");
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut head = [0u8; 5];
        stream.read_exact(&mut head).await.ok()?;
        Some(&head == b"HTTP/")
    };
    match tokio::time::timeout(Duration::from_secs(5), talk).await {
        Ok(Some(true)) => Some(authority),
        _ => None,
    }
}

/// Whether `error` is a failure to connect (where a TLS handshake fails).
pub(crate) fn is_connect_failure(error: &Error) -> bool {
    let mut next: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = next {
        if let Some(http) = e.downcast_ref::<object_store::client::HttpError>() {
            return http.kind() == object_store::client::HttpErrorKind::Connect;
        }
        next = e.source();
    }
    false
}
