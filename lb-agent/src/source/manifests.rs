//! The manifests folder: Services and EndpointSlices as Kubernetes YAML files.
//!
//! The folder is read once in full; after that, the watcher names the files
//! that changed and only those are read again ([`Folder`]), and a full scan
//! (when the watcher cannot say, e.g. a ConfigMap's `..data` link swapped)
//! re-reads only files whose size, times or inode changed. Either way the
//! result is the objects a fresh start would read. Bad documents become
//! [`Problem`]s and are skipped one by one: a typo in one manifest never
//! hides the others.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs;
use std::io;
use std::path::Path;
use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use k8s_openapi::api::core::v1::Service;
use notify::event::{AccessKind, AccessMode};
use notify::{EventKind, RecursiveMode, Watcher as _};
use serde_yaml::Value;
use tokio::sync::mpsc;
use tracing::{debug, warn};

use super::owners::Owners;
use crate::model::{self, Id, Inputs, Problem, SliceObject};

/// The objects read from the manifests folder, and what could not be read.
#[derive(Clone, Debug, Default)]
pub struct Objects {
    /// Every `v1` `Service` document.
    pub services: Vec<Service>,
    /// Every `discovery.k8s.io/v1` `EndpointSlice` document.
    pub slices: Vec<SliceObject>,
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
    let mut folder = Folder::default();
    folder.refresh(dir, &Scan::All, |_, _| {})?;
    Ok(folder.objects(dir))
}

/// What to read again from the folder.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Scan {
    /// List the folder and read every file that is new or whose size,
    /// times or inode changed (a reload that cannot miss anything).
    All,
    /// Read these files (by name) again; a missing one is removed.
    Files(BTreeSet<String>),
    /// As [`Scan::All`], and every file is read again, changed or not:
    /// what a new translation of every Service needs (the node changed).
    Reparse,
}

/// When a file was last read: a change of any of these means read it again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stamp {
    ino: u64,
    len: u64,
    mtime_ns: i128,
    ctime_ns: i128,
}

impl Stamp {
    fn of(m: &fs::Metadata) -> Self {
        use std::os::unix::fs::MetadataExt as _;
        let ns = |s: i64, n: i64| i128::from(s) * 1_000_000_000 + i128::from(n);
        Self {
            ino: m.ino(),
            len: m.len(),
            mtime_ns: ns(m.mtime(), m.mtime_nsec()),
            ctime_ns: ns(m.ctime(), m.ctime_nsec()),
        }
    }
}

/// One file as last read. Neither its objects (k8s-openapi structs of
/// several KiB each) nor its text are kept: 10 000 files' text alone is
/// 12 MiB. The rare sync that needs objects of a file it is not reading
/// (a Service whose slices live in other files) reads that file again.
#[derive(Debug)]
struct File {
    /// `None` when the file could not be read (then it is tried again at
    /// every full scan).
    stamp: Option<Stamp>,
    problems: Vec<Problem>,
}

/// The manifests folder as last read. A change re-reads only the files it
/// touched and re-translates only the Services whose objects those files
/// hold. Neither objects nor text are kept between syncs; objects are
/// parsed for the sync that needs them, a bounded number of files at a
/// time.
#[derive(Debug, Default)]
pub struct Folder {
    files: BTreeMap<String, File>,
    /// The files that hold objects of each Service identity (the Service
    /// itself, or an EndpointSlice that names it).
    owners: Owners<String>,
    /// Objects parsed for the Services being translated now, by file.
    parsed: HashMap<String, Objects>,
}

/// The Service identities the objects of a file belong to.
fn ids_of(objects: &Objects) -> impl Iterator<Item = Id> + '_ {
    objects.services.iter().map(model::service_id).chain(
        objects
            .slices
            .iter()
            .filter_map(|s| model::slice_owner(&s.metadata)),
    )
}

/// Files whose objects are held in memory at once while a folder is read:
/// bounds the memory of a first load of thousands of files.
const FILES_PER_ROUND: usize = 1024;

