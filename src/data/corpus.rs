//! The corpus embedded in the binary (see `data/README.md`: Shakespeare, public domain,
//! gzip), for `fmoec run`'s `builtin(...)` and `fmoec tokenizer train --builtin`, so that
//! neither needs a download. Knows nothing about tokens or training.

use std::io::Read;

use anyhow::{bail, Context, Result};

static SHAKESPEARE_GZ: &[u8] = include_bytes!("../../data/shakespeare.txt.gz");

/// Names `builtin(...)` accepts.
pub const BUILTIN_NAMES: &[&str] = &["shakespeare", "tiny-shakespeare"];

/// Decompresses the embedded corpus `name`.
pub fn builtin_text(name: &str) -> Result<Vec<u8>> {
    if !BUILTIN_NAMES.contains(&name) {
        bail!(
            "there is no built-in corpus named `{name}`; built-in corpora: {}",
            BUILTIN_NAMES.join(", ")
        );
    }
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(SHAKESPEARE_GZ)
        .read_to_end(&mut out)
        .context("the embedded corpus is corrupt")?;
    Ok(out)
}
