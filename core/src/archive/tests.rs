use super::*;
use std::fs;
use std::io::{self, Read, Write};
use std::path::Path;

/// A gzip'd tar with raw entries, names written into the header as given (so that
/// hostile names can be crafted).
fn craft(entries: &[(&str, tar::EntryType, &[u8], Option<&str>)]) -> Vec<u8> {
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let mut b = tar::Builder::new(gz);
    for (name, kind, data, link) in entries {
        let mut h = tar::Header::new_old();
        let bytes = name.as_bytes();
        h.as_old_mut().name[..bytes.len()].copy_from_slice(bytes);
        h.set_entry_type(*kind);
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        if let Some(l) = link {
            h.as_old_mut().linkname[..l.len()].copy_from_slice(l.as_bytes());
        }
        h.set_cksum();
        b.append(&h, *data).unwrap();
    }
    b.into_inner().unwrap().finish().unwrap()
}

fn file<'a>(
    name: &'a str,
    data: &'static [u8],
) -> (&'a str, tar::EntryType, &'static [u8], Option<&'static str>) {
    (name, tar::EntryType::Regular, data, None)
}

fn unpack_bytes(
    bytes: &[u8],
    limits: &Limits,
) -> (tempfile::TempDir, Result<Unpacked, Vec<String>>) {
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("dest");
    fs::create_dir(&dest).unwrap();
    let r = unpack(bytes, &dest, limits);
    (dir, r)
}

/// Nothing may appear beside `dest` in the scratch directory.
fn nothing_outside(dir: &tempfile::TempDir) {
    let names: Vec<String> = fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, vec!["dest".to_string()]);
}

#[test]
fn a_plain_archive_unpacks_and_a_wrapping_directory_is_lifted() {
    let bytes = craft(&[
        file("b/bundle.toml", b"x"),
        file("b/model/m.pt", b"weights"),
    ]);
    let (dir, r) = unpack_bytes(&bytes, &Limits::default());
    let done = r.unwrap();
    assert_eq!((done.files, done.bytes), (2, 8));
    assert_eq!(
        fs::read(dir.path().join("dest/model/m.pt")).unwrap(),
        b"weights"
    );
    assert!(dir.path().join("dest/bundle.toml").is_file());
}

#[test]
fn path_traversal_is_refused() {
    let bytes = craft(&[
        file("bundle.toml", b"x"),
        file("../evil", b"x"),
        file("a/../../evil2", b"x"),
    ]);
    let (dir, r) = unpack_bytes(&bytes, &Limits::default());
    let reasons = r.unwrap_err();
    assert_eq!(reasons.len(), 2, "{reasons:?}");
    assert!(
        reasons.iter().all(|r| r.contains("climbs out")),
        "{reasons:?}"
    );
    nothing_outside(&dir);
}

#[test]
fn absolute_paths_are_refused() {
    let bytes = craft(&[file("/tmp/nnserve-evil-absolute", b"x")]);
    let (_dir, r) = unpack_bytes(&bytes, &Limits::default());
    assert!(r.unwrap_err()[0].contains("absolute"));
    assert!(!Path::new("/tmp/nnserve-evil-absolute").exists());
}

#[test]
fn symlinks_out_are_refused_and_links_inside_kept() {
    let bytes = craft(&[
        file("bundle.toml", b"x"),
        ("up", tar::EntryType::Symlink, b"", Some("../outside")),
        ("abs", tar::EntryType::Symlink, b"", Some("/etc/passwd")),
        (
            "assets/ok",
            tar::EntryType::Symlink,
            b"",
            Some("../bundle.toml"),
        ),
    ]);
    let (dir, r) = unpack_bytes(&bytes, &Limits::default());
    let reasons = r.unwrap_err();
    assert_eq!(reasons.len(), 2, "{reasons:?}");
    assert!(reasons[0].contains("`up`") && reasons[0].contains("outside"));
    assert!(reasons[1].contains("`abs`") && reasons[1].contains("absolute"));
    assert!(dir.path().join("dest/assets/ok").is_symlink());
    nothing_outside(&dir);
}