impl Folder {
    /// Brings the folder up to date as `scan` says. `changed` is called
    /// with the Service identities whose objects may have changed, as many
    /// times as it takes (a bounded number of files is parsed at a time);
    /// during the call, [`Self::inputs`] gives their objects.
    ///
    /// # Errors
    ///
    /// Only when `dir` itself cannot be listed (nothing is changed then).
    pub fn refresh(
        &mut self,
        dir: &Path,
        scan: &Scan,
        mut changed: impl FnMut(&Self, BTreeSet<Id>),
    ) -> io::Result<()> {
        // Files to read again (with their metadata), files gone.
        let mut read: Vec<(String, fs::Metadata)> = Vec::new();
        let mut gone: Vec<String> = Vec::new();
        match scan {
            Scan::All | Scan::Reparse => {
                let mut present = BTreeSet::new();
                for entry in fs::read_dir(dir)? {
                    let entry = entry?;
                    let name = entry.file_name().to_string_lossy().into_owned();
                    if !is_manifest_name(&name) {
                        continue;
                    }
                    // `metadata` follows symlinks: a mounted ConfigMap is a
                    // folder of them.
                    match fs::metadata(entry.path()) {
                        Ok(m) if !m.is_file() => {
                            debug!(file = %name, "not a regular file; ignored");
                        }
                        Ok(m) => {
                            present.insert(name.clone());
                            let known = self.files.get(&name).and_then(|f| f.stamp);
                            if known != Some(Stamp::of(&m)) || *scan == Scan::Reparse {
                                read.push((name, m));
                            }
                        }
                        // Gone since the listing: as if not listed.
                        Err(_) => {}
                    }
                }
                gone.extend(self.files.keys().filter(|n| !present.contains(*n)).cloned());
            }
            Scan::Files(names) => {
                for name in names.iter().filter(|n| is_manifest_name(n)) {
                    match fs::metadata(dir.join(name)) {
                        Ok(m) if m.is_file() => read.push((name.clone(), m)),
                        _ => gone.push(name.clone()),
                    }
                }
            }
        }
        let mut ids = BTreeSet::new();
        for name in gone {
            if self.files.remove(&name).is_some() {
                self.owners.remove(&name, &mut ids);
            }
        }
        let mut rounds = read.into_iter().peekable();
        loop {
            let round: Vec<(String, fs::Metadata)> =
                rounds.by_ref().take(FILES_PER_ROUND).collect();
            for (name, file, objects) in load_files(dir, round) {
                self.owners.set(&name, ids_of(&objects), &mut ids);
                self.parsed.insert(name.clone(), objects);
                self.files.insert(name, file);
            }
            if !ids.is_empty() {
                self.parse_files_of(dir, &ids);
                changed(self, std::mem::take(&mut ids));
            }
            self.parsed.clear();
            if rounds.peek().is_none() {
                break;
            }
        }
        Ok(())
    }

    /// Reads and parses the files that hold objects of `ids` and are not
    /// parsed yet (a Service whose slices live in other files than the
    /// ones read).
    ///
    /// Such a file may have changed since it was last read; its own event
    /// (or the next full scan, which compares stamps) reads it again in
    /// full, so reading its newer text here only brings that forward.
    fn parse_files_of(&mut self, dir: &Path, ids: &BTreeSet<Id>) {
        let missing: BTreeSet<&String> = ids
            .iter()
            .flat_map(|id| self.owners.holders(id))
            .filter(|name| !self.parsed.contains_key(*name))
            .filter(|name| self.files.get(*name).is_some_and(|f| f.stamp.is_some()))
            .collect();
        let parsed: Vec<(String, Objects)> = missing
            .into_iter()
            .map(|name| match fs::read_to_string(dir.join(name)) {
                Ok(text) => (name.clone(), load_text(name, &text)),
                Err(e) => {
                    // Gone or unreadable since: its own event says so.
                    debug!(file = %name, "cannot be read again: {e}");
                    (name.clone(), Objects::default())
                }
            })
            .collect();
        self.parsed.extend(parsed);
    }

