//! A small Kubernetes API server for tests: Services, EndpointSlices and
//! Nodes over the real list+watch protocol, and Events recorded as posted.
//!
//! It speaks what a client-go or kube-rs reflector uses: a list returns
//! the objects with the list's `resourceVersion`; `?watch=true&
//! resourceVersion=N` streams the changes after N as `ADDED`, `MODIFIED`
//! and `DELETED` events (one JSON object a line), with `BOOKMARK`s when
//! `allowWatchBookmarks` is set; a watch from a version older than the
//! retained history gets an `ERROR` event with a 410 `Status`, which makes
//! the client relist. `fieldSelector=metadata.name=X` filters (the agent
//! watches its own Node that way). Events are accepted on `POST
//! /apis/events.k8s.io/v1/namespaces/NS/events` and `/api/v1/…/events`.
//!
//! The server runs on its own thread with its socket made inside a
//! network namespace of the rig (plain HTTP), and can be stopped and
//! started again on the same address to simulate an API outage; its
//! objects survive that. Tests change objects with [`ApiServer::apply`]
//! and [`ApiServer::delete`].

use std::{
    collections::BTreeMap,
    convert::Infallible,
    fs,
    net::SocketAddr,
    os::fd::AsFd as _,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, MutexGuard},
    thread::JoinHandle,
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt as _, Full, StreamBody};
use hyper::{body::Frame, Method, Request, Response, StatusCode};
use nix::sched::{setns, CloneFlags};
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot, watch};

/// The three resources the agent watches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    /// `v1` Service (namespaced).
    Service,
    /// `discovery.k8s.io/v1` EndpointSlice (namespaced).
    EndpointSlice,
    /// `v1` Node (cluster-scoped).
    Node,
}

impl Kind {
    fn api_version(self) -> &'static str {
        match self {
            Self::Service | Self::Node => "v1",
            Self::EndpointSlice => "discovery.k8s.io/v1",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Service => "Service",
            Self::EndpointSlice => "EndpointSlice",
            Self::Node => "Node",
        }
    }

    /// The kind a manifest names.
    fn of(object: &Value) -> Option<Self> {
        match (object["apiVersion"].as_str()?, object["kind"].as_str()?) {
            ("v1", "Service") => Some(Self::Service),
            ("discovery.k8s.io/v1", "EndpointSlice") => Some(Self::EndpointSlice),
            ("v1", "Node") => Some(Self::Node),
            _ => None,
        }
    }

    /// The collection path of every namespace, as a reflector lists it.
    fn from_path(path: &str) -> Option<Self> {
        match path {
            "/api/v1/services" => Some(Self::Service),
            "/apis/discovery.k8s.io/v1/endpointslices" => Some(Self::EndpointSlice),
            "/api/v1/nodes" => Some(Self::Node),
            _ => None,
        }
    }
}

/// `(kind, namespace, name)`; the namespace is empty for Nodes.
type Key = (Kind, String, String);

/// One change, as watches replay it.
#[derive(Clone)]
struct Change {
    rv: u64,
    kind: Kind,
    type_: &'static str,
    object: Value,
}

#[derive(Default)]
struct State {
    /// The latest resourceVersion handed out.
    rv: u64,
    objects: BTreeMap<Key, Value>,
    history: Vec<Change>,
    /// Watches from a resourceVersion below this get 410 Gone.
    oldest: u64,
    events: Vec<Value>,
    /// Answer Event posts with 500 instead of recording them.
    refuse_events: bool,
    /// `METHOD path?query` of every request, in order.
    requests: Vec<String>,
    next_uid: u64,
}

