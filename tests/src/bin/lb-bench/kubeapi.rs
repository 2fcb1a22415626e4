//! The real kube-apiserver (with etcd from Debian) in the rig's client
//! namespace, for figure 4 on the Kubernetes source. The binary comes from
//! `../shared/k8s/kube-apiserver.zst` beside the project (unpacked once
//! into `target/k8s`); etcd is installed with apt-get when missing. The
//! agent authenticates as `system:kube-proxy`, whose built-in binding
//! gives it exactly kube-proxy's rights.

use std::{
    fs,
    os::fd::AsFd as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use futures::{StreamExt as _, TryStreamExt as _};
use k8s_openapi::api::{
    core::v1::{Namespace, Node, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    api::{Patch, PatchParams},
    Api, Client,
};
use nix::sched::{setns, CloneFlags};
use serde_json::Value;

/// Where the API server listens: the client namespace, on the fabric.
pub const ADDR: &str = "10.99.0.100:6443";
/// The token the bench itself uses (group `system:masters`).
const ADMIN_TOKEN: &str = "lb-bench-admin";
/// The agent's token (user `system:kube-proxy`).
const PROXY_TOKEN: &str = "lb-bench-proxy";

/// A work item for the client thread.
type Job = Box<dyn FnOnce(&tokio::runtime::Runtime, &Client) + Send>;

/// etcd and kube-apiserver running, and a client thread in their namespace.
pub struct RealApi {
    children: Vec<Child>,
    /// A kubeconfig for the agent.
    pub kubeconfig: PathBuf,
    jobs: Option<mpsc::Sender<Job>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for RealApi {
    fn drop(&mut self) {
        self.jobs = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        for c in self.children.iter_mut().rev() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Runs `cmd`; `Err` carries its standard error.
pub fn run(cmd: &mut Command) -> Result<(), String> {
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// A Kubernetes binary (`kube-apiserver`, `kube-proxy`), unpacked once from
/// `../shared/k8s/NAME.zst` beside the project into `target/k8s`.
pub fn k8s_bin(name: &str) -> Result<PathBuf, String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let packed = root.join(format!("../shared/k8s/{name}.zst"));
    if !packed.exists() {
        return Err(format!("{} is absent", packed.display()));
    }
    let dir = root.join("target/k8s");
    let bin = dir.join(name);
    if !bin.exists() {
        fs::create_dir_all(&dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
        let tmp = dir.join(format!("{name}.tmp"));
        run(Command::new("zstd")
            .args(["-q", "-f", "-d", "-o"])
            .arg(&tmp)
            .arg(&packed))?;
        run(Command::new("chmod").arg("+x").arg(&tmp))?;
        fs::rename(&tmp, &bin).map_err(|e| format!("rename {}: {e}", tmp.display()))?;
    }
    Ok(bin)
}

/// The program at `path`, after installing Debian's `package` (apt-get,
/// updating the package lists only if the first try fails) when it is
/// missing.
pub fn debian_bin(path: &str, package: &str) -> Result<PathBuf, String> {
    let found = || Path::new(path).exists().then(|| PathBuf::from(path));
    if let Some(p) = found() {
        return Ok(p);
    }
    eprintln!("bench: installing {package} (apt-get) for {path}");
    let install = || run(Command::new("apt-get").args(["install", "-y", "-q", package]));
    install().or_else(|_| {
        run(Command::new("apt-get").args(["update", "-q"]))?;
        install()
    })?;
    found().ok_or_else(|| format!("{package} installed no {path}"))
}

/// A CA, the server's certificate for `ip`, and the service account keys.
fn certificates(dir: &Path, ip: &str) -> Result<(), String> {
    let o = |args: &[&str]| run(Command::new("openssl").current_dir(dir).args(args));
    o(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "2",
        "-subj",
        "/CN=lb-bench-ca",
    ])?;
    o(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=kube-apiserver",
    ])?;
    fs::write(
        dir.join("san.ext"),
        format!("subjectAltName=IP:{ip},IP:127.0.0.1,DNS:localhost\n"),
    )
    .map_err(|e| e.to_string())?;
    o(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.crt",
        "-days",
        "2",
        "-extfile",
        "san.ext",
    ])?;
    o(&["genrsa", "-out", "sa.key", "2048"])?;
    o(&["rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub"])
}

fn kubeconfig(ca: &Path, token: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n  - name: bench\n    cluster: {{server: 'https://{ADDR}', certificate-authority: '{}'}}\nusers:\n  - name: bench\n    user: {{token: {token}}}\ncontexts:\n  - name: bench\n    context: {{cluster: bench, user: bench}}\ncurrent-context: bench\n",
        ca.display()
    )
}

impl RealApi {
    /// Starts etcd and kube-apiserver in namespace `ns`, files under
    /// `dir`; `Err` says why the real server cannot be used here.
    pub fn start(ns: &str, dir: &Path) -> Result<Self, String> {
        let apiserver = k8s_bin("kube-apiserver")?;
        let etcd = debian_bin("/usr/bin/etcd", "etcd-server")?;
        let dir = dir.join("kube-apiserver");
        fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let ip = ADDR.split(':').next().unwrap_or_default();
        certificates(&dir, ip)?;
        fs::write(
            dir.join("tokens.csv"),
            format!(
                "{ADMIN_TOKEN},lb-bench,lb-bench,\"system:masters\"\n{PROXY_TOKEN},system:kube-proxy,kube-proxy,\n"
            ),
        )
        .map_err(|e| e.to_string())?;
        let log = |name: &str| {
            fs::File::create(dir.join(name))
                .map(Stdio::from)
                .map_err(|e| e.to_string())
        };
        let mut api = Self {
            children: Vec::new(),
            kubeconfig: dir.join("kubeconfig"),
            jobs: None,
            thread: None,
        };
        api.children.push(
            Command::new("ip")
                .args(["netns", "exec", ns])
                .arg(&etcd)
                .arg("--data-dir")
                .arg(dir.join("etcd"))
                .args([
                    "--listen-client-urls=http://127.0.0.1:2379",
                    "--advertise-client-urls=http://127.0.0.1:2379",
                    "--listen-peer-urls=http://127.0.0.1:2380",
                    "--initial-cluster=default=http://127.0.0.1:2380",
                    "--initial-advertise-peer-urls=http://127.0.0.1:2380",
                ])
                .stdout(log("etcd.log")?)
                .stderr(log("etcd.err")?)
                .spawn()
                .map_err(|e| format!("start etcd: {e}"))?,
        );
        let file = |name: &str| dir.join(name).display().to_string();
        api.children.push(
            Command::new("ip")
                .args(["netns", "exec", ns])
                .arg(&apiserver)
                .args([
                    "--etcd-servers=http://127.0.0.1:2379".to_owned(),
                    format!("--bind-address={ip}"),
                    "--secure-port=6443".to_owned(),
                    format!("--advertise-address={ip}"),
                    format!("--tls-cert-file={}", file("server.crt")),
                    format!("--tls-private-key-file={}", file("server.key")),
                    format!("--client-ca-file={}", file("ca.crt")),
                    format!("--token-auth-file={}", file("tokens.csv")),
                    "--authorization-mode=Node,RBAC".to_owned(),
                    "--service-cluster-ip-range=10.96.0.0/16".to_owned(),
                    // Figure 2's NodePorts are 20000 and up, one per Service.
                    "--service-node-port-range=20000-32767".to_owned(),
                    "--endpoint-reconciler-type=none".to_owned(),
                    "--service-account-issuer=https://kubernetes.default.svc.cluster.local"
                        .to_owned(),
                    format!("--service-account-key-file={}", file("sa.pub")),
                    format!("--service-account-signing-key-file={}", file("sa.key")),
                    "--api-audiences=https://kubernetes.default.svc.cluster.local".to_owned(),
                ])
                .stdout(log("apiserver.log")?)
                .stderr(log("apiserver.err")?)
                .spawn()
                .map_err(|e| format!("start kube-apiserver: {e}"))?,
        );
        let ca = dir.join("ca.crt");
        fs::write(&api.kubeconfig, kubeconfig(&ca, PROXY_TOKEN)).map_err(|e| e.to_string())?;
        let admin = dir.join("admin.kubeconfig");
        fs::write(&admin, kubeconfig(&ca, ADMIN_TOKEN)).map_err(|e| e.to_string())?;

        // The client runs on a thread inside the namespace, so that its
        // sockets are made there.
        let (tx, rx) = mpsc::channel::<Job>();
        let (ready_tx, ready_rx) = mpsc::channel::<Result<(), String>>();
        let ns_path = Path::new("/var/run/netns").join(ns);
        api.thread = Some(std::thread::spawn(move || {
            let setup = (|| {
                let f = fs::File::open(&ns_path).map_err(|e| e.to_string())?;
                setns(f.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|e| e.to_string())?;
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| e.to_string())?;
                let client = rt.block_on(async {
                    let kc =
                        kube::config::Kubeconfig::read_from(&admin).map_err(|e| e.to_string())?;
                    let config = kube::Config::from_custom_kubeconfig(kc, &Default::default())
                        .await
                        .map_err(|e| e.to_string())?;
                    Client::try_from(config).map_err(|e| e.to_string())
                })?;
                Ok::<_, String>((rt, client))
            })();
            let (rt, client) = match setup {
                Ok(v) => {
                    let _ = ready_tx.send(Ok(()));
                    v
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            while let Ok(job) = rx.recv() {
                job(&rt, &client);
            }
        }));
        ready_rx
            .recv()
            .map_err(|_| "client thread died".to_owned())??;
        api.jobs = Some(tx);
        // Ready in 5–15 s on this machine.
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let ok = api.call(|rt, client| {
                rt.block_on(async {
                    let req = hyper::Request::get("/readyz")
                        .body(Vec::new())
                        .map_err(|e| e.to_string())?;
                    client.request_text(req).await.map_err(|e| e.to_string())
                })
            });
            if ok.as_deref().map(str::trim) == Ok("ok") {
                break;
            }
            if Instant::now() > deadline {
                let err = fs::read_to_string(dir.join("apiserver.err")).unwrap_or_default();
                let tail: String = err.lines().rev().take(5).collect::<Vec<_>>().join(" | ");
                return Err(format!(
                    "kube-apiserver not ready in 120 s ({ok:?}): {tail}"
                ));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        api.apply_all(vec![
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: test}\n".to_owned(),
        ])?;
        Ok(api)
    }

    /// Runs `f` on the client thread and returns what it returns.
    fn call<T: Send + 'static>(
        &self,
        f: impl FnOnce(&tokio::runtime::Runtime, &Client) -> T + Send + 'static,
    ) -> T {
        let (tx, rx) = mpsc::channel();
        let jobs = self.jobs.as_ref().expect("client thread running");
        jobs.send(Box::new(move |rt, client| {
            let _ = tx.send(f(rt, client));
        }))
        .expect("client thread running");
        rx.recv().expect("client thread answers")
    }

    /// Creates or updates every object (YAML, one document each: Namespace,
    /// Service, EndpointSlice or Node, whose status is written too),
    /// several at a time; returns once the API has answered for all.
    pub fn apply_all(&self, manifests: Vec<String>) -> Result<(), String> {
        self.call(move |rt, client| {
            rt.block_on(async {
                futures::stream::iter(manifests.into_iter().map(|m| {
                    let client = client.clone();
                    async move { apply(client, &m).await }
                }))
                .buffer_unordered(16)
                .try_collect::<Vec<()>>()
                .await
                .map(drop)
            })
        })
    }
}

/// Server-side apply of one object.
async fn apply(client: Client, manifest: &str) -> Result<(), String> {
    let value: Value = serde_yaml::from_str(manifest).map_err(|e| e.to_string())?;
    let name = value["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let ns = value["metadata"]["namespace"]
        .as_str()
        .unwrap_or("default")
        .to_owned();
    let pp = PatchParams::apply("lb-bench").force();
    let err = |e: kube::Error| format!("apply {name}: {e}");
    match value["kind"].as_str() {
        Some("Namespace") => {
            Api::<Namespace>::all(client)
                .patch(&name, &pp, &Patch::Apply(&value))
                .await
                .map_err(err)?;
        }
        Some("Service") => {
            Api::<Service>::namespaced(client, &ns)
                .patch(&name, &pp, &Patch::Apply(&value))
                .await
                .map_err(err)?;
        }
        Some("EndpointSlice") => {
            Api::<EndpointSlice>::namespaced(client, &ns)
                .patch(&name, &pp, &Patch::Apply(&value))
                .await
                .map_err(err)?;
        }
        Some("Node") => {
            let api = Api::<Node>::all(client);
            api.patch(&name, &pp, &Patch::Apply(&value))
                .await
                .map_err(err)?;
            api.patch_status(&name, &pp, &Patch::Apply(&value))
                .await
                .map_err(err)?;
        }
        other => return Err(format!("apply {name}: kind {other:?} not handled")),
    }
    Ok(())
}