    /// The objects of Service identity `id`, from every file that holds
    /// any; only while [`Self::refresh`] reports `id` as changed.
    pub fn inputs(&self, id: &Id) -> Inputs<'_> {
        let mut out: Inputs<'_> = (Vec::new(), Vec::new());
        for name in self.owners.holders(id) {
            let Some(objects) = self.parsed.get(name) else {
                continue;
            };
            out.0.extend(
                objects
                    .services
                    .iter()
                    .filter(|s| model::service_id(s) == *id),
            );
            out.1.extend(
                objects
                    .slices
                    .iter()
                    .filter(|s| model::slice_owner(&s.metadata).as_ref() == Some(id)),
            );
        }
        out
    }

    /// The problems of reading the files (unreadable files, bad documents).
    pub fn problems(&self) -> Vec<Problem> {
        self.files
            .values()
            .flat_map(|f| f.problems.iter().cloned())
            .collect()
    }

    /// Every object of the files of `dir` as last listed, in file name
    /// order (each file read and parsed again).
    pub fn objects(&self, dir: &Path) -> Objects {
        let mut out = Objects::default();
        for (name, file) in &self.files {
            let text = file
                .stamp
                .and_then(|_| fs::read_to_string(dir.join(name)).ok());
            match text {
                Some(text) => load_file(name, &text, &mut out),
                None => out.problems.extend(file.problems.iter().cloned()),
            }
        }
        out
    }
}

/// Files parsed per thread before a folder is read on several threads: a
/// few files are read at once, a first load of thousands on every core.
const FILES_PER_THREAD: usize = 256;

/// Reads and parses files of `dir`, on every core when there are many.
fn load_files(dir: &Path, files: Vec<(String, fs::Metadata)>) -> Vec<(String, File, Objects)> {
    let load = |(name, meta): (String, fs::Metadata)| match fs::read_to_string(dir.join(&name)) {
        Ok(text) => {
            let objects = load_text(&name, &text);
            let file = File {
                stamp: Some(Stamp::of(&meta)),
                problems: objects.problems.clone(),
            };
            (name, file, objects)
        }
        Err(e) => {
            let problem = Problem {
                object: format!("file {name}"),
                message: format!("cannot be read as UTF-8 text: {e}; file skipped"),
            };
            let file = File {
                stamp: None,
                problems: vec![problem],
            };
            (name, file, Objects::default())
        }
    };
    crate::parallel::map(files, FILES_PER_THREAD, load)
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
        if let Err(message) = load_document(&doc, objects) {
            objects.problems.push(Problem {
                object,
                message: format!("{message}; document skipped"),
            });
        }
    }
}

/// Adds one document to `objects`; `Err` says why it was skipped.
fn load_document(doc: &Document, objects: &mut Objects) -> Result<(), String> {
    let text = doc.text.as_str();
    let value: Value =
        serde_yaml::from_str(text).map_err(|e| format!("is not valid YAML: {}", doc.locate(&e)))?;
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
    let service = match (api_version, kind) {
        ("v1", "Service") => true,
        ("discovery.k8s.io/v1", "EndpointSlice") => false,
        _ => {
            return Err(format!(
                "kind {kind:?} of apiVersion {api_version:?} is not read here \
                 (only v1 Service and discovery.k8s.io/v1 EndpointSlice)"
            ))
        }
    };
    if service {
        objects.services.push(
            typed(text, value)
                .map_err(|e| format!("is not a valid v1 Service: {}", doc.locate(&e)))?,
        );
    } else {
        objects.slices.push(typed(text, value).map_err(|e| {
            format!(
                "is not a valid discovery.k8s.io/v1 EndpointSlice: {}",
                doc.locate(&e)
            )
        })?);
    }
    Ok(())
}

