//! Unpacking an untrusted archive ([`unpack`]): entries are written only inside the
//! destination (no `..`, no absolute paths, no links out, no device files, nothing
//! written through a symlink), with every problem found reported, and a single wrapping
//! directory lifted.
//!
//! The byte-level bounds on the stream (sizes, ratio, metadata headers) are `guard`'s.

use super::digest::list_files;
use super::guard::{guard_refusal, HeaderGuard, LimitedReader};
use super::{Limits, MAX_REASONS};
use flate2::read::GzDecoder;
use std::fs;
use std::io::{self, Read};
use std::path::{Component, Path, PathBuf};

/// What an unpack wrote.
#[derive(Debug, Default)]
pub struct Unpacked {
    pub files: usize,
    pub bytes: u64,
}

/// Unpacks a `.tar.gz` into `dest` (which must exist and be empty). On error, `dest` may
/// hold part of the archive: callers unpack into a temporary directory and discard it.
/// A single top-level directory around `bundle.toml` is lifted into `dest`.
pub fn unpack(archive: impl Read, dest: &Path, limits: &Limits) -> Result<Unpacked, Vec<String>> {
    let mut reasons = Vec::new();
    let mut done = Unpacked::default();
    let compressed = std::rc::Rc::new(std::cell::Cell::new(0u64));
    let counted = LimitedReader {
        inner: archive,
        left: limits.max_archive_bytes,
        read: compressed.clone(),
    };
    let guard = HeaderGuard::new(GzDecoder::new(counted), compressed.clone(), limits);
    let last_header = guard.last_header.clone();
    let mut tar = tar::Archive::new(guard);
    // Unpacked bytes allowed so far: the floor, or the ratio to the compressed bytes read.
    let allowed = || {
        limits
            .ratio_floor
            .max(compressed.get().saturating_mul(limits.max_ratio))
    };
    let entries = tar
        .entries()
        .map_err(|e| vec![format!("not a .tar.gz archive: {e}")])?;
    let mut count = 0usize;
    for entry in entries {
        let mut entry = match entry {
            Ok(e) => e,
            Err(e) => {
                reasons.push(read_error(e, limits));
                break;
            }
        };
        // The guard must have seen this entry's header where the tar crate read it, and
        // the size it framed the entry with must be the one the crate uses: a PAX `size`
        // record that differs (or anything else that moves the crate's framing) would
        // let later headers pass the guard unchecked, so the archive is refused.
        let framed = entry.header().entry_size().ok();
        if entry.raw_header_position() != last_header.get() || framed != Some(entry.size()) {
            reasons.push(
                "the archive's framing is inconsistent (a PAX size record that differs from its \
                 header's, or a sparse entry); repack it with `nnserve bundle pack`"
                    .to_string(),
            );
            break;
        }
        count += 1;
        if count > limits.max_entries {
            reasons.push(format!(
                "the archive has more than {} entries",
                limits.max_entries
            ));
            break;
        }
        let path = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        // Every message shows the name bounded: a 65 KB long name was echoed whole.
        let raw = crate::names::bounded(&path);
        let rel = match safe_relative(&path) {
            Ok(Some(p)) => p,
            Ok(None) => continue, // "." or "./"
            Err(why) => {
                reasons.push(format!("`{raw}`: {why}"));
                continue;
            }
        };
        // Each symlink is checked where its path says it is; an entry whose path goes
        // through a symlink made by an earlier entry would land elsewhere (a chain such as
        // `a -> .`, `a/b -> ..`, `a/b/c -> ..` climbs out one level per link).
        if let Err(why) = not_through_symlink(dest, &rel) {
            reasons.push(format!("`{raw}`: {why}"));
            continue;
        }
        let target = dest.join(&rel);
        let kind = entry.header().entry_type();
        let size = entry.header().size().unwrap_or(u64::MAX);
        let result = match kind {
            tar::EntryType::Directory => fs::create_dir_all(&target).map_err(|e| e.to_string()),
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                if size > limits.max_file_bytes {
                    reasons.push(format!(
                        "`{raw}` is {size} bytes, over the limit of {} bytes per file",
                        limits.max_file_bytes
                    ));
                    break;
                }
                if done.bytes + size > limits.max_total_bytes {
                    reasons.push(format!(
                        "the unpacked bundle exceeds the limit of {} bytes",
                        limits.max_total_bytes
                    ));
                    break;
                }
                match write_file(&mut entry, &target, size) {
                    Ok(n) => {
                        done.files += 1;
                        done.bytes += n;
                        Ok(())
                    }
                    Err(why) => {
                        // The stream itself failed (a bound of the guard, or corruption):
                        // nothing after it can be read reliably.
                        reasons.push(format!("`{raw}`: {why}"));
                        break;
                    }
                }
            }
            tar::EntryType::Symlink => match entry.link_name_bytes() {
                Some(link) => {
                    let link = String::from_utf8_lossy(&link).into_owned();
                    if link.len() > 4096 {
                        reasons.push(format!("`{raw}`: a symlink target of {} bytes", link.len()));
                        continue;
                    }
                    let shown = crate::names::bounded(&link);
                    link_inside(&rel, &link)
                        .map_err(|why| format!("symlink to `{shown}` {why}"))
                        .and_then(|_| {
                            ensure_parent(&target)?;
                            std::os::unix::fs::symlink(&link, &target).map_err(|e| e.to_string())
                        })
                }
                None => Err("a symlink without a target".into()),
            },
            tar::EntryType::Link => match entry.link_name_bytes() {
                // A hard link names another entry of the archive; we copy that file.
                Some(link) => {
                    let link = String::from_utf8_lossy(&link).into_owned();
                    if link.len() > 4096 {
                        reasons.push(format!(
                            "`{raw}`: a hard link target of {} bytes",
                            link.len()
                        ));
                        continue;
                    }
                    let plain_file = |src: &Path| {
                        not_through_symlink(dest, src).is_ok()
                            && fs::symlink_metadata(dest.join(src)).is_ok_and(|m| m.is_file())
                    };
                    let shown = crate::names::bounded(&link);
                    match safe_relative(&link) {
                        Ok(Some(src)) if plain_file(&src) => {
                            // A copy writes data no compressed byte paid for: the same
                            // bounds as a file's (one 64 MiB file linked 10,000 times
                            // would write 640 GB).
                            let len = fs::metadata(dest.join(&src)).map_or(u64::MAX, |m| m.len());
                            let after = done.bytes.saturating_add(len);
                            if after > limits.max_total_bytes || after > allowed() {
                                reasons.push(format!(
                                    "`{raw}`: hard links copy more than the archive may unpack to \
                                     ({} bytes, or {} times its compressed size)",
                                    limits.max_total_bytes, limits.max_ratio
                                ));
                                break;
                            }
                            ensure_parent(&target).and_then(|_| {
                                fs::copy(dest.join(&src), &target)
                                    .map(|n| {
                                        done.files += 1;
                                        done.bytes += n;
                                    })
                                    .map_err(|e| e.to_string())
                            })
                        }
                        Ok(_) => Err(format!(
                            "hard link to `{shown}`, which is not a plain file earlier in the archive"
                        )),
                        Err(why) => Err(format!("hard link to `{shown}`: {why}")),
                    }
                }
                None => Err("a hard link without a target".into()),
            },
            tar::EntryType::XGlobalHeader
            | tar::EntryType::XHeader
            | tar::EntryType::GNULongName => Ok(()),
            other => {
                // Refused, and the rest is not read: the tar crate frames some kinds
                // (sparse entries) in ways the header guard does not follow.
                reasons.push(format!(
                    "`{raw}`: is a {other:?} entry; bundles hold only files, directories and links inside them"
                ));
                break;
            }
        };
        if let Err(why) = result {
            reasons.push(format!("`{raw}`: {why}"));
        }
    }
    if reasons.is_empty() {
        // Links inside links: each was checked alone; what they resolve to together must
        // stay inside the bundle too (`x -> a/..` with `a -> ..` leaves it).
        reasons.extend(links_that_leave(dest));
    }
    if reasons.len() > MAX_REASONS {
        let more = reasons.len() - MAX_REASONS;
        reasons.truncate(MAX_REASONS);
        reasons.push(format!("and {more} more problems"));
    }
    if reasons.is_empty() {
        lift_single_directory(dest)
            .map_err(|e| vec![format!("cannot arrange the unpacked bundle: {e}")])?;
        Ok(done)
    } else {
        Err(reasons)
    }
}

