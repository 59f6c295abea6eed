//! The management API's client: the CLI's way to a daemon and a daemon's way to another.
//! One HTTP/1.1 request per connection, over [`crate::transport`], with JSON bodies of the
//! types in `ferry_api::host`; errors come back as the daemon's `ErrorBody`.

use std::time::Duration;

use ferry_api::host::ErrorBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::transport::{self, ClientTls, Conn, Endpoint};

/// The header that carries a side's cluster document version.
pub const CLUSTER_VERSION: &str = "ferry-cluster-version";

/// How long a plain request may take.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the ferry daemon at {to} (is `ferry host run` running there?)")]
    Connect {
        to: String,
        #[source]
        source: std::io::Error,
    },
    #[error("talking to the ferry daemon at {to}")]
    Http {
        to: String,
        #[source]
        source: hyper::Error,
    },
    #[error("{}", .body.error)]
    Api { status: u16, body: ErrorBody },
    #[error("the daemon at {to} answered something that is not {what}: {msg}")]
    Decode {
        to: String,
        what: &'static str,
        msg: String,
    },
    #[error("the daemon at {to} did not answer within {timeout:?}")]
    Timeout { to: String, timeout: Duration },
    #[error("console connection to {to}")]
    WebSocket {
        to: String,
        #[source]
        source: Box<tokio_tungstenite::tungstenite::Error>,
    },
}

impl ClientError {
    /// The HTTP status of an error answer.
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Api { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// The error body's code (`not_found`, `busy`, ...).
    pub fn code(&self) -> Option<&str> {
        match self {
            ClientError::Api { body, .. } => Some(&body.code),
            _ => None,
        }
    }

    /// Whether the daemon could not be reached at all (as opposed to answering no).
    pub fn unreachable(&self) -> bool {
        matches!(
            self,
            ClientError::Connect { .. } | ClientError::Http { .. } | ClientError::Timeout { .. }
        )
    }
}

/// A client of one daemon.
#[derive(Debug, Clone)]
pub struct Client {
    to: Endpoint,
    tls: Option<ClientTls>,
    timeout: Duration,
    /// Sent as `ferry-cluster-version` with every request, so the daemon can see this side
    /// has a newer cluster document.
    cluster_version: Option<u64>,
}

impl Client {
    /// A client of `to` (plain TCP, or the local socket).
    pub fn new(to: Endpoint) -> Client {
        Client {
            to,
            tls: None,
            timeout: REQUEST_TIMEOUT,
            cluster_version: None,
        }
    }

    /// A client of `to` over mutual TLS.
    pub fn with_tls(to: Endpoint, tls: Option<ClientTls>) -> Client {
        Client {
            tls,
            ..Client::new(to)
        }
    }

    /// Tell the other side which cluster document this side has.
    pub fn with_cluster_version(mut self, v: u64) -> Client {
        self.cluster_version = Some(v);
        self
    }

    /// With another per-request timeout.
    pub fn with_timeout(mut self, t: Duration) -> Client {
        self.timeout = t;
        self
    }

    pub fn endpoint(&self) -> &Endpoint {
        &self.to
    }

    async fn conn(&self) -> Result<Conn, ClientError> {
        transport::connect(&self.to, self.tls.as_ref())
            .await
            .map_err(|source| ClientError::Connect {
                to: self.to.to_string(),
                source,
            })
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<hyper::Response<Incoming>, ClientError> {
        let http = |source| ClientError::Http {
            to: self.to.to_string(),
            source,
        };
        let conn = self.conn().await?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(conn))
            .await
            .map_err(http)?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, "ferry");
        if let Some(v) = self.cluster_version {
            req = req.header(CLUSTER_VERSION, v.to_string());
        }
        if body.is_some() {
            req = req.header(hyper::header::CONTENT_TYPE, "application/json");
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| ClientError::Decode {
                to: self.to.to_string(),
                what: "a request",
                msg: e.to_string(),
            })?;
        sender.send_request(req).await.map_err(http)
    }