/// The object `value` (parsed from `text`) as a `T`.
///
/// From the parsed value, so that a document is parsed once (most of the
/// time of loading a large folder), and by value, so that its strings move
/// into the object instead of being copied; an invalid one is deserialized
/// from the text again for the error, which then carries serde_yaml's
/// field path and the line number in the file.
fn typed<T: serde::de::DeserializeOwned>(text: &str, value: Value) -> Result<T, serde_yaml::Error> {
    T::deserialize(value).or_else(|_| serde_yaml::from_str(text))
}

/// One YAML document of a file.
struct Document {
    /// Numbered from 1 as a YAML parser counts them, including empty ones.
    number: usize,
    /// The line of the file (from 0) the document's text starts on.
    first_line: usize,
    /// The document, its `---` marker blanked so that columns stay those of
    /// the file.
    text: String,
}

impl Document {
    /// A parser error with the line number of the whole file rather than
    /// of the document. (Padding each document with the blank lines before
    /// it would do the same, but costs memory quadratic in the file's
    /// length: a file of 10 000 Services took gigabytes.)
    fn locate(&self, e: &serde_yaml::Error) -> String {
        const AT: &str = "at line ";
        let message = e.to_string();
        if self.first_line == 0 {
            return message;
        }
        // The error's own mark and any context mark ("while parsing … at
        // line N column M") are all relative to the document.
        let mut out = String::with_capacity(message.len() + 8);
        let mut rest = message.as_str();
        while let Some(i) = rest.find(AT) {
            let (head, tail) = rest.split_at(i + AT.len());
            out.push_str(head);
            let digits = tail.bytes().take_while(u8::is_ascii_digit).count();
            match tail[..digits].parse::<usize>() {
                Ok(n) if tail[digits..].starts_with(" column ") => {
                    out.push_str(&(n + self.first_line).to_string());
                }
                _ => out.push_str(&tail[..digits]),
            }
            rest = &tail[digits..];
        }
        out.push_str(rest);
        out
    }
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
    let mut first_line = 0;
    let mut flush = |current: &mut String, explicit: bool, first_line: usize| {
        if explicit || !is_blank(current) {
            number += 1;
            if !is_blank(current) {
                docs.push(Document {
                    number,
                    first_line,
                    text: std::mem::take(current),
                });
            }
        }
        current.clear();
    };
    for (i, line) in text.split_inclusive('\n').enumerate() {
        if let Some(rest) = marker(line, "---") {
            flush(&mut current, explicit, first_line);
            explicit = true;
            first_line = i;
            // Keep column numbers: blank the marker itself (content may
            // follow it, as in `--- !tag`).
            current.push_str("   ");
            current.push_str(rest);
        } else if marker(line, "...").is_some() {
            flush(&mut current, explicit, first_line);
            explicit = false;
            first_line = i + 1;
        } else {
            current.push_str(line);
        }
    }
    flush(&mut current, explicit, first_line);
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

/// What the watcher has seen since the last [`Pending::take`]: shared
/// between the watcher's thread and the agent.
#[derive(Clone, Debug)]
pub struct Pending(Arc<Mutex<Seen>>);

/// What [`Pending`] holds.
#[derive(Debug)]
struct Seen {
    scan: Scan,
    /// Whether every file named since the last take is complete: its last
    /// event was a rename into the folder, a close after writing, or a
    /// removal. A file written in place may still be half-written.
    settled: bool,
}

impl Pending {
    fn lock(&self) -> std::sync::MutexGuard<'_, Seen> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// What to read again, leaving nothing pending. The first call (before
    /// any event) says [`Scan::All`]: the first load reads everything.
    pub fn take(&self) -> Scan {
        let mut seen = self.lock();
        seen.settled = true;
        std::mem::replace(&mut seen.scan, Scan::Files(BTreeSet::new()))
    }