/// What the server shares between the test thread and its own.
struct Shared {
    state: Mutex<State>,
    /// `(resourceVersion, epoch)`: watches wake on a new version and end on
    /// a new epoch.
    changed: watch::Sender<(u64, u64)>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panicking test thread must not hide the state from the others.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The running server thread.
struct Running {
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A test API server inside a network namespace; stops on drop.
pub struct ApiServer {
    shared: Arc<Shared>,
    ns: String,
    addr: SocketAddr,
    kubeconfig: PathBuf,
    running: Option<Running>,
}

impl ApiServer {
    /// Serves on `addr` inside network namespace `ns` and writes a
    /// kubeconfig pointing at it into `dir`.
    pub fn start(ns: &str, addr: SocketAddr, dir: &Path) -> Self {
        let (changed, _) = watch::channel((0, 0));
        let kubeconfig = dir.join("kubeconfig");
        fs::write(
            &kubeconfig,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n  - name: test\n    cluster: {{server: 'http://{addr}'}}\nusers:\n  - name: test\n    user: {{}}\ncontexts:\n  - name: test\n    context: {{cluster: test, user: test}}\ncurrent-context: test\n"
            ),
        )
        .expect("write kubeconfig");
        let mut server = Self {
            shared: Arc::new(Shared {
                state: Mutex::new(State::default()),
                changed,
            }),
            ns: ns.to_owned(),
            addr,
            kubeconfig,
            running: None,
        };
        server.resume();
        server
    }

    /// The kubeconfig file that points at this server.
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// Stops serving: the listener closes and every open connection (the
    /// agent's watches) is cut. Objects and history are kept.
    pub fn stop(&mut self) {
        self.running = None;
    }

    /// Serves again on the same address after [`ApiServer::stop`].
    pub fn resume(&mut self) {
        assert!(self.running.is_none(), "API server already running");
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = oneshot::channel();
        let shared = Arc::clone(&self.shared);
        let ns = self.ns.clone();
        let addr = self.addr;
        let thread = std::thread::spawn(move || {
            let listener = (|| {
                let path = Path::new("/var/run/netns").join(&ns);
                let file = fs::File::open(&path)?;
                setns(file.as_fd(), CloneFlags::CLONE_NEWNET)?;
                let l = std::net::TcpListener::bind(addr)?;
                l.set_nonblocking(true)?;
                Ok::<_, std::io::Error>(l)
            })();
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build();
            let (listener, rt) = match (listener, rt) {
                (Ok(l), Ok(rt)) => (l, rt),
                (Err(e), _) | (_, Err(e)) => {
                    let _ = ready_tx.send(Err(e.to_string()));
                    return;
                }
            };
            rt.block_on(async move {
                let listener = match tokio::net::TcpListener::from_std(listener) {
                    Ok(l) => l,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e.to_string()));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(()));
                tokio::select! {
                    () = accept_loop(listener, shared) => {}
                    _ = stop_rx => {}
                }
            });
            // Dropping the runtime aborts every connection task and closes
            // their sockets.
            rt.shutdown_timeout(Duration::from_secs(1));
        });
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => panic!("API server on {addr} in {}: {e}", self.ns),
            Err(_) => panic!("API server thread died"),
        }
        self.running = Some(Running {
            stop: Some(stop_tx),
            thread: Some(thread),
        });
    }

    /// Creates or replaces an object given as YAML or JSON (one document),
    /// as `kubectl apply` would; returns its new resourceVersion.
    pub fn apply(&self, manifest: &str) -> u64 {
        let mut object: Value = serde_yaml::from_str(manifest).expect("test manifest parses");
        let kind = Kind::of(&object).unwrap_or_else(|| panic!("not a watched kind: {manifest}"));
        let key = key_of(kind, &object);
        let mut st = self.shared.lock();
        st.rv += 1;
        let rv = st.rv;
        let (type_, uid) = match st.objects.get(&key) {
            Some(old) => ("MODIFIED", old["metadata"]["uid"].clone()),
            None => {
                st.next_uid += 1;
                ("ADDED", json!(format!("uid-{}", st.next_uid)))
            }
        };
        let meta = &mut object["metadata"];
        meta["resourceVersion"] = json!(rv.to_string());
        meta["uid"] = uid;
        if kind != Kind::Node && meta.get("namespace").is_none() {
            meta["namespace"] = json!("default");
        }
        st.objects.insert(key, object.clone());
        st.history.push(Change {
            rv,
            kind,
            type_,
            object,
        });
        drop(st);
        self.notify(rv, false);
        rv
    }

    /// Deletes an object; returns whether it existed.
    pub fn delete(&self, kind: Kind, namespace: &str, name: &str) -> bool {
        let mut st = self.shared.lock();
        let Some(mut object) = st
            .objects
            .remove(&(kind, namespace.to_owned(), name.to_owned()))
        else {
            return false;
        };
        st.rv += 1;
        let rv = st.rv;
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        st.history.push(Change {
            rv,
            kind,
            type_: "DELETED",
            object,
        });
        drop(st);
        self.notify(rv, false);
        true
    }

    /// Forgets the change history, as etcd compaction does, and ends every
    /// open watch; then applies `changes`. The clients' next watch starts
    /// from a version older than the history and gets 410 Gone, so
    /// `changes` reach them only through the relist that forces.
    pub fn expire_history(&self, changes: impl FnOnce(&Self)) {
        let mut st = self.shared.lock();
        // The next list returns at least this version, which a watch may
        // start from.
        st.rv += 1;
        st.oldest = st.rv;
        st.history.clear();
        let rv = st.rv;
        drop(st);
        self.notify(rv, true);
        changes(self);
    }

    fn notify(&self, rv: u64, end_watches: bool) {
        self.shared.changed.send_modify(|(v, epoch)| {
            *v = rv;
            if end_watches {
                *epoch += 1;
            }
        });
    }

    /// Makes Event posts fail with 500 (`true`) or succeed again.
    pub fn refuse_events(&self, refuse: bool) {
        self.shared.lock().refuse_events = refuse;
    }

    /// Every Event posted so far, as JSON.
    pub fn events(&self) -> Vec<Value> {
        self.shared.lock().events.clone()
    }

    /// `METHOD path?query` of every request so far.
    pub fn requests(&self) -> Vec<String> {
        self.shared.lock().requests.clone()
    }

    /// How many list (not watch) requests `kind` has had.
    pub fn lists(&self, kind: Kind) -> usize {
        self.requests()
            .iter()
            .filter(|r| {
                let (path, query) = r
                    .strip_prefix("GET ")
                    .unwrap_or_default()
                    .split_once('?')
                    .unwrap_or((r.strip_prefix("GET ").unwrap_or_default(), ""));
                Kind::from_path(path) == Some(kind)
                    && !query
                        .split('&')
                        .any(|p| p == "watch=true" || p == "watch=1")
            })
            .count()
    }
}