#[test]
fn chains_of_symlinks_cannot_place_or_point_anything_outside() {
    use tar::EntryType::{Link, Symlink};
    // Each link alone stays inside; together they climb out one level per link.
    // Unpacks, expects a refusal, checks nothing landed beside `dest`.
    let refused = |entries: &[(&str, tar::EntryType, &[u8], Option<&str>)]| {
        let (dir, r) = unpack_bytes(&craft(entries), &Limits::default());
        nothing_outside(&dir);
        r.unwrap_err()
    };
    let reasons = refused(&[
        file("bundle.toml", b"x"),
        ("a", Symlink, b"", Some(".")),
        ("a/b", Symlink, b"", Some("..")),
        ("a/b/c", Symlink, b"", Some("..")),
        file("a/b/c/escaped.txt", b"PWNED"),
        ("a/b/c/hl", Link, b"", Some("bundle.toml")),
        ("pulled", Link, b"", Some("a/b/bundle.toml")),
    ]);
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("`a/b`") && r.contains("through the symlink `a`")),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|r| r.contains("escaped.txt")),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|r| r.contains("`pulled`")),
        "{reasons:?}"
    );
    // A link that points out is refused on its own, and so is the archive.
    let reasons = refused(&[
        file("bundle.toml", b"x"),
        ("a", Symlink, b"", Some("..")),
        ("x", Symlink, b"", Some("a/..")),
    ]);
    assert!(reasons.iter().any(|r| r.contains("`a`")), "{reasons:?}");
    // A link through another link, each inside on its own: refused once unpacked.
    let reasons = refused(&[
        file("bundle.toml", b"x"),
        ("d", tar::EntryType::Directory, b"", None),
        ("d/up", Symlink, b"", Some("..")),
        ("x", Symlink, b"", Some("d/up/d/up/..")),
    ]);
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("`x`") && r.contains("outside")),
        "{reasons:?}"
    );
}

#[test]
fn hard_links_out_are_refused_and_inside_copied() {
    let bytes = craft(&[
        file("bundle.toml", b"x"),
        ("out", tar::EntryType::Link, b"", Some("/etc/passwd")),
        ("up", tar::EntryType::Link, b"", Some("../x")),
        ("copy", tar::EntryType::Link, b"", Some("bundle.toml")),
    ]);
    let (dir, r) = unpack_bytes(&bytes, &Limits::default());
    let reasons = r.unwrap_err();
    assert_eq!(reasons.len(), 2, "{reasons:?}");
    assert!(reasons.iter().all(|r| r.contains("hard link")));
    assert_eq!(fs::read(dir.path().join("dest/copy")).unwrap(), b"x");
    nothing_outside(&dir);
}

#[test]
fn device_files_are_refused() {
    let bytes = craft(&[
        file("bundle.toml", b"x"),
        ("dev", tar::EntryType::Char, b"", None),
    ]);
    let (_dir, r) = unpack_bytes(&bytes, &Limits::default());
    assert!(r.unwrap_err()[0].contains("`dev`: is a Char entry"));
}

#[test]
fn size_and_count_limits_hold() {
    let limits = Limits {
        max_archive_bytes: 1 << 20,
        max_file_bytes: 4,
        max_total_bytes: 6,
        max_entries: 3,
        ..Limits::default()
    };
    let (_d, r) = unpack_bytes(&craft(&[file("big", b"12345")]), &limits);
    assert!(r.unwrap_err()[0].contains("over the limit of 4 bytes per file"));
    let (_d, r) = unpack_bytes(&craft(&[file("a", b"1234"), file("b", b"1234")]), &limits);
    assert!(r.unwrap_err()[0].contains("exceeds the limit of 6 bytes"));
    let many: Vec<_> = ["a", "b", "c", "d"].iter().map(|n| file(n, b"")).collect();
    let (_d, r) = unpack_bytes(&craft(&many), &limits);
    assert!(r.unwrap_err()[0].contains("more than 3 entries"));
    let archive = craft(&[file("a", b"1")]);
    let tight = Limits {
        max_archive_bytes: 10,
        ..limits
    };
    let (_d, r) = unpack_bytes(&archive, &tight);
    assert!(r.unwrap_err()[0].contains("larger than the limit of 10 bytes"));
}

/// A `.tar.gz` of one entry of `size` zero bytes (about 1000:1 compressed), then
/// an empty file `after`.
fn zeros(name: &str, size: u64, kind: tar::EntryType) -> Vec<u8> {
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    let mut b = tar::Builder::new(gz);
    let mut h = tar::Header::new_gnu();
    h.set_size(size);
    h.set_mode(0o644);
    h.set_entry_type(kind);
    h.set_cksum();
    b.append_data(&mut h, name, io::repeat(0).take(size))
        .unwrap();
    let mut after = tar::Header::new_gnu();
    after.set_size(0);
    after.set_mode(0o644);
    b.append_data(&mut after, "after", &b""[..]).unwrap();
    b.into_inner().unwrap().finish().unwrap()
}

