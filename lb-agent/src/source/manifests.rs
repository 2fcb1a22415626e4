//! The manifests folder: Services and EndpointSlices as Kubernetes YAML files.
//!
//! Every load reads the whole folder, so a reload after any change yields the
//! same objects as a fresh start. Bad documents become [`Problem`]s and are
//! skipped one by one: a typo in one manifest never hides the others.

use std::fs;
use std::io;
use std::path::Path;

use anyhow::Context as _;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use notify::event::{AccessKind, AccessMode};
use notify::{EventKind, RecursiveMode, Watcher as _};
use serde_yaml::Value;
use tokio::sync::mpsc;
use tracing::{debug, warn};

use crate::model::Problem;

/// The objects read from the manifests folder, and what could not be read.
#[derive(Clone, Debug, Default)]
pub struct Objects {
    /// Every `v1` `Service` document.
    pub services: Vec<Service>,
    /// Every `discovery.k8s.io/v1` `EndpointSlice` document.
    pub slices: Vec<EndpointSlice>,
    /// Files and documents that were skipped, and why.
    pub problems: Vec<Problem>,
}

/// Reads every `*.yaml`/`*.yml` file directly in `dir`, in name order.
///
/// Anything wrong inside a file is a [`Problem`] for that file or document.
///
/// # Errors
///
/// Only when `dir` itself cannot be listed.
pub fn load_dir(dir: &Path) -> io::Result<Objects> {
    let mut files = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if is_manifest_name(&name) {
            files.push((name, entry.path()));
        }
    }
    files.sort();

    let mut objects = Objects::default();
    for (name, path) in files {
        // `metadata` follows symlinks: a mounted ConfigMap is a folder of them.
        match fs::metadata(&path) {
            Ok(m) if !m.is_file() => {
                debug!(file = %name, "not a regular file; ignored");
                continue;
            }
            _ => {}
        }
        match fs::read_to_string(&path) {
            Ok(text) => load_file(&name, &text, &mut objects),
            Err(e) => objects.problems.push(Problem {
                object: format!("file {name}"),
                message: format!("cannot be read as UTF-8 text: {e}; file skipped"),
            }),
        }
    }
    Ok(objects)
}

/// True for names of manifest files, false for hidden files (editor swap and
/// lock files, a ConfigMap mount's `..data`) and backups such as `foo.yaml~`.
fn is_manifest_name(name: &str) -> bool {
    !name.starts_with('.')
        && Path::new(name)
            .extension()
            .is_some_and(|ext| ext == "yaml" || ext == "yml")
}

/// Reads the text of one manifest file named `name` exactly as
/// [`load_dir`] reads each file (what the fuzz tests feed).
pub fn load_text(name: &str, text: &str) -> Objects {
    let mut objects = Objects::default();
    load_file(name, text, &mut objects);
    objects
}

/// Adds the objects of one file, one document at a time.
fn load_file(name: &str, text: &str, objects: &mut Objects) {
    for doc in split_documents(text) {
        let object = format!("file {name} document {}", doc.number);
        if let Err(message) = load_document(&doc.text, objects) {
            objects.problems.push(Problem {
                object,
                message: format!("{message}; document skipped"),
            });
        }
    }
}

/// Adds one document to `objects`; `Err` says why it was skipped.
fn load_document(text: &str, objects: &mut Objects) -> Result<(), String> {
    let value: Value = serde_yaml::from_str(text).map_err(|e| format!("is not valid YAML: {e}"))?;
    let Value::Mapping(map) = &value else {
        if value.is_null() {
            return Ok(());
        }
        return Err("is not a YAML mapping (a Kubernetes object)".to_owned());
    };
    let field = |key: &str| match map.get(key) {
        None => Err(format!("has no {key}")),
        Some(Value::String(s)) => Ok(s.as_str()),
        Some(_) => Err(format!("{key} is not a string")),
    };
    let api_version = field("apiVersion")?;
    let kind = field("kind")?;
    // Deserializing from the text again, not from `value`, keeps serde_yaml's
    // field path and line number in the message.
    match (api_version, kind) {
        ("v1", "Service") => objects.services.push(
            serde_yaml::from_str(text).map_err(|e| format!("is not a valid v1 Service: {e}"))?,
        ),
        ("discovery.k8s.io/v1", "EndpointSlice") => {
            objects.slices.push(
                serde_yaml::from_str(text).map_err(|e| {
                    format!("is not a valid discovery.k8s.io/v1 EndpointSlice: {e}")
                })?,
            );
        }
        _ => {
            return Err(format!(
                "kind {kind:?} of apiVersion {api_version:?} is not read here \
                 (only v1 Service and discovery.k8s.io/v1 EndpointSlice)"
            ))
        }
    }
    Ok(())
}