fn read_error(e: io::Error, limits: &Limits) -> String {
    if e.kind() == io::ErrorKind::FileTooLarge {
        format!(
            "the archive is larger than the limit of {} bytes",
            limits.max_archive_bytes
        )
    } else if let Some(m) = guard_refusal(&e) {
        m
    } else {
        let e = crate::names::log_safe(&e.to_string(), 200);
        format!("the archive is corrupt or not a .tar.gz: {e}")
    }
}

/// A path inside the bundle, or why not. `None` for the root itself.
fn safe_relative(raw: &str) -> Result<Option<PathBuf>, String> {
    let path = Path::new(raw);
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::Normal(p) => out.push(p),
            Component::CurDir => {}
            Component::ParentDir => return Err("climbs out of the bundle (`..`)".into()),
            Component::RootDir | Component::Prefix(_) => {
                return Err("is an absolute path; bundle paths are relative".into())
            }
        }
    }
    Ok((!out.as_os_str().is_empty()).then_some(out))
}

/// Does a symlink at `at` (relative) pointing to `link` stay inside the bundle?
fn link_inside(at: &Path, link: &str) -> Result<(), String> {
    if Path::new(link).is_absolute() {
        return Err("is absolute: links must stay inside the bundle".into());
    }
    let mut depth: i64 = at.components().count() as i64 - 1;
    for c in Path::new(link).components() {
        match c {
            Component::ParentDir => depth -= 1,
            Component::Normal(_) => depth += 1,
            _ => {}
        }
        if depth < 0 {
            return Err("points outside the bundle".into());
        }
    }
    Ok(())
}