fn key_of(kind: Kind, object: &Value) -> Key {
    let meta = &object["metadata"];
    let namespace = if kind == Kind::Node {
        String::new()
    } else {
        meta["namespace"].as_str().unwrap_or("default").to_owned()
    };
    let name = meta["name"]
        .as_str()
        .expect("test object has metadata.name")
        .to_owned();
    (kind, namespace, name)
}

type Body = BoxBody<Bytes, Infallible>;

async fn accept_loop(listener: tokio::net::TcpListener, shared: Arc<Shared>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let shared = Arc::clone(&shared);
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let shared = Arc::clone(&shared);
                async move { Ok::<_, Infallible>(handle(req, &shared).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
        });
    }
}

/// Decodes `%XX` and `+` in a query component.
fn decode(s: &str) -> String {
    let mut out = Vec::with_capacity(s.len());
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => match u8::from_str_radix(&s[i + 1..i + 3], 16) {
                Ok(v) => {
                    out.push(v);
                    i += 3;
                    continue;
                }
                Err(_) => out.push(b'%'),
            },
            b'+' => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn json_response(status: StatusCode, body: &Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())).boxed())
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new()).boxed()))
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message, "reason": reason, "code": code,
    })
}

async fn handle(req: Request<hyper::body::Incoming>, shared: &Arc<Shared>) -> Response<Body> {
    let path = req.uri().path().to_owned();
    let query: BTreeMap<String, String> = req
        .uri()
        .query()
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k), decode(v))
        })
        .collect();
    shared.lock().requests.push(format!(
        "{} {}",
        req.method(),
        req.uri().path_and_query().map_or("", |p| p.as_str())
    ));
    if req.method() == Method::POST && path.ends_with("/events") {
        if shared.lock().refuse_events {
            return json_response(
                StatusCode::INTERNAL_SERVER_ERROR,
                &status(500, "InternalError", "events refused by the test"),
            );
        }
        let body = req.into_body().collect().await.map(|b| b.to_bytes());
        return match body
            .ok()
            .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
        {
            Some(event) => {
                shared.lock().events.push(event.clone());
                json_response(StatusCode::CREATED, &event)
            }
            None => json_response(
                StatusCode::BAD_REQUEST,
                &status(400, "BadRequest", "body is not JSON"),
            ),
        };
    }
    let Some(kind) = Kind::from_path(&path).filter(|_| req.method() == Method::GET) else {
        return json_response(
            StatusCode::NOT_FOUND,
            &status(
                404,
                "NotFound",
                &format!("{} {path} is not served here", req.method()),
            ),
        );
    };
    let name_filter = match query.get("fieldSelector").map(String::as_str) {
        None | Some("") => None,
        Some(sel) => match sel.strip_prefix("metadata.name=") {
            Some(name) if !name.contains(',') => Some(name.to_owned()),
            _ => {
                return json_response(
                    StatusCode::BAD_REQUEST,
                    &status(
                        400,
                        "BadRequest",
                        &format!("field selector {sel:?} not supported"),
                    ),
                )
            }
        },
    };
    let watching = matches!(query.get("watch").map(String::as_str), Some("true" | "1"));
    if !watching {
        let st = shared.lock();
        let items: Vec<Value> = st
            .objects
            .iter()
            .filter(|((k, _, name), _)| {
                *k == kind && name_filter.as_ref().is_none_or(|n| n == name)
            })
            .map(|(_, o)| o.clone())
            .collect();
        return json_response(
            StatusCode::OK,
            &json!({
                "kind": format!("{}List", kind.name()),
                "apiVersion": kind.api_version(),
                "metadata": {"resourceVersion": st.rv.to_string()},
                "items": items,
            }),
        );
    }
    let from: u64 = query
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let bookmarks = matches!(
        query.get("allowWatchBookmarks").map(String::as_str),
        Some("true" | "1")
    );
    let (tx, rx) = mpsc::channel::<Bytes>(64);
    tokio::spawn(stream_watch(
        Arc::clone(shared),
        kind,
        name_filter,
        from,
        bookmarks,
        tx,
    ));
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<_, Infallible>(Frame::data(b)), rx))
    });
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .body(StreamBody::new(stream).boxed())
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new()).boxed()))
}