#[test]
fn a_gzip_bomb_stops_at_the_limit() {
    // 256 MiB of zeros in one entry compresses to about 256 KiB.
    let bytes = zeros("bomb", 256 << 20, tar::EntryType::Regular);
    assert!(bytes.len() < 2 << 20);
    let limits = Limits {
        max_file_bytes: 1 << 20,
        ..Limits::default()
    };
    let (dir, r) = unpack_bytes(&bytes, &limits);
    assert!(r.unwrap_err()[0].contains("over the limit"));
    assert!(
        !dir.path().join("dest/bomb").exists(),
        "nothing of it was written"
    );
}

/// A raw tar header block of `kind` declaring `size` bytes (the data need not follow).
fn raw_header(name: &str, kind: u8, size: u64) -> Vec<u8> {
    let mut h = tar::Header::new_ustar();
    h.set_path(name).unwrap();
    h.set_size(size);
    h.set_mode(0o644);
    h.as_mut_bytes()[156] = kind;
    h.set_cksum();
    h.as_bytes().to_vec()
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    gz.write_all(bytes).unwrap();
    gz.finish().unwrap()
}

#[test]
fn metadata_headers_are_bounded_before_they_are_read() {
    for kind in [b'x', b'g', b'L', b'K'] {
        // Declares 1 GiB of PAX (or long-name) data, and sends 1 MiB of it.
        let mut tar = raw_header("././@PaxHeader", kind, 1 << 30);
        tar.extend(std::iter::repeat_n(b'a', 1 << 20));
        let (_d, r) = unpack_bytes(&gzip(&tar), &Limits::default());
        let reasons = r.unwrap_err();
        assert!(
            reasons[0].contains("of 1073741824 bytes; at most 65536"),
            "{reasons:?}"
        );
    }
    // A 65 KB long name within the bound is shown bounded.
    let long = "n".repeat(60_000);
    let mut pax = Vec::new();
    let record = format!("path={long}\n");
    let len = record.len() + 6; // "NNNNN " prefix, 5 digits and a space
    pax.extend(format!("{len} {record}").as_bytes());
    let mut tar = raw_header("pax", b'x', pax.len() as u64);
    tar.extend(&pax);
    tar.resize(tar.len().div_ceil(512) * 512, 0);
    tar.extend(raw_header("ignored", b'3', 0)); // a char device, refused
    tar.extend([0u8; 1024]);
    let (_d, r) = unpack_bytes(&gzip(&tar), &Limits::default());
    let reasons = r.unwrap_err();
    let all = reasons.join("; ");
    assert!(all.len() < 400 && all.contains("(60000 bytes)"), "{all}");
}

#[test]
fn long_names_in_gnu_and_pax_entries_pass_the_header_guard() {
    // `pack` writes GNU long-name entries for paths over 100 bytes; the guard must
    // follow the framing through them and the files' data.
    let src = tempfile::tempdir().unwrap();
    let deep = format!("assets/{}/{}", "d".repeat(120), "f".repeat(150));
    fs::create_dir_all(src.path().join(&deep).parent().unwrap()).unwrap();
    fs::write(src.path().join(&deep), vec![3u8; 70_000]).unwrap();
    fs::write(src.path().join("bundle.toml"), "[bundle]").unwrap();
    let mut a = Vec::new();
    pack(src.path(), &mut a, |_| {}).unwrap();
    let (dir, r) = unpack_bytes(&a, &Limits::default());
    r.unwrap();
    assert_eq!(
        fs::read(dir.path().join("dest").join(&deep)).unwrap().len(),
        70_000
    );
    // A PAX path record followed by its file.
    let mut pax = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_ustar();
    h.set_size(5);
    h.set_mode(0o644);
    h.set_entry_type(tar::EntryType::Regular);
    pax.append_pax_extensions([("path", deep.as_bytes())])
        .unwrap();
    h.set_path("short").unwrap();
    h.set_cksum();
    pax.append(&h, &b"hello"[..]).unwrap();
    let bytes = gzip(&pax.into_inner().unwrap());
    let (dir, r) = unpack_bytes(&bytes, &Limits::default());
    r.unwrap();
    assert_eq!(
        fs::read(dir.path().join("dest").join(&deep)).unwrap(),
        b"hello"
    );
}