    /// Whether what is pending can be read at once: every file it names is
    /// complete (renamed into place, closed, removed), so no wait for
    /// more events of the same write is needed.
    pub fn settled(&self) -> bool {
        self.lock().settled
    }

    /// Asks for a full scan next time (a load failed after taking the
    /// pending changes, which must not be lost).
    pub fn rescan(&self) {
        self.lock().scan = Scan::All;
    }

    fn add(&self, event: &notify::Result<notify::Event>, dir: &Path) -> bool {
        let mut seen = self.lock();
        let complete = event.as_ref().is_ok_and(|e| is_complete(e.kind));
        let Seen { scan, settled } = &mut *seen;
        let event = match event {
            Ok(event) if event.need_rescan() => None,
            Ok(event) if !is_change(event.kind) => return false,
            Ok(event) => Some(event),
            Err(e) => {
                // A lost event could hide a change: a full scan is the safe side.
                warn!("watching the manifests folder: {e}");
                None
            }
        };
        let Scan::Files(names) = scan else {
            *settled = false;
            return true;
        };
        let Some(event) = event.filter(|e| !e.paths.is_empty()) else {
            *scan = Scan::All;
            *settled = false;
            return true;
        };
        let mut wake = false;
        for path in &event.paths {
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
            match name {
                Some(name) if path.parent() == Some(dir) => {
                    if is_manifest_name(&name) {
                        names.insert(name);
                        *settled &= complete;
                        wake = true;
                    } else if name.starts_with("..") {
                        // A ConfigMap mount swaps its `..data` link: every
                        // file may now point elsewhere.
                        *scan = Scan::All;
                        *settled = false;
                        return true;
                    }
                    // Other names (hidden temporary files, backups) are
                    // never read: nothing to do until they are renamed.
                }
                // The folder itself, or something the watcher cannot place.
                _ => {
                    *scan = Scan::All;
                    *settled = false;
                    return true;
                }
            }
        }
        wake
    }
}

/// Watches `dir` and sends `()` after a change in it; [`Pending`] says
/// which files changed.
///
/// A burst of changes may arrive as a single wake-up. Keep the returned
/// watcher alive as long as events are wanted.
///
/// # Errors
///
/// When the platform watcher cannot be created or cannot watch `dir`.
pub fn watch(
    dir: &Path,
) -> anyhow::Result<(notify::RecommendedWatcher, mpsc::Receiver<()>, Pending)> {
    // Capacity 1: a pending wake-up already means "reload", more add nothing.
    let (tx, rx) = mpsc::channel(1);
    let pending = Pending(Arc::new(Mutex::new(Seen {
        scan: Scan::All,
        settled: false,
    })));
    let shared = pending.clone();
    let watched = dir.to_path_buf();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if shared.add(&event, &watched) {
            // Full means a wake-up is pending; closed means nobody listens.
            let _ = tx.try_send(());
        }
    })
    .context("create a file watcher")?;
    watcher
        .watch(dir, RecursiveMode::NonRecursive)
        .with_context(|| format!("watch {}", dir.display()))?;
    Ok((watcher, rx, pending))
}

/// True for events after which a file is whole: renamed into place,
/// closed after writing, or removed.
fn is_complete(kind: EventKind) -> bool {
    use notify::event::{ModifyKind, RenameMode};
    matches!(
        kind,
        EventKind::Modify(ModifyKind::Name(RenameMode::To | RenameMode::Both))
            | EventKind::Access(AccessKind::Close(AccessMode::Write))
            | EventKind::Remove(_)
    )
}

