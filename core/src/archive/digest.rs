//! A bundle's content: its files listed in order ([`list_files`]), their digest
//! ([`digest`], sha256 over `path NUL hex-sha256 LF` lines) and the deterministic
//! `.tar.gz` packed from the same listing ([`pack`]), so that the same content has the
//! same digest however it was packed.

use sha2::{Digest, Sha256};
use std::fs;
use std::io::{self, Write};
use std::path::Path;

/// Every file and symlink under `dir`, as sorted relative paths with `/` separators.
pub fn list_files(dir: &Path) -> io::Result<Vec<(String, fs::Metadata)>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d)? {
            let e = e?;
            let meta = fs::symlink_metadata(e.path())?;
            if meta.is_dir() {
                stack.push(e.path());
            } else {
                let rel = e
                    .path()
                    .strip_prefix(dir)
                    .expect("under dir")
                    .to_string_lossy()
                    .into_owned();
                out.push((rel, meta));
            }
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// The bundle's content digest, `sha256:<hex>` (module doc).
pub fn digest(dir: &Path) -> io::Result<String> {
    let mut outer = Sha256::new();
    for (rel, meta) in list_files(dir)? {
        outer.update(rel.as_bytes());
        outer.update([0u8]);
        if meta.file_type().is_symlink() {
            outer.update(b"->");
            outer.update(fs::read_link(dir.join(&rel))?.to_string_lossy().as_bytes());
        } else {
            let mut inner = Sha256::new();
            io::copy(&mut fs::File::open(dir.join(&rel))?, &mut inner)?;
            outer.update(hex(&inner.finalize()).as_bytes());
        }
        outer.update(b"\n");
    }
    Ok(format!("sha256:{}", hex(&outer.finalize())))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Writes `dir` as a deterministic `.tar.gz`: sorted entries, mtime 0, owner 0, modes
/// 0644/0755, no gzip name or time. The same content always gives the same bytes.
/// `progress` is called with the bytes of file content written so far.
pub fn pack(dir: &Path, out: impl Write, mut progress: impl FnMut(u64)) -> io::Result<()> {
    let gz = flate2::GzBuilder::new()
        .mtime(0)
        .write(out, flate2::Compression::default());
    let mut tar = tar::Builder::new(gz);
    tar.mode(tar::HeaderMode::Deterministic);
    tar.follow_symlinks(false);
    let mut written = 0u64;
    for (rel, meta) in list_files(dir)? {
        let path = dir.join(&rel);
        let mut header = tar::Header::new_gnu();
        header.set_mtime(0);
        header.set_uid(0);
        header.set_gid(0);
        if meta.file_type().is_symlink() {
            header.set_entry_type(tar::EntryType::Symlink);
            header.set_size(0);
            header.set_mode(0o777);
            tar.append_link(&mut header, &rel, fs::read_link(&path)?)?;
        } else {
            header.set_entry_type(tar::EntryType::Regular);
            header.set_size(meta.len());
            header.set_mode(if meta.permissions().mode() & 0o111 != 0 {
                0o755
            } else {
                0o644
            });
            tar.append_data(&mut header, &rel, fs::File::open(&path)?)?;
            written += meta.len();
            progress(written);
        }
    }
    tar.into_inner()?.finish()?.flush()
}

use std::os::unix::fs::PermissionsExt;
