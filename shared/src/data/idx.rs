//! The IDX format of MNIST and Fashion-MNIST, gzipped or not: a big-endian header
//! (magic 0x00000803 for images, 0x00000801 for labels, then one u32 per dimension)
//! followed by unsigned bytes.

use super::{DataError, ImageSet, maybe_gunzip};

const IMAGES_MAGIC: u32 = 0x0000_0803;
const LABELS_MAGIC: u32 = 0x0000_0801;

fn read_u32(file: &str, bytes: &[u8], at: usize) -> Result<u32, DataError> {
    bytes
        .get(at..at + 4)
        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
        .ok_or(DataError::Truncated {
            file: file.to_string(),
            expected: at + 4,
            actual: bytes.len(),
        })
}

/// Parses an IDX file of `dims` dimensions with the given magic; returns the
/// dimensions and the payload.
fn parse<'a>(
    file: &str,
    bytes: &'a [u8],
    magic: u32,
    what: &'static str,
) -> Result<(Vec<usize>, &'a [u8]), DataError> {
    let found = read_u32(file, bytes, 0)?;
    if found != magic {
        return Err(DataError::BadMagic {
            file: file.to_string(),
            found,
            expected: what,
        });
    }
    let ndim = (magic & 0xff) as usize;
    let mut dims = Vec::with_capacity(ndim);
    for d in 0..ndim {
        dims.push(read_u32(file, bytes, 4 + 4 * d)? as usize);
    }
    let header = 4 + 4 * ndim;
    // Checked: a hostile header must not overflow into a small "expected" size.
    let payload = dims
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .and_then(|n| n.checked_add(header))
        .unwrap_or(usize::MAX);
    if bytes.len() < payload {
        return Err(DataError::Truncated {
            file: file.to_string(),
            expected: payload,
            actual: bytes.len(),
        });
    }
    if bytes.len() > payload {
        return Err(DataError::TrailingBytes {
            file: file.to_string(),
            expected: payload,
            extra: bytes.len() - payload,
        });
    }
    if dims[0] == 0 {
        return Err(DataError::Empty {
            file: file.to_string(),
        });
    }
    Ok((dims, &bytes[header..]))
}

/// Parses an images file: returns (rows, cols, pixels).
pub fn parse_images(file: &str, bytes: &[u8]) -> Result<(usize, usize, Vec<u8>), DataError> {
    let bytes = maybe_gunzip(file, bytes)?;
    let (dims, payload) = parse(
        file,
        &bytes,
        IMAGES_MAGIC,
        "0x00000803, IDX unsigned-byte images",
    )?;
    Ok((dims[1], dims[2], payload.to_vec()))
}

/// Parses a labels file. Any byte is a label (EMNIST has 47 classes, MNIST 10):
/// the network that trains on the set checks them ([`ImageSet::expect_network`]).
pub fn parse_labels(file: &str, bytes: &[u8]) -> Result<Vec<u16>, DataError> {
    let bytes = maybe_gunzip(file, bytes)?;
    let (_, payload) = parse(
        file,
        &bytes,
        LABELS_MAGIC,
        "0x00000801, IDX unsigned-byte labels",
    )?;
    Ok(payload.iter().map(|&l| u16::from(l)).collect())
}

/// Parses a pair of images and labels files into one [`ImageSet`].
pub fn parse_image_set(
    images_file: &str,
    images: &[u8],
    labels_file: &str,
    labels: &[u8],
) -> Result<ImageSet, DataError> {
    let (rows, cols, pixels) = parse_images(images_file, images)?;
    let labels_vec = parse_labels(labels_file, labels)?;
    let image_count = pixels.len() / (rows * cols);
    if image_count != labels_vec.len() {
        return Err(DataError::CountMismatch {
            images: images_file.to_string(),
            image_count,
            labels: labels_file.to_string(),
            label_count: labels_vec.len(),
        });
    }
    Ok(ImageSet {
        source: images_file.to_string(),
        channels: 1,
        rows,
        cols,
        pixels,
        labels: labels_vec,
    })
}