/// One YAML document of a file.
struct Document {
    /// Numbered from 1 as a YAML parser counts them, including empty ones.
    number: usize,
    /// The document, preceded by blank lines so that parser errors give line
    /// numbers of the whole file.
    text: String,
}

/// Splits a YAML stream into documents without parsing it.
///
/// YAML forbids `---` and `...` at the start of a line inside any content, so
/// cutting there is exact, and a syntax error in one document then costs only
/// that document (a YAML parser stops at the first error of a stream).
/// Blank documents are left out.
fn split_documents(text: &str) -> Vec<Document> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut docs = Vec::new();
    let mut number = 0;
    // The document being collected: its text and whether a `---` opened it
    // (an explicit document counts even when empty).
    let mut current = String::new();
    let mut explicit = false;
    let mut flush = |current: &mut String, explicit: bool| {
        if explicit || !is_blank(current) {
            number += 1;
            if !is_blank(current) {
                docs.push(Document {
                    number,
                    text: std::mem::take(current),
                });
            }
        }
        current.clear();
    };
    for (i, line) in text.split_inclusive('\n').enumerate() {
        if let Some(rest) = marker(line, "---") {
            flush(&mut current, explicit);
            explicit = true;
            // Keep line and column numbers: pad to this line, and blank the
            // marker itself (content may follow it, as in `--- !tag`).
            current.push_str(&"\n".repeat(i));
            current.push_str("   ");
            current.push_str(rest);
        } else if marker(line, "...").is_some() {
            flush(&mut current, explicit);
            explicit = false;
            current.push_str(&"\n".repeat(i + 1));
        } else {
            current.push_str(line);
        }
    }
    flush(&mut current, explicit);
    docs
}

/// The rest of `line` if it starts with the document marker `m`.
fn marker<'a>(line: &'a str, m: &str) -> Option<&'a str> {
    let rest = line.strip_prefix(m)?;
    (rest.is_empty() || rest.starts_with([' ', '\t', '\r', '\n'])).then_some(rest)
}

/// True when a document holds nothing but whitespace, comments and
/// directives.
fn is_blank(doc: &str) -> bool {
    doc.lines().all(|l| {
        let t = l.trim_start();
        t.is_empty() || t.starts_with('#') || l.starts_with('%')
    })
}

/// Watches `dir` and sends `()` after any change in it.
///
/// The receiver should reload the whole folder; a burst of changes may arrive
/// as a single wake-up. Keep the returned watcher alive as long as events are
/// wanted.
///
/// # Errors
///
/// When the platform watcher cannot be created or cannot watch `dir`.
pub fn watch(dir: &Path) -> anyhow::Result<(notify::RecommendedWatcher, mpsc::Receiver<()>)> {
    // Capacity 1: a pending wake-up already means "reload", more add nothing.
    let (tx, rx) = mpsc::channel(1);
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let wake = match event {
            Ok(event) => is_change(event.kind),
            Err(e) => {
                // A lost event could hide a change: reloading is the safe side.
                warn!("watching the manifests folder: {e}");
                true
            }
        };
        if wake {
            // Full means a wake-up is pending; closed means nobody listens.
            let _ = tx.try_send(());
        }
    })
    .context("create a file watcher")?;
    watcher
        .watch(dir, RecursiveMode::NonRecursive)
        .with_context(|| format!("watch {}", dir.display()))?;
    Ok((watcher, rx))
}

