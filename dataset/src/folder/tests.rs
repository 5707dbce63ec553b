//! The image folder loader against generated folders: what decodes, what is
//! skipped or refused, the cache, the split, the bounds.

use super::*;

/// A folder of three colour classes, PNG and JPEG, grey and colour, of mixed
/// sizes; with the odd files the issue names.
fn write_folder(root: &Path) {
    let colours = [[220u8, 30, 30], [30, 220, 30], [30, 30, 220]];
    for (split, n) in [("train", 12), ("test", 4)] {
        for (c, name) in ["apple", "leaf", "sky"].iter().enumerate() {
            let dir = root.join(split).join(name);
            std::fs::create_dir_all(&dir).unwrap();
            for i in 0..n {
                let (w, h) = (20 + 7 * i as u32, 16 + 3 * i as u32);
                let img = image::RgbImage::from_fn(w, h, |x, y| {
                    let [r, g, b] = colours[c];
                    image::Rgb([r ^ (x as u8 & 7), g ^ (y as u8 & 7), b])
                });
                let ext = if i % 2 == 0 { "png" } else { "jpg" };
                img.save(dir.join(format!("{i}.{ext}"))).unwrap();
            }
        }
    }
    let apple = root.join("train/apple");
    image::GrayImage::from_pixel(1, 1, image::Luma([200]))
        .save(apple.join("tiny.png"))
        .unwrap();
    std::fs::write(apple.join("notes.png"), "not an image").unwrap();
    let jpeg = std::fs::read(apple.join("1.jpg")).unwrap();
    std::fs::write(apple.join("cut.jpg"), &jpeg[..jpeg.len() / 3]).unwrap();
    #[cfg(unix)]
    std::os::unix::fs::symlink(root.join("train"), apple.join("loop")).unwrap();
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tether-folder-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

#[test]
fn a_folder_decodes_to_the_networks_images_skipping_what_is_not_one() {
    let root = scratch("decode");
    write_folder(&root);
    assert!(is_image_folder(&root));
    let cache = root.join("cache");
    let f = load_folder(&root, [3, 8, 8], Some(&cache)).unwrap();
    assert_eq!(f.data.classes, ["apple", "leaf", "sky"]);
    // 36 + the 1×1 image; the text file and the cut JPEG skipped, the link not followed.
    assert_eq!(f.data.train.len(), 37);
    assert_eq!(f.data.test.len(), 12);
    assert_eq!(f.skipped.0, 2, "{:?}", f.skipped.1);
    assert!(f.skipped.1.iter().any(|s| s.contains("notes.png")));
    assert_eq!(f.data.train.shape(), [3, 8, 8]);
    // Each class's colour survives: the red plane is bright for apples only.
    let red = |i: usize| {
        f.data.train.image(i)[..64]
            .iter()
            .map(|&p| u32::from(p))
            .sum::<u32>()
            / 64
    };
    let first_leaf = f.data.train.labels.iter().position(|&l| l == 1).unwrap();
    assert!(
        red(0) > 150 && red(first_leaf) < 80,
        "{} {}",
        red(0),
        red(first_leaf)
    );
    // The second read comes from the cache, the same pixels.
    let again = load_folder(&root, [3, 8, 8], Some(&cache)).unwrap();
    assert!(again.cached && !f.cached);
    assert_eq!(again.data.train.pixels, f.data.train.pixels);
    assert_eq!(again.data.classes, f.data.classes);
    // Grey, another size: decoded anew.
    let grey = load_folder(&root, [1, 5, 7], Some(&cache)).unwrap();
    assert!(!grey.cached);
    assert_eq!(grey.data.train.shape(), [1, 5, 7]);
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn what_cannot_make_a_data_set_is_refused_with_its_path() {
    let root = scratch("refuse");
    write_folder(&root);
    std::fs::create_dir_all(root.join("train/empty")).unwrap();
    let err = load_folder(&root, [3, 8, 8], None).unwrap_err().to_string();
    assert!(
        err.contains("empty") && err.contains("train/empty"),
        "{err}"
    );
    let err = load_folder(&root, [4, 8, 8], None).unwrap_err().to_string();
    assert!(err.contains("4 channels"), "{err}");
    let one = scratch("one-class");
    std::fs::create_dir_all(one.join("train/only")).unwrap();
    let err = load_folder(&one, [3, 8, 8], None).unwrap_err().to_string();
    assert!(err.contains("at least 2"), "{err}");
    let many = scratch("many");
    for i in 0..=MAX_CLASSES {
        std::fs::create_dir_all(many.join(format!("train/c{i}"))).unwrap();
    }
    let err = load_folder(&many, [3, 8, 8], None).unwrap_err().to_string();
    assert!(err.contains("at most 65536"), "{err}");
    for d in [root, one, many] {
        let _ = std::fs::remove_dir_all(d);
    }
}

/// A PNG that says it is `side`×`side` grey pixels: a valid header, no pixels.
fn png_header(side: u32) -> Vec<u8> {
    fn crc32(bytes: &[u8]) -> u32 {
        let mut crc = !0u32;
        for &b in bytes {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = if crc & 1 == 1 {
                    (crc >> 1) ^ 0xEDB8_8320
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }
    let mut ihdr = b"IHDR".to_vec();
    ihdr.extend_from_slice(&side.to_be_bytes());
    ihdr.extend_from_slice(&side.to_be_bytes());
    ihdr.extend_from_slice(&[8, 0, 0, 0, 0]); // 8-bit grey, no interlace
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    png.extend_from_slice(&13u32.to_be_bytes());
    png.extend_from_slice(&ihdr);
    png.extend_from_slice(&crc32(&ihdr).to_be_bytes());
    png.extend_from_slice(&0u32.to_be_bytes());
    png.extend_from_slice(b"IEND");
    png.extend_from_slice(&crc32(b"IEND").to_be_bytes());
    png
}

#[test]
fn a_huge_image_is_skipped_before_its_pixels_are_allocated() {
    let root = scratch("huge");
    write_folder(&root);
    let huge = root.join("train/sky/huge.png");
    std::fs::write(&huge, png_header(20_000)).unwrap();
    let f = load_folder(&root, [3, 8, 8], None).unwrap();
    assert_eq!(
        f.data.train.len(),
        37,
        "the 20 000 × 20 000 image is not one of them"
    );
    assert!(
        f.skipped.1.iter().any(|s| s.contains("huge.png")),
        "{:?}",
        f.skipped.1
    );
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn ten_thousand_classes_get_their_own_labels() {
    let root = scratch("ten-thousand");
    let dot = {
        let mut bytes = std::io::Cursor::new(Vec::new());
        image::GrayImage::from_pixel(2, 2, image::Luma([9]))
            .write_to(&mut bytes, image::ImageFormat::Png)
            .unwrap();
        bytes.into_inner()
    };
    for split in ["train", "test"] {
        for c in 0..10_000 {
            let dir = root.join(format!("{split}/c{c:05}"));
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("a.png"), &dot).unwrap();
        }
    }
    let f = load_folder(&root, [1, 2, 2], None).unwrap();
    assert_eq!(f.data.classes.len(), 10_000);
    assert_eq!(f.data.classes[9_999], "c09999");
    assert_eq!(f.data.train.labels[9_999], 9_999);
    assert_eq!(f.data.test.labels[300], 300);
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn class_folders_alone_are_split_by_a_seeded_tenth() {
    let root = scratch("split");
    write_folder(&root);
    let flat = root.join("flat");
    std::fs::rename(root.join("train"), &flat).unwrap();
    let f = load_folder(&flat, [3, 4, 4], None).unwrap();
    let total = f.data.train.len() + f.data.test.len();
    assert_eq!(total, 37);
    assert!(
        !f.data.test.is_empty() && f.data.test.len() < 12,
        "{}",
        f.data.test.len()
    );
    let again = load_folder(&flat, [3, 4, 4], None).unwrap();
    assert_eq!(again.data.test.labels, f.data.test.labels);
    let _ = std::fs::remove_dir_all(&root);
}