/// How often an idle watch gets a bookmark.
const BOOKMARK_EVERY: Duration = Duration::from_millis(500);

/// Feeds one watch: history after `from`, then live changes, until the
/// client goes away, the epoch changes, or the history no longer covers it.
async fn stream_watch(
    shared: Arc<Shared>,
    kind: Kind,
    name: Option<String>,
    from: u64,
    bookmarks: bool,
    tx: mpsc::Sender<Bytes>,
) {
    let line = |v: Value| Bytes::from(format!("{v}\n"));
    let mut changed = shared.changed.subscribe();
    let epoch = changed.borrow_and_update().1;
    let mut last = from;
    loop {
        let scanned = {
            let st = shared.lock();
            if last < st.oldest {
                Err(status(
                    410,
                    "Expired",
                    &format!("too old resource version: {last} ({})", st.oldest),
                ))
            } else {
                let batch: Vec<Change> = st
                    .history
                    .iter()
                    .filter(|c| {
                        c.rv > last
                            && c.kind == kind
                            && name
                                .as_ref()
                                .is_none_or(|n| c.object["metadata"]["name"].as_str() == Some(n))
                    })
                    .cloned()
                    .collect();
                Ok((batch, st.rv))
            }
        };
        let (batch, current) = match scanned {
            Ok(v) => v,
            Err(gone) => {
                let _ = tx
                    .send(line(json!({"type": "ERROR", "object": gone})))
                    .await;
                return;
            }
        };
        for c in batch {
            if tx
                .send(line(json!({"type": c.type_, "object": c.object})))
                .await
                .is_err()
            {
                return;
            }
        }
        last = current;
        tokio::select! {
            r = changed.changed() => {
                if r.is_err() || changed.borrow_and_update().1 != epoch {
                    return;
                }
            }
            () = tokio::time::sleep(BOOKMARK_EVERY) => {
                if bookmarks {
                    let mark = json!({
                        "type": "BOOKMARK",
                        "object": {
                            "kind": kind.name(), "apiVersion": kind.api_version(),
                            "metadata": {"resourceVersion": last.to_string()},
                        },
                    });
                    if tx.send(line(mark)).await.is_err() {
                        return;
                    }
                }
            }
            () = tx.closed() => return,
        }
    }
}