/// True for events that can change what [`load_dir`] reads.
///
/// Names are not filtered: a ConfigMap mount updates by renaming its hidden
/// `..data` link. Opens and reads are skipped, or every reload would trigger
/// the next one.
fn is_change(kind: EventKind) -> bool {
    match kind {
        EventKind::Create(_) | EventKind::Modify(_) | EventKind::Remove(_) | EventKind::Any => true,
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) | EventKind::Other => false,
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use super::*;

    /// A fresh directory under the system temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(files: &[(&str, &str)]) -> Self {
            static NEXT: AtomicUsize = AtomicUsize::new(0);
            let path = std::env::temp_dir().join(format!(
                "lb-agent-manifests-{}-{}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = fs::remove_dir_all(&path);
            fs::create_dir_all(&path).expect("create temp dir");
            for (name, text) in files {
                fs::write(path.join(name), text).expect("write test file");
            }
            TempDir(path)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn service(name: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\n\
             spec: {{clusterIP: 10.96.0.1, ports: [{{port: 80}}]}}\n"
        )
    }

    fn slice(name: &str) -> String {
        format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
             metadata: {{name: {name}, labels: {{kubernetes.io/service-name: web}}}}\n\
             addressType: IPv4\nendpoints: [{{addresses: [10.0.0.1]}}]\n"
        )
    }

    fn names(objects: &Objects) -> (Vec<String>, Vec<String>) {
        let name = |m: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta| {
            m.name.clone().unwrap_or_default()
        };
        (
            objects.services.iter().map(|s| name(&s.metadata)).collect(),
            objects.slices.iter().map(|s| name(&s.metadata)).collect(),
        )
    }

    fn load(files: &[(&str, &str)]) -> Objects {
        let dir = TempDir::new(files);
        load_dir(&dir.0).expect("temp dir is readable")
    }

    #[test]
    fn multi_document_file_in_name_order() {
        let b = format!(
            "# leading comment\n---\n{}---\n{}...\n---\n{}",
            service("b1"),
            slice("b1-1"),
            service("b2")
        );
        let objects = load(&[
            ("b.yaml", &b),
            ("a.yml", &service("a")),
            ("c.json", &service("ignored-json")),
            (".hidden.yaml", &service("ignored-hidden")),
            (".b.yaml.swp", "binary junk"),
            ("b.yaml~", &service("ignored-backup")),
        ]);
        assert!(objects.problems.is_empty(), "{:?}", objects.problems);
        assert_eq!(
            names(&objects),
            (
                vec!["a".into(), "b1".into(), "b2".into()],
                vec!["b1-1".into()]
            )
        );
    }

    #[test]
    fn broken_yaml_costs_only_its_document() {
        let a = format!(
            "{}---\nmetadata: {{name: [unclosed\n---\n{}",
            service("a1"),
            service("a3")
        );
        let objects = load(&[("a.yaml", &a), ("b.yaml", &service("b"))]);
        assert_eq!(
            names(&objects).0,
            vec!["a1".to_owned(), "a3".to_owned(), "b".to_owned()]
        );
        assert_eq!(objects.problems.len(), 1, "{:?}", objects.problems);
        let p = &objects.problems[0];
        assert_eq!(p.object, "file a.yaml document 2");
        assert!(
            p.message.starts_with("is not valid YAML: ") && p.message.contains("line 6"),
            "the message carries the parser's line in the file: {p}"
        );
    }

    #[test]
    fn unknown_kind_and_missing_fields() {
        let text = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n---\n\
                    kind: Service\nmetadata: {name: y}\n---\n\
                    apiVersion: v1\nmetadata: {name: z}\n---\n\
                    apiVersion: v1beta1\nkind: EndpointSlice\n---\n\
                    - just\n- a list\n";
        let objects = load(&[("k.yaml", text)]);
        assert!(objects.services.is_empty() && objects.slices.is_empty());
        let got: Vec<String> = objects.problems.iter().map(ToString::to_string).collect();
        assert_eq!(
            got,
            [
                "file k.yaml document 1: kind \"ConfigMap\" of apiVersion \"v1\" is not read here \
                 (only v1 Service and discovery.k8s.io/v1 EndpointSlice); document skipped",
                "file k.yaml document 2: has no apiVersion; document skipped",
                "file k.yaml document 3: has no kind; document skipped",
                "file k.yaml document 4: kind \"EndpointSlice\" of apiVersion \"v1beta1\" is not read here \
                 (only v1 Service and discovery.k8s.io/v1 EndpointSlice); document skipped",
                "file k.yaml document 5: is not a YAML mapping (a Kubernetes object); document skipped",
            ]
        );
    }

    #[test]
    fn invalid_field_type_names_the_field() {
        let bad = "apiVersion: v1\nkind: Service\nmetadata: {name: bad}\n\
                   spec:\n  ports:\n    - port: eighty\n";
        let text = format!("{}---\n{bad}", service("good"));
        let objects = load(&[("t.yaml", &text)]);
        assert_eq!(names(&objects).0, vec!["good".to_owned()]);
        assert_eq!(objects.problems.len(), 1, "{:?}", objects.problems);
        let p = &objects.problems[0];
        assert_eq!(p.object, "file t.yaml document 2");
        assert!(
            p.message
                .starts_with("is not a valid v1 Service: spec.ports[0].port: invalid type")
                && p.message.contains("line 11"),
            "{p}"
        );
    }

    #[test]
    fn empty_documents_are_ignored_but_counted() {
        let text = format!(
            "---\n---\n# only a comment\n---\n\n---\n~\n---\n{}",
            slice("s")
        );
        let objects = load(&[
            ("e.yaml", &text),
            ("empty.yaml", ""),
            ("blank.yml", "\n\n# nothing\n"),
        ]);
        assert!(objects.problems.is_empty(), "{:?}", objects.problems);
        assert_eq!(names(&objects).1, vec!["s".to_owned()]);

        // Numbering matches what a YAML parser counts.
        let docs = split_documents(&format!("{text}---\n---\nkind: 1\n"));
        let numbers: Vec<usize> = docs.iter().map(|d| d.number).collect();
        let parsed =
            serde_yaml::Deserializer::from_str(&format!("{text}---\n---\nkind: 1\n")).count();
        assert_eq!(numbers, vec![4, 5, 7]);
        assert_eq!(parsed, 7);
    }

    #[test]
    fn unreadable_directory_is_the_only_error() {
        let dir = TempDir::new(&[]);
        assert!(load_dir(&dir.0.join("missing")).is_err());
        let objects = load_dir(&dir.0).expect("empty dir loads");
        assert!(objects.services.is_empty() && objects.problems.is_empty());
    }

    #[test]
    fn non_utf8_file_is_a_file_problem() {
        let dir = TempDir::new(&[("ok.yaml", &service("ok"))]);
        fs::write(dir.0.join("latin1.yaml"), b"name: caf\xe9\n").expect("write");
        let objects = load_dir(&dir.0).expect("dir loads");
        assert_eq!(names(&objects).0, vec!["ok".to_owned()]);
        assert_eq!(objects.problems.len(), 1);
        assert_eq!(objects.problems[0].object, "file latin1.yaml");
    }

    #[test]
    fn example_manifests_load_and_translate_cleanly() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/manifests");
        let objects = load_dir(&dir).expect("examples/manifests is readable");
        assert!(objects.problems.is_empty(), "{:?}", objects.problems);
        assert!(!objects.services.is_empty() && !objects.slices.is_empty());
        let node = crate::model::NodeInfo {
            name: "node-a".into(),
            addresses: vec!["192.168.1.10".parse().expect("literal address")],
        };
        let (model, problems) = crate::model::build(&objects.services, &objects.slices, &node);
        assert!(problems.is_empty(), "{problems:?}");
        assert!(!model.services.is_empty());
    }

    #[tokio::test]
    async fn watcher_fires_on_write() {
        let dir = TempDir::new(&[]);
        let (_watcher, mut rx) = watch(&dir.0).expect("watch temp dir");
        fs::write(dir.0.join("new.yaml"), service("new")).expect("write");
        let got = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await;
        assert_eq!(got, Ok(Some(())), "no event within 5 s");
    }
}
