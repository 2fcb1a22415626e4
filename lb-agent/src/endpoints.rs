//! The agent's own HTTP endpoints, on one small hyper server shape:
//! `/metrics` on `--metrics-addr`, `/healthz`, `/livez` and `/readyz` on
//! `--health-addr`, and the healthCheckNodePort servers of [`crate::health`].
//!
//! Each listener binds exactly the address it is given (no dual-stack
//! widening, no fallback to another address), so the flags say where the
//! agent listens and nowhere else.

use std::{
    convert::Infallible,
    future::Future,
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use anyhow::{Context as _, Result};
use http_body_util::Full;
use hyper::{body::Bytes, header, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{net::TcpListener, task::JoinHandle};
use tracing::debug;

use crate::{health::AgentHealth, metrics::Metrics};

/// A slow client gets this long to send its request headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// Whether the agent has finished its first full sync: `/readyz` answers 200
/// from then on. Clones share the flag; every source of desired state (the
/// manifests folder, the Kubernetes API) calls [`Readiness::set_ready`] once
/// its first full sync has reached the maps.
#[derive(Clone, Debug, Default)]
pub struct Readiness(Arc<AtomicBool>);

impl Readiness {
    /// Marks the first full sync as done.
    pub fn set_ready(&self) {
        self.0.store(true, Ordering::Release);
    }

    /// Whether the first full sync is done.
    pub fn is_ready(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

/// One HTTP answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    /// Status code.
    pub status: u16,
    /// `Content-Type` header.
    pub content_type: &'static str,
    /// Body.
    pub body: String,
}

impl Reply {
    /// A plain-text answer.
    pub fn text(status: u16, body: impl Into<String>) -> Self {
        Self {
            status,
            content_type: "text/plain; charset=utf-8",
            body: body.into(),
        }
    }
}

/// Binds `addr` for the flag named `flag`, with an error that says which.
/// Must run inside the tokio runtime.
pub fn bind(flag: &str, addr: SocketAddr) -> Result<TcpListener> {
    let listener = std::net::TcpListener::bind(addr)
        .with_context(|| format!("{flag} {addr}: cannot listen (address in use or not local?)"))?;
    listener
        .set_nonblocking(true)
        .with_context(|| format!("{flag} {addr}"))?;
    TcpListener::from_std(listener).with_context(|| format!("{flag} {addr}"))
}

/// Serves `handler` (request path → reply) on `listener` until the returned
/// task is aborted.
pub fn spawn<F, Fut>(listener: TcpListener, handler: F) -> JoinHandle<()>
where
    F: Fn(String) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Reply> + Send + 'static,
{
    tokio::spawn(async move {
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors and the like: back off, go on.
                    debug!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let handler = handler.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req: Request<_>| {
                    let reply = handler(req.uri().path().to_string());
                    async move { Ok::<_, Infallible>(response(reply.await)) }
                });
                // One request per connection: health checkers and scrapers
                // reconnect anyway, and no idle connection outlives a
                // listener that was closed.
                if let Err(e) = hyper::server::conn::http1::Builder::new()
                    .keep_alive(false)
                    .timer(TokioTimer::new())
                    .header_read_timeout(HEADER_TIMEOUT)
                    .serve_connection(TokioIo::new(stream), service)
                    .await
                {
                    debug!("HTTP connection ended: {e}");
                }
            });
        }
    })
}

fn response(reply: Reply) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(reply.body)));
    *resp.status_mut() =
        StatusCode::from_u16(reply.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(reply.content_type),
    );
    resp.headers_mut().insert(
        header::HeaderName::from_static("x-content-type-options"),
        header::HeaderValue::from_static("nosniff"),
    );
    resp
}