/// True for events that can change what [`load_dir`] reads.
///
/// Opens and reads are skipped, or every reload would trigger the next one.
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

    /// Documents hold their own text only: a file of many documents costs
    /// memory linear in its length (padding each with the lines before it
    /// made a 12 MB file take gigabytes).
    #[test]
    fn documents_of_a_long_file_hold_only_their_own_lines() {
        let text: String = (0..2000)
            .map(|i| format!("---\n{}", service(&format!("s{i}"))))
            .collect();
        let docs = split_documents(&text);
        assert_eq!(docs.len(), 2000);
        let held: usize = docs.iter().map(|d| d.text.len()).sum();
        assert!(
            held <= text.len(),
            "documents hold {held} bytes of a {}-byte file",
            text.len()
        );
        let objects = load(&[("many.yaml", &text)]);
        assert_eq!(objects.services.len(), 2000, "{:?}", objects.problems);
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
            zone: None,
        };
        let (model, problems) = crate::model::build(&objects.services, &objects.slices, &node);
        assert!(problems.is_empty(), "{problems:?}");
        assert!(!model.services.is_empty());
    }

    #[tokio::test]
    async fn watcher_fires_on_write() {
        let dir = TempDir::new(&[]);
        let (_watcher, mut rx, pending) = watch(&dir.0).expect("watch temp dir");
        assert_eq!(pending.take(), Scan::All, "the first load reads everything");
        fs::write(dir.0.join("new.yaml"), service("new")).expect("write");
        let got = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await;
        assert_eq!(got, Ok(Some(())), "no event within 5 s");
        assert_eq!(
            pending.take(),
            Scan::Files(BTreeSet::from(["new.yaml".to_owned()]))
        );
    }

    #[test]
    fn refresh_reads_again_only_what_changed() {
        let dir = TempDir::new(&[("a.yaml", &service("a")), ("b.yaml", &slice("b-1"))]);
        let mut folder = Folder::default();
        let ids = |v: &[&str]| -> BTreeSet<Id> {
            v.iter()
                .map(|n| ("default".to_owned(), (*n).to_owned()))
                .collect()
        };
        // What each refresh reports, with how many Services and slices
        // `inputs` gives for each identity meanwhile.
        let refresh = |folder: &mut Folder, scan: Scan| {
            let mut seen = BTreeMap::new();
            folder
                .refresh(&dir.0, &scan, |f, changed| {
                    for id in changed {
                        let (services, slices) = f.inputs(&id);
                        seen.insert(id.1.clone(), (services.len(), slices.len()));
                    }
                })
                .expect("dir is readable");
            seen
        };
        let counts = |v: &[(&str, usize, usize)]| -> BTreeMap<String, (usize, usize)> {
            v.iter()
                .map(|(n, a, b)| ((*n).to_owned(), (*a, *b)))
                .collect()
        };
        assert_eq!(
            refresh(&mut folder, Scan::All),
            counts(&[("a", 1, 0), ("web", 0, 1)])
        );
        // Nothing changed: a full scan reads nothing.
        assert_eq!(refresh(&mut folder, Scan::All), counts(&[]));
        // A rewritten file changes what it held before and holds now.
        fs::write(dir.0.join("a.yaml"), service("c")).expect("write");
        let named = Scan::Files(BTreeSet::from(["a.yaml".to_owned()]));
        assert_eq!(
            refresh(&mut folder, named),
            counts(&[("a", 0, 0), ("c", 1, 0)])
        );
        // A slice of "c" in another file: both files are parsed for it.
        fs::write(
            dir.0.join("d.yaml"),
            slice("c-1").replace("service-name: web", "service-name: c"),
        )
        .expect("write");
        let named = Scan::Files(BTreeSet::from(["d.yaml".to_owned()]));
        assert_eq!(refresh(&mut folder, named), counts(&[("c", 1, 1)]));
        // A removed file, found by a full scan; hidden names are ignored.
        fs::remove_file(dir.0.join("b.yaml")).expect("remove");
        fs::write(dir.0.join(".b.yaml.tmp"), service("hidden")).expect("write");
        assert_eq!(refresh(&mut folder, Scan::All), counts(&[("web", 0, 0)]));
        let o = folder.objects(&dir.0);
        assert_eq!((o.services.len(), o.slices.len()), (1, 1));
        assert_eq!(ids(&["c"]).len(), 1);
    }
}
