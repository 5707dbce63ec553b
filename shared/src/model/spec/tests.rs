//! Descriptions: the shipped ones parse to the counts built by hand, and every kind
//! of mistake is named with its layer and shapes.

use super::*;

fn toml(text: &str) -> Result<NetSpec, SpecError> {
    NetSpec::from_toml(text, "test")
}

fn net(layers: &str) -> Result<NetSpec, SpecError> {
    toml(&format!(
        "input = [1, 8, 8]\nclasses = 10\nlayers = [{layers}]"
    ))
}

#[test]
fn a_short_network_parses_with_its_counts() {
    let spec =
        net(r#""conv 4 kernel=3 pad=1", "relu", "maxpool 2", "flatten", "linear 10""#).unwrap();
    assert_eq!(spec.name, "test");
    // conv 4·1·9 + 4, linear 64·10 + 10.
    assert_eq!(spec.tally.params, 40 + 650);
    assert_eq!(spec.tally.flops, 2 * (36 * 64 + 640));
    assert_eq!(spec.input_shape(), [1, 8, 8]);
}

#[test]
fn canonical_json_reads_back_to_the_same_network() {
    let text = r#"
        name = "r"
        input = [3, 12, 12]
        classes = 5
        layers = [
          "conv 8 kernel=3 pad=1 bias=false", "batchnorm", "relu",
          { repeat = 2, layers = [{ residual = ["conv 8 pad=1", "gelu"] }, "leakyrelu 0.1"] },
          { residual = ["conv 16 stride=2 pad=1"], shortcut = ["conv 16 kernel=1 stride=2"] },
          "avgpool 2 stride=1", "globalavgpool", "dropout 0.2", "linear 5",
        ]
        [augment]
        crop = 10
        flip = true
    "#;
    let spec = toml(text).unwrap();
    assert_eq!(spec.layers.len(), 12, "repeats expand");
    assert_eq!(spec.input_shape(), [3, 10, 10]);
    let json = spec.to_json();
    let again = NetSpec::from_json(&json, "other").unwrap();
    assert_eq!(again, spec);
    assert_eq!(again.to_json(), json);
}

#[test]
fn each_mistake_names_its_layer_and_shapes() {
    let err = |layers: &str| net(layers).unwrap_err().to_string();
    // A 5×5 kernel on a 2×2 map.
    let e = err(r#""maxpool 4", "conv 8 kernel=5", "flatten", "linear 10""#);
    assert!(e.contains("layers[1] `conv 8 kernel=5"), "{e}");
    assert!(e.contains("5×5 kernel does not fit a 2×2 map"), "{e}");
    // A linear layer on a map.
    let e = err(r#""linear 10""#);
    assert!(
        e.contains("layers[0]") && e.contains("1×8×8") && e.contains("flatten"),
        "{e}"
    );
    // 10⁹ channels.
    let e = err(r#""conv 1000000000", "flatten", "linear 10""#);
    assert!(e.contains("output channels 1000000000 is more than"), "{e}");
    // A residual whose shapes differ, inside a repeat.
    let e = err(
        r#"{ repeat = 2, layers = [{ residual = ["conv 4 pad=1"] }] }, "flatten", "linear 10""#,
    );
    assert!(
        e.contains("layers[0]") && e.contains("1×8×8") && e.contains("4×8×8"),
        "{e}"
    );
    // The wrong number of classes.
    let e = err(r#""flatten", "linear 7""#);
    assert!(
        e.contains("ends in 7 features, but scores 10 classes"),
        "{e}"
    );
    // A word inside a residual body.
    let e = err(r#"{ residual = ["relu", "conv 1 kernal=3"] }, "flatten", "linear 10""#);
    assert!(
        e.contains("layers[0].residual[1]") && e.contains("kernal"),
        "{e}"
    );
    // Padding as large as the kernel.
    let e = err(r#""conv 2 kernel=3 pad=3", "flatten", "linear 10""#);
    assert!(
        e.contains("padding 3 must be less than the kernel side 3"),
        "{e}"
    );
}

#[test]
fn unknown_keys_and_bad_tables_are_refused() {
    let e = toml("input = [1, 8, 8]\nclasses = 10\nlayrs = []\n")
        .unwrap_err()
        .to_string();
    assert!(e.contains("layrs"), "{e}");
    let e = net(r#"{ residul = ["relu"] }"#).unwrap_err().to_string();
    assert!(e.contains("residul"), "{e}");
    let e = toml("input = [1, 8, 8]\nclasses = 10\nlayers = [\"flatten\", \"linear 10\"]\n[augment]\ncrop = 9\n")
        .unwrap_err()
        .to_string();
    assert!(e.contains("crop = 9"), "{e}");
    let e = toml("input = [1, 8, 8]\nclasses = 10\nlayers = [\"flatten\", \"linear 10\"]\n[augment]\nrotate = 9\n")
        .unwrap_err()
        .to_string();
    assert!(e.contains("rotate"), "{e}");
    let e = NetSpec::from_json("{\"input\": [1, 8, 8]", "x").unwrap_err();
    assert!(matches!(e, SpecError::Syntax(_)), "{e}");
}

#[test]
fn descriptions_are_bounded() {
    // A huge fully connected layer.
    let e = toml("input = [3, 1024, 1024]\nclasses = 10\nlayers = [\"flatten\", \"linear 16384\", \"linear 10\"]")
        .unwrap_err()
        .to_string();
    assert!(e.contains("more than"), "{e}");
    // Activations: wide convolutions on a big image.
    let e = toml("input = [3, 1024, 1024]\nclasses = 10\nlayers = [\"conv 64 pad=1\", \"globalavgpool\", \"linear 10\"]")
        .unwrap_err()
        .to_string();
    assert!(e.contains("activations of one image"), "{e}");
    // Repeats that multiply past the layer bound.
    let deep =
        r#"{ repeat = 64, layers = [{ repeat = 64, layers = ["relu"] }] }, "flatten", "linear 10""#;
    assert!(matches!(net(deep), Err(SpecError::TooLarge { .. })));
    // Deep nesting is refused, not followed down the stack.
    let mut nested = String::from("\"relu\"");
    for _ in 0..20 {
        nested = format!("{{ residual = [{nested}] }}");
    }
    assert!(net(&format!("{nested}, \"flatten\", \"linear 10\"")).is_err());
    let json = format!(
        "{{\"input\":[1,8,8],\"classes\":10,\"layers\":[{}]}}",
        "[".repeat(100_000)
    );
    assert!(NetSpec::from_json(&json, "x").is_err());
    assert!(toml(&"#".repeat(MAX_TEXT_BYTES + 1)).is_err());
    // Inputs and classes.
    assert!(
        toml("input = [0, 8, 8]\nclasses = 10\nlayers = [\"flatten\", \"linear 10\"]").is_err()
    );
    assert!(toml("input = [1, 8, 8]\nclasses = 1\nlayers = [\"flatten\", \"linear 1\"]").is_err());
    assert!(
        toml(
            "name = \"a b\"\ninput = [1, 8, 8]\nclasses = 10\nlayers = [\"flatten\", \"linear 10\"]"
        )
        .is_err()
    );
}