    async fn call<R: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
        what: &'static str,
    ) -> Result<R, ClientError> {
        let timeout = self.timeout;
        let fut = async {
            let resp = self.send(method, path, body).await?;
            let status = resp.status();
            let bytes = resp
                .into_body()
                .collect()
                .await
                .map_err(|source| ClientError::Http {
                    to: self.to.to_string(),
                    source,
                })?
                .to_bytes();
            decode(&self.to, status, &bytes, what)
        };
        tokio::time::timeout(timeout, fut)
            .await
            .map_err(|_| ClientError::Timeout {
                to: self.to.to_string(),
                timeout,
            })?
    }

    /// `GET path`.
    pub async fn get<R: DeserializeOwned>(&self, path: &str) -> Result<R, ClientError> {
        self.call(Method::GET, path, None, std::any::type_name::<R>())
            .await
    }

    /// `POST path` with a JSON body.
    pub async fn post<B: Serialize, R: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<R, ClientError> {
        let b = serde_json::to_vec(body).unwrap_or_default();
        self.call(Method::POST, path, Some(b), std::any::type_name::<R>())
            .await
    }

    /// `PATCH path` with a JSON body.
    pub async fn patch<B: Serialize, R: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<R, ClientError> {
        let b = serde_json::to_vec(body).unwrap_or_default();
        self.call(Method::PATCH, path, Some(b), std::any::type_name::<R>())
            .await
    }

    /// `PUT path` with a JSON body.
    pub async fn put<B: Serialize, R: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<R, ClientError> {
        let b = serde_json::to_vec(body).unwrap_or_default();
        self.call(Method::PUT, path, Some(b), std::any::type_name::<R>())
            .await
    }

    /// `DELETE path`, answered with a JSON `R`.
    pub async fn delete_json<R: DeserializeOwned>(&self, path: &str) -> Result<R, ClientError> {
        self.call(Method::DELETE, path, None, std::any::type_name::<R>())
            .await
    }

    /// `DELETE path`.
    pub async fn delete(&self, path: &str) -> Result<(), ClientError> {
        let _: serde_json::Value = self.call(Method::DELETE, path, None, "nothing").await?;
        Ok(())
    }

    /// `METHOD path` with a raw JSON body, answered as it comes: the status, the headers and a
    /// body still streaming (an event stream stays open). The web console passes a browser's
    /// API calls through this; the timeout covers the answer's head only.
    pub async fn forward(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<hyper::Response<Incoming>, ClientError> {
        tokio::time::timeout(self.timeout, self.send(method, path, body))
            .await
            .map_err(|_| ClientError::Timeout {
                to: self.to.to_string(),
                timeout: self.timeout,
            })?
    }

    /// Follow `path` as server-sent events, each one a JSON `R`.
    pub async fn events<R: DeserializeOwned>(&self, path: &str) -> Result<Events<R>, ClientError> {
        let resp = tokio::time::timeout(self.timeout, self.send(Method::GET, path, None))
            .await
            .map_err(|_| ClientError::Timeout {
                to: self.to.to_string(),
                timeout: self.timeout,
            })??;
        let status = resp.status();
        if !status.is_success() {
            let bytes = resp
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            return Err(
                decode::<serde_json::Value>(&self.to, status, &bytes, "events")
                    .err()
                    .unwrap_or(ClientError::Decode {
                        to: self.to.to_string(),
                        what: "an event stream",
                        msg: format!("status {status}"),
                    }),
            );
        }
        Ok(Events {
            body: resp.into_body(),
            buf: String::new(),
            to: self.to.to_string(),
            _t: std::marker::PhantomData,
        })
    }

    /// Open `path` as a WebSocket (a VM's console).
    pub async fn websocket(
        &self,
        path: &str,
    ) -> Result<tokio_tungstenite::WebSocketStream<Conn>, ClientError> {
        let conn = self.conn().await?;
        let url = format!("ws://ferry{path}");
        match tokio_tungstenite::client_async(url, conn).await {
            Ok((ws, _)) => Ok(ws),
            Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
                let status = resp.status();
                let body = resp.body().clone().unwrap_or_default();
                Err(
                    decode::<serde_json::Value>(&self.to, status, &body, "console")
                        .err()
                        .unwrap_or(ClientError::Decode {
                            to: self.to.to_string(),
                            what: "a console",
                            msg: format!("status {status}"),
                        }),
                )
            }
            Err(e) => Err(ClientError::WebSocket {
                to: self.to.to_string(),
                source: Box::new(e),
            }),
        }
    }
}

fn decode<R: DeserializeOwned>(
    to: &Endpoint,
    status: StatusCode,
    bytes: &[u8],
    what: &'static str,
) -> Result<R, ClientError> {
    if !status.is_success() {
        let body = serde_json::from_slice::<ErrorBody>(bytes).unwrap_or_else(|_| ErrorBody {
            error: format!("HTTP {status}: {}", String::from_utf8_lossy(bytes).trim()),
            code: format!("http_{}", status.as_u16()),
            check: None,
        });
        return Err(ClientError::Api {
            status: status.as_u16(),
            body,
        });
    }
    let bytes = if bytes.is_empty() { b"null" } else { bytes };
    serde_json::from_slice(bytes).map_err(|e| ClientError::Decode {
        to: to.to_string(),
        what,
        msg: e.to_string(),
    })
}

/// A stream of server-sent events.
pub struct Events<R> {
    body: Incoming,
    buf: String,
    to: String,
    _t: std::marker::PhantomData<R>,
}

impl<R: DeserializeOwned> Events<R> {
    /// The next event; `None` when the daemon ends the stream.
    pub async fn next(&mut self) -> Option<Result<R, ClientError>> {
        loop {
            if let Some(end) = self.buf.find("\n\n") {
                let event: String = self.buf.drain(..end + 2).collect();
                let data: Vec<&str> = event
                    .lines()
                    .filter_map(|l| l.strip_prefix("data:"))
                    .map(|d| d.strip_prefix(' ').unwrap_or(d))
                    .collect();
                if data.is_empty() {
                    continue; // a comment or keep-alive
                }
                return Some(serde_json::from_str(&data.join("\n")).map_err(|e| {
                    ClientError::Decode {
                        to: self.to.clone(),
                        what: "an event",
                        msg: e.to_string(),
                    }
                }));
            }
            match self.body.frame().await {
                None => return None,
                Some(Err(source)) => {
                    return Some(Err(ClientError::Http {
                        to: self.to.clone(),
                        source,
                    }))
                }
                Some(Ok(f)) => {
                    if let Ok(d) = f.into_data() {
                        self.buf.push_str(&String::from_utf8_lossy(&d));
                    }
                }
            }
        }
    }
}
