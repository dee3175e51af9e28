//! Decoding request bodies that are images (feature `image`): PNG or JPEG only, with the
//! side and memory caps checked before and while decoding, and 400s that say what to send.

use crate::Error;
use std::io::Cursor;

pub use image::DynamicImage;

/// Decodes a PNG or JPEG body. `max_side` caps width and height, `max_alloc` the bytes
/// the decoder may allocate; an image past either is a 400, not a trap.
pub fn decode(bytes: &[u8], max_side: u32, max_alloc: u64) -> Result<DynamicImage, Error> {
    if bytes.is_empty() {
        return Err(Error::bad_request(
            "empty body: send the bytes of a PNG or JPEG image",
        ));
    }
    let mut reader = image::ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| Error::bad_request(format!("cannot read the image: {e}")))?;
    match reader.format() {
        Some(image::ImageFormat::Png) | Some(image::ImageFormat::Jpeg) => {}
        _ => {
            return Err(Error::bad_request(
                "the body is not a PNG or JPEG image (send the raw file bytes)",
            ))
        }
    }
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(max_side);
    limits.max_image_height = Some(max_side);
    limits.max_alloc = Some(max_alloc);
    reader.limits(limits);
    reader.decode().map_err(|e| match e {
        image::ImageError::Limits(_) => Error::bad_request(too_large(max_side, max_alloc)),
        e => Error::bad_request(format!("cannot decode the image: {e}")),
    })
}

/// The 400 for an image past the caps, with the caps in it.
fn too_large(max_side: u32, max_alloc: u64) -> String {
    format!(
        "the image is too large for this model: at most {max_side} pixels a side and {} MiB decoded \
         (about {:.1} megapixels of RGB); send a smaller image",
        max_alloc >> 20,
        max_alloc as f64 / 3.0 / 1e6
    )
}