/// What `--health-addr` answers: `/healthz` as load balancers read it
/// (see [`AgentHealth::healthz`]), `/livez` 200 while the process serves,
/// `/readyz` 200 once the first full sync is done and 503 before.
pub fn health_reply(path: &str, ready: &Readiness, health: &AgentHealth) -> Reply {
    match path {
        "/healthz" => health.healthz(),
        "/livez" => health.livez(),
        "/readyz" if ready.is_ready() => Reply::text(200, "ready\n"),
        "/readyz" => Reply::text(503, "not ready: first sync not done\n"),
        _ => Reply::text(404, "not found: try /healthz, /livez or /readyz\n"),
    }
}

/// What `--metrics-addr` answers: the Prometheus text on `/metrics`. The
/// maps are read on a blocking thread, so a scrape never stalls the run
/// loop.
pub async fn metrics_reply(path: String, metrics: Arc<Metrics>) -> Reply {
    if path != "/metrics" {
        return Reply::text(404, "not found: try /metrics\n");
    }
    match tokio::task::spawn_blocking(move || metrics.render()).await {
        Ok(Ok(body)) => Reply {
            status: 200,
            content_type: prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
            body,
        },
        Ok(Err(e)) => Reply::text(500, format!("encoding metrics failed: {e:#}\n")),
        Err(e) => Reply::text(500, format!("metrics task failed: {e}\n")),
    }
}

/// Serves `/healthz`, `/livez` and `/readyz` on `addr`.
pub fn serve_health(
    addr: SocketAddr,
    ready: Readiness,
    health: AgentHealth,
) -> Result<JoinHandle<()>> {
    let listener = bind("--health-addr", addr)?;
    Ok(spawn(listener, move |path| {
        let reply = health_reply(&path, &ready, &health);
        async move { reply }
    }))
}

/// Serves `/metrics` on `addr`.
pub fn serve_metrics(addr: SocketAddr, metrics: Arc<Metrics>) -> Result<JoinHandle<()>> {
    let listener = bind("--metrics-addr", addr)?;
    Ok(spawn(listener, move |path| {
        metrics_reply(path, metrics.clone())
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readyz_turns_200_after_the_first_sync_and_livez_is_always_200() {
        let ready = Readiness::default();
        let health = AgentHealth::new(crate::health::DEFAULT_TIMEOUT);
        let get = |path: &str, ready: &Readiness| health_reply(path, ready, &health).status;
        assert_eq!(get("/healthz", &ready), 200);
        assert_eq!(get("/livez", &ready), 200);
        assert_eq!(get("/readyz", &ready), 503);
        assert_eq!(get("/other", &ready), 404);
        ready.clone().set_ready();
        assert_eq!(get("/readyz", &ready), 200);
        health.failed();
        assert_eq!(get("/healthz", &ready), 503);
        assert_eq!(get("/livez", &ready), 200);
    }

    #[test]
    fn a_served_handler_answers_over_http() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let listener = bind("--test", "127.0.0.1:0".parse().expect("addr")).expect("bind");
            let addr = listener.local_addr().expect("addr");
            let ready = Readiness::default();
            let r = ready.clone();
            let health = AgentHealth::new(crate::health::DEFAULT_TIMEOUT);
            let task = spawn(listener, move |path| {
                let reply = health_reply(&path, &r, &health);
                async move { reply }
            });
            let get = |path: &'static str| async move {
                use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
                let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
                s.write_all(
                    format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                        .as_bytes(),
                )
                .await
                .expect("send");
                let mut out = String::new();
                s.read_to_string(&mut out).await.expect("read");
                out
            };
            // Without `Connection: close` too: the server closes after answering.
            let get_keepalive = || async move {
                use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
                let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
                s.write_all(b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n")
                    .await
                    .expect("send");
                let mut out = String::new();
                s.read_to_string(&mut out).await.expect("read");
                out
            };
            assert!(get_keepalive().await.starts_with("HTTP/1.1 503 "));
            ready.set_ready();
            let ok = get("/readyz").await;
            assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
            assert!(ok.ends_with("ready\n"), "{ok}");
            task.abort();
        });
    }
}