/// A tar stream of raw blocks: headers made by [`raw_header`] and data padded to 512.
fn blocks(parts: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::new();
    for p in parts {
        out.extend(p);
        out.resize(out.len().div_ceil(512) * 512, 0);
    }
    out.extend([0u8; 1024]);
    out
}

fn pax_record(key: &str, value: &str) -> Vec<u8> {
    let body = format!(" {key}={value}\n");
    let mut len = body.len() + 1;
    while len.to_string().len() + body.len() != len {
        len += 1;
    }
    format!("{len}{body}").into_bytes()
}

#[test]
fn a_pax_size_record_cannot_move_the_framing_past_the_guard() {
    // A PAX `size` makes the crate read 1536 bytes of data for a header declaring 0;
    // inside them a fake header would send the guard 8 GiB ahead, and at the offset
    // the crate reads next, a 1 GiB PAX header.
    let record = pax_record("size", "1536");
    let mut fake = raw_header("fake", b'0', 0);
    fake[124..136].copy_from_slice(b"77777777777\0");
    let mut fake_h = tar::Header::new_old();
    fake_h.as_mut_bytes().copy_from_slice(&fake);
    fake_h.set_cksum();
    let tar = blocks(&[
        raw_header("pax", b'x', record.len() as u64),
        record,
        raw_header("bundle.toml", b'0', 0),
        fake_h.as_bytes().to_vec(),
        vec![0u8; 1024],
        raw_header("bomb", b'x', 1 << 30),
    ]);
    let (_d, r) = unpack_bytes(&gzip(&tar), &Limits::default());
    let reasons = r.unwrap_err();
    assert!(
        reasons[0].contains("framing is inconsistent"),
        "{reasons:?}"
    );
}

#[test]
fn sparse_entries_are_refused_before_their_extension_blocks() {
    let mut h = raw_header("sparse", b'S', 0);
    h[482] = 1; // isextended: the crate would read a further 512-byte block
    let mut header = tar::Header::new_old();
    header.as_mut_bytes().copy_from_slice(&h);
    header.set_cksum();
    let tar = blocks(&[
        header.as_bytes().to_vec(),
        vec![0u8; 512],
        raw_header("x", b'x', 1 << 30),
    ]);
    let (_d, r) = unpack_bytes(&gzip(&tar), &Limits::default());
    assert!(r.unwrap_err()[0].contains("sparse"));
}

#[test]
fn hard_links_cannot_multiply_a_file_past_the_bounds() {
    let mut entries = vec![file("bundle.toml", b"x"), file("big", &[7u8; 4096])];
    let names: Vec<String> = (0..100).map(|i| format!("copy{i}")).collect();
    entries.extend(
        names
            .iter()
            .map(|n| (n.as_str(), tar::EntryType::Link, &b""[..], Some("big"))),
    );
    let limits = Limits {
        max_total_bytes: 40_000,
        ..Limits::default()
    };
    let (dir, r) = unpack_bytes(&craft(&entries), &limits);
    assert!(r.unwrap_err()[0].contains("hard links copy more"));
    let copies = fs::read_dir(dir.path().join("dest")).unwrap().count();
    assert!(copies < 12, "{copies} files");
}

#[test]
fn skipped_data_counts_toward_the_ratio_bound() {
    // A directory entry with 48 MiB of data: the tar crate skips the data, which is
    // never written, and the decompressed stream stops at the ratio bound all the same.
    let bytes = zeros("dir/", 48 << 20, tar::EntryType::Directory);
    let limits = Limits {
        ratio_floor: 1 << 20,
        ..Limits::default()
    };
    let (_d, r) = unpack_bytes(&bytes, &limits);
    let reasons = r.unwrap_err();
    assert!(
        reasons.iter().any(|r| r.contains("more than 100 times")),
        "{reasons:?}"
    );
}

#[test]
fn reasons_are_bounded_in_number() {
    let names: Vec<String> = (0..100).map(|i| format!("../x{i}")).collect();
    let entries: Vec<_> = names.iter().map(|n| file(n.as_str(), b"")).collect();
    let (_d, r) = unpack_bytes(&craft(&entries), &Limits::default());
    let reasons = r.unwrap_err();
    assert_eq!(reasons.len(), MAX_REASONS + 1);
    assert_eq!(reasons.last().unwrap(), "and 80 more problems");
}