/// Encodes an IDX file (tests and tools that write small data sets).
pub fn encode(dims: &[u32], payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + 4 * dims.len() + payload.len());
    out.extend_from_slice(&[0, 0, 0x08, dims.len() as u8]);
    for d in dims {
        out.extend_from_slice(&d.to_be_bytes());
    }
    out.extend_from_slice(payload);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn images(n: u32, rows: u32, cols: u32) -> Vec<u8> {
        encode(&[n, rows, cols], &vec![7u8; (n * rows * cols) as usize])
    }
    fn labels(values: &[u8]) -> Vec<u8> {
        encode(&[values.len() as u32], values)
    }
    fn gzip(bytes: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(bytes).unwrap();
        e.finish().unwrap()
    }

    #[test]
    fn parses_plain_and_gzipped() {
        let set = parse_image_set("i", &images(3, 28, 28), "l", &labels(&[0, 9, 4])).unwrap();
        assert_eq!(
            (set.len(), set.rows, set.cols, set.channels),
            (3, 28, 28, 1)
        );
        assert_eq!(set.labels, [0, 9, 4]);
        let gz = parse_image_set(
            "i.gz",
            &gzip(&images(3, 28, 28)),
            "l.gz",
            &gzip(&labels(&[0, 9, 4])),
        )
        .unwrap();
        assert_eq!(
            gz,
            ImageSet {
                source: "i.gz".into(),
                ..set
            }
        );
    }

    #[test]
    fn bad_magic_is_named() {
        let mut bytes = images(1, 28, 28);
        bytes[3] = 0x02;
        let err = parse_images("train-images", &bytes).unwrap_err();
        assert!(
            matches!(err, DataError::BadMagic { ref file, found: 0x0802, .. } if file == "train-images"),
            "{err}"
        );
        // A labels file given as images is also a bad magic.
        assert!(matches!(
            parse_images("x", &labels(&[1])),
            Err(DataError::BadMagic { .. })
        ));
        assert!(err.to_string().contains("train-images"));
    }

    #[test]
    fn truncated_files_are_errors() {
        let bytes = images(2, 28, 28);
        for cut in [0, 3, 9, bytes.len() - 1] {
            let err = parse_images("f", &bytes[..cut]).unwrap_err();
            assert!(
                matches!(err, DataError::Truncated { .. }),
                "cut {cut}: {err}"
            );
        }
        let gz = gzip(&bytes);
        let err = parse_images("f.gz", &gz[..gz.len() / 2]).unwrap_err();
        assert!(matches!(err, DataError::Gzip { .. }), "{err}");
    }

    #[test]
    fn huge_header_does_not_overflow() {
        let bytes = encode(&[u32::MAX, u32::MAX, u32::MAX], &[]);
        assert!(matches!(
            parse_images("f", &bytes),
            Err(DataError::Truncated { .. })
        ));
    }

    #[test]
    fn trailing_bytes_are_errors() {
        let mut bytes = labels(&[1, 2]);
        bytes.push(3);
        assert!(matches!(
            parse_labels("f", &bytes),
            Err(DataError::TrailingBytes { extra: 1, .. })
        ));
    }

    #[test]
    fn counts_that_disagree_are_errors() {
        let err =
            parse_image_set("imgs", &images(3, 28, 28), "lbls", &labels(&[1, 2])).unwrap_err();
        assert_eq!(
            err,
            DataError::CountMismatch {
                images: "imgs".into(),
                image_count: 3,
                labels: "lbls".into(),
                label_count: 2
            }
        );
    }

    #[test]
    fn any_byte_is_a_label_and_empty_files_are_errors() {
        assert_eq!(parse_labels("f", &labels(&[1, 46])), Ok(vec![1, 46]));
        assert!(matches!(
            parse_labels("f", &labels(&[])),
            Err(DataError::Empty { .. })
        ));
    }

    #[test]
    fn wrong_image_size_for_the_model_is_an_error() {
        let set = parse_image_set("imgs", &images(1, 32, 32), "l", &labels(&[1])).unwrap();
        let err = set.expect_shape([1, 28, 28]).unwrap_err();
        assert!(
            err.to_string().contains("imgs") && err.to_string().contains("1×32×32"),
            "{err}"
        );
        assert!(set.expect_shape([1, 32, 32]).is_ok());
    }
}
