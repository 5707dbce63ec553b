//! The network descriptions shipped with tether (`models/` at the repository's
//! root), compiled in so every command and the browser worker know them by name.

/// Name and TOML text of each shipped description, in the order the CLI lists them.
pub const SHIPPED: [(&str, &str); 7] = [
    ("small", include_str!("../../../models/small.toml")),
    ("paper", include_str!("../../../models/paper.toml")),
    ("cifar", include_str!("../../../models/cifar.toml")),
    ("lenet5", include_str!("../../../models/lenet5.toml")),
    ("vgg", include_str!("../../../models/vgg.toml")),
    ("resnet8", include_str!("../../../models/resnet8.toml")),
    ("resnet20", include_str!("../../../models/resnet20.toml")),
];