/// Refuses a path whose parent directories include a symlink (made by an earlier entry).
fn not_through_symlink(dest: &Path, rel: &Path) -> Result<(), String> {
    let mut at = dest.to_path_buf();
    let parents = rel.components().count().saturating_sub(1);
    for c in rel.components().take(parents) {
        at.push(c);
        if fs::symlink_metadata(&at).is_ok_and(|m| m.file_type().is_symlink()) {
            let link = at.strip_prefix(dest).unwrap_or(&at).display().to_string();
            return Err(format!(
                "goes through the symlink `{link}`; entries may not be placed through links"
            ));
        }
    }
    Ok(())
}

/// Symlinks of the unpacked tree that resolve outside it or nowhere, as reasons.
fn links_that_leave(dest: &Path) -> Vec<String> {
    let Ok(root) = fs::canonicalize(dest) else {
        return vec!["cannot resolve the unpacked bundle's directory".into()];
    };
    let Ok(files) = list_files(dest) else {
        return vec!["cannot list the unpacked bundle".into()];
    };
    files
        .iter()
        .filter(|(_, meta)| meta.file_type().is_symlink())
        .filter_map(|(rel, _)| match fs::canonicalize(dest.join(rel)) {
            Ok(real) if real.starts_with(&root) => None,
            Ok(_) => Some(format!(
                "`{rel}`: the symlink resolves outside the bundle (through other links)"
            )),
            Err(_) => Some(format!(
                "`{rel}`: the symlink leads to nothing in the bundle"
            )),
        })
        .collect()
}

fn ensure_parent(target: &Path) -> Result<(), String> {
    match target.parent() {
        Some(p) => fs::create_dir_all(p).map_err(|e| e.to_string()),
        None => Ok(()),
    }
}

/// Writes one file of `size` bytes (the compression-ratio bound holds on the stream
/// itself: [`HeaderGuard`]).
fn write_file(entry: &mut impl Read, target: &Path, size: u64) -> Result<u64, String> {
    ensure_parent(target)?;
    // `create_new`: a second entry with the same path, or a path through a symlink made
    // earlier, must not overwrite anything.
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(target)
        .map_err(|e| e.to_string())?;
    let written = io::copy(&mut entry.take(size), &mut f).map_err(|e| {
        let e: io::Error = e;
        guard_refusal(&e).unwrap_or_else(|| e.to_string())
    })?;
    f.sync_all().map_err(|e| e.to_string())?;
    Ok(written)
}

/// An archive made with `tar -czf b.tar.gz bundle/` has everything under `bundle/`.
fn lift_single_directory(dest: &Path) -> io::Result<()> {
    if dest.join("bundle.toml").exists() {
        return Ok(());
    }
    let entries: Vec<_> = fs::read_dir(dest)?.collect::<Result<_, _>>()?;
    if let [only] = entries.as_slice() {
        if only.file_type()?.is_dir() && only.path().join("bundle.toml").is_file() {
            let inner = only.path();
            for e in fs::read_dir(&inner)? {
                let e = e?;
                fs::rename(e.path(), dest.join(e.file_name()))?;
            }
            fs::remove_dir(inner)?;
        }
    }
    Ok(())
}
