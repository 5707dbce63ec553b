//! The CIFAR-10 binary format: records of one label byte followed by 3×32×32 pixel
//! bytes (red plane, green plane, blue plane), concatenated, no header.

use super::{CLASSES, DataError, ImageSet, maybe_gunzip};

/// A CIFAR-10 image: channels, rows, cols.
pub const SHAPE: [usize; 3] = [3, 32, 32];

/// Bytes per CIFAR-10 record.
pub const RECORD: usize = 1 + SHAPE[0] * SHAPE[1] * SHAPE[2];

/// Parses one or more concatenated CIFAR-10 binary batches.
pub fn parse(file: &str, bytes: &[u8]) -> Result<ImageSet, DataError> {
    let bytes = maybe_gunzip(file, bytes)?;
    if bytes.is_empty() {
        return Err(DataError::Empty {
            file: file.to_string(),
        });
    }
    if bytes.len() % RECORD != 0 {
        let whole = bytes.len() / RECORD + 1;
        return Err(DataError::Truncated {
            file: file.to_string(),
            expected: whole * RECORD,
            actual: bytes.len(),
        });
    }
    let n = bytes.len() / RECORD;
    let mut pixels = Vec::with_capacity(n * (RECORD - 1));
    let mut labels = Vec::with_capacity(n);
    for (index, record) in bytes.chunks_exact(RECORD).enumerate() {
        let label = record[0];
        if usize::from(label) >= CLASSES {
            return Err(DataError::BadLabel {
                file: file.to_string(),
                index,
                label: label.into(),
                classes: CLASSES,
            });
        }
        labels.push(u16::from(label));
        pixels.extend_from_slice(&record[1..]);
    }
    let [channels, rows, cols] = SHAPE;
    Ok(ImageSet {
        source: file.to_string(),
        channels,
        rows,
        cols,
        pixels,
        labels,
    })
}

/// The records of `set` in the CIFAR-10 binary format (the inverse of [`parse`]),
/// for tests and tools that write CIFAR-format files.
///
/// # Panics
/// If the images are not 3×32×32 or a label is not one byte.
pub fn encode(set: &ImageSet) -> Vec<u8> {
    assert_eq!(set.shape(), SHAPE, "CIFAR-10 images are 3×32×32");
    let mut out = Vec::with_capacity(set.len() * RECORD);
    for (i, &label) in set.labels.iter().enumerate() {
        out.push(u8::try_from(label).expect("CIFAR-10 labels are one byte"));
        out.extend_from_slice(set.image(i));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn records(labels: &[u8]) -> Vec<u8> {
        labels
            .iter()
            .flat_map(|&l| std::iter::once(l).chain((0..RECORD - 1).map(|i| (i % 251) as u8)))
            .collect()
    }

    #[test]
    fn parses_records() {
        let set = parse("data_batch_1.bin", &records(&[3, 0, 9])).unwrap();
        assert_eq!(
            (set.len(), set.channels, set.rows, set.cols),
            (3, 3, 32, 32)
        );
        assert_eq!(set.labels, [3, 0, 9]);
        assert_eq!(set.image(1)[..3], [0, 1, 2]);
        assert!(set.expect_shape([1, 28, 28]).is_err());
        assert_eq!(encode(&set), records(&[3, 0, 9]));
    }

    #[test]
    fn malformed_inputs_are_errors() {
        let bytes = records(&[1, 2]);
        assert!(matches!(
            parse("f", &bytes[..RECORD + 5]),
            Err(DataError::Truncated { .. })
        ));
        assert!(matches!(
            parse("f", &records(&[1, 11])),
            Err(DataError::BadLabel {
                index: 1,
                label: 11,
                ..
            })
        ));
        assert!(matches!(parse("f", &[]), Err(DataError::Empty { .. })));
    }
}