#[test]
fn a_highly_compressible_archive_stops_at_the_ratio() {
    // 48 MiB of zeros: under every size limit, but 1000:1.
    let bytes = zeros("zeros", 48 << 20, tar::EntryType::Regular);
    let limits = Limits {
        ratio_floor: 1 << 20,
        ..Limits::default()
    };
    let (dir, r) = unpack_bytes(&bytes, &limits);
    assert!(r.unwrap_err()[0].contains("more than 100 times"));
    let written = fs::metadata(dir.path().join("dest/zeros")).map_or(0, |m| m.len());
    // The bound counts compressed bytes as the decoder reads them, ahead of what it
    // has inflated by its input buffer (32 KiB here): 100 x that, past the floor.
    assert!(written <= 8 << 20, "{written} bytes written");
    // The same under the default floor of 64 MiB unpacks.
    let (_d, r) = unpack_bytes(&bytes, &Limits::default());
    r.unwrap();
}

#[test]
fn the_start_of_an_upload_is_checked_before_it_is_spooled() {
    let good = craft(&[file("bundle.toml", b"x")]);
    assert_eq!(check_start(&good, true), Ok(Start::Tar));
    assert_eq!(check_start(&good[..10], false), Ok(Start::NeedMore));
    assert_eq!(check_start(&good[..1], false), Ok(Start::NeedMore));
    let not_gzip = check_start(b"PK\x03\x04 a zip", false).unwrap_err();
    assert!(not_gzip.contains("not a .tar.gz"), "{not_gzip}");
    let not_tar = check_start(&gzip(&[7u8; 4096]), true).unwrap_err();
    assert!(not_tar.contains("checksum"), "{not_tar}");
    let empty = check_start(&gzip(&[0u8; 1024]), true).unwrap_err();
    assert!(empty.contains("empty"), "{empty}");
    assert!(check_start(&gzip(b"short"), true).is_err());
}

#[test]
fn pack_is_deterministic_and_round_trips_with_the_same_digest() {
    let src = tempfile::tempdir().unwrap();
    fs::create_dir_all(src.path().join("model")).unwrap();
    fs::write(src.path().join("bundle.toml"), "[bundle]").unwrap();
    fs::write(src.path().join("model/model.pt"), vec![7u8; 100_000]).unwrap();
    std::os::unix::fs::symlink("../bundle.toml", src.path().join("model/link")).unwrap();
    let mut a = Vec::new();
    pack(src.path(), &mut a, |_| {}).unwrap();
    // Touching mtimes changes nothing.
    let f = fs::File::options()
        .write(true)
        .open(src.path().join("bundle.toml"))
        .unwrap();
    f.set_modified(std::time::SystemTime::now() - std::time::Duration::from_secs(3600))
        .unwrap();
    let mut b = Vec::new();
    pack(src.path(), &mut b, |_| {}).unwrap();
    assert_eq!(a, b, "the same content packs to the same bytes");

    let (dir, r) = unpack_bytes(&a, &Limits::default());
    r.unwrap();
    assert_eq!(
        digest(&dir.path().join("dest")).unwrap(),
        digest(src.path()).unwrap()
    );
}

#[test]
fn the_digest_ignores_how_the_archive_was_made() {
    // Same files, other order, other tar flavour and compression.
    let one = craft(&[
        file("bundle.toml", b"m"),
        file("model/a", b"1"),
        file("model/b", b"2"),
    ]);
    let two = craft(&[
        file("./model/b", b"2"),
        file("model/a", b"1"),
        file("bundle.toml", b"m"),
    ]);
    let (d1, r1) = unpack_bytes(&one, &Limits::default());
    let (d2, r2) = unpack_bytes(&two, &Limits::default());
    r1.unwrap();
    r2.unwrap();
    let (x, y) = (
        digest(&d1.path().join("dest")).unwrap(),
        digest(&d2.path().join("dest")).unwrap(),
    );
    assert_eq!(x, y);
    assert!(x.starts_with("sha256:") && x.len() == 7 + 64);
    fs::write(d2.path().join("dest/model/b"), b"3").unwrap();
    assert_ne!(
        digest(&d2.path().join("dest")).unwrap(),
        x,
        "content changes the digest"
    );
}
