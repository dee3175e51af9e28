//! What an upload's first bytes say ([`check_start`]): a gzip'd tar whose first header
//! is sound, or not an archive at all, before the rest is read.

use flate2::read::GzDecoder;
use std::io::Read;

/// What the first bytes of an upload say.
#[derive(Debug, PartialEq, Eq)]
pub enum Start {
    /// A gzip stream whose first block is a valid tar header.
    Tar,
    /// Too few bytes to tell yet.
    NeedMore,
}

/// Compressed bytes after which the first tar header must have appeared.
pub const START_BYTES: usize = 64 << 10;

/// Checks the first bytes of an upload before anything is spooled to disk: the gzip
/// magic, and that what they decompress to starts with a valid tar header. `whole` says
/// whether `prefix` is the entire upload.
pub fn check_start(prefix: &[u8], whole: bool) -> Result<Start, String> {
    const HOW: &str =
        "make one with `nnserve bundle pack DIR` or `tar -C DIR -czf bundle.tar.gz .`";
    if prefix.len() < 2 && !whole {
        return Ok(Start::NeedMore);
    }
    if prefix.len() < 2 || prefix[..2] != [0x1f, 0x8b] {
        return Err(format!(
            "the upload is not a .tar.gz archive (it does not start with gzip's magic bytes); {HOW}"
        ));
    }
    let mut block = [0u8; 512];
    let mut got = 0;
    let mut gz = GzDecoder::new(prefix);
    while got < block.len() {
        match gz.read(&mut block[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            // A prefix cut mid-stream ends with an unexpected EOF: judge what came out.
            Err(_) if !whole && prefix.len() < START_BYTES => return Ok(Start::NeedMore),
            Err(e) => {
                return Err(format!(
                    "the upload is not a valid gzip stream ({e}); {HOW}"
                ))
            }
        }
    }
    if got < block.len() && !whole && prefix.len() < START_BYTES {
        return Ok(Start::NeedMore);
    }
    if got < block.len() {
        return Err(if whole {
            format!("the archive is too short to hold a tar header; {HOW}")
        } else {
            format!("the archive's first 64 KiB do not decompress to a tar header; {HOW}")
        });
    }
    if block.iter().all(|&b| b == 0) {
        return Err(format!("the archive is empty; {HOW}"));
    }
    if !header_checksum_ok(&block) {
        return Err(format!(
            "the gzip stream does not hold a tar archive (the first header's checksum is wrong); {HOW}"
        ));
    }
    Ok(Start::Tar)
}

/// A tar header's checksum: the sum of its bytes with the checksum field as spaces.
fn header_checksum_ok(block: &[u8; 512]) -> bool {
    let field = &block[148..156];
    let text = String::from_utf8_lossy(field);
    let Ok(stored) = u32::from_str_radix(text.trim_matches(|c: char| c == ' ' || c == '\0'), 8)
    else {
        return false;
    };
    let sum: u32 = block
        .iter()
        .enumerate()
        .map(|(i, &b)| {
            if (148..156).contains(&i) {
                b' ' as u32
            } else {
                b as u32
            }
        })
        .sum();
    sum == stored
}
