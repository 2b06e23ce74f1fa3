//! `settings`: `fmoec.toml`, what the model file does not say (where to run, where to
//! write, which Megatron-LM checkout to test against).
//!
//! Owns finding and reading the settings file and validating its values; today it reads
//! the user's own hardware profiles (`[hardware.NAME]`), which the front end consults
//! after the stdlib's `std.hardware` profiles. Sections it does not know are left for
//! other phases and ignored here. Knows nothing about models or plans.
//!
//! ```toml
//! [hardware.lab_a100]
//! memory_gib    = 40          # or memory_bytes = 42949672960
//! bf16_tflops   = 312.0
//! fp16_tflops   = 312.0       # defaults to bf16_tflops
//! fp32_tflops   = 19.5
//! hbm_gbps      = 1555.0
//! nvlink_gbps   = 300.0       # per GPU, one direction
//! network_gbps  = 25.0        # per GPU, one direction
//! gpus_per_node = 8
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::check::Hardware;

/// The settings file's name.
pub const FILE_NAME: &str = "fmoec.toml";

/// One `[hardware.NAME]` table as written.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HardwareProfile {
    pub memory_bytes: Option<u64>,
    pub memory_gib: Option<f64>,
    pub bf16_tflops: f64,
    pub fp16_tflops: Option<f64>,
    pub fp32_tflops: f64,
    pub hbm_gbps: f64,
    pub nvlink_gbps: f64,
    pub network_gbps: f64,
    pub gpus_per_node: u64,
}

/// The parsed settings.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
pub struct Settings {
    /// User hardware profiles by name, sorted.
    #[serde(default)]
    pub hardware: BTreeMap<String, HardwareProfile>,
    /// The file these came from (`None` for defaults).
    #[serde(skip)]
    pub path: Option<PathBuf>,
}

/// A settings file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("cannot read `{path}`: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("`{path}` is not valid settings: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("`{path}`: [hardware.{name}] {message}")]
    Invalid {
        path: PathBuf,
        name: String,
        message: String,
    },
}

impl Settings {
    /// Parses settings text; `path` names the file in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Settings, SettingsError> {
        let mut s: Settings = toml::from_str(text).map_err(|e| SettingsError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        s.path = Some(path.to_path_buf());
        for (name, p) in &s.hardware {
            p.to_hardware(name)
                .map_err(|message| SettingsError::Invalid {
                    path: path.to_path_buf(),
                    name: name.clone(),
                    message,
                })?;
        }
        Ok(s)
    }

    /// Reads one settings file.
    pub fn read(path: &Path) -> Result<Settings, SettingsError> {
        let text = std::fs::read_to_string(path).map_err(|source| SettingsError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Settings::parse(&text, path)
    }

    /// `fmoec.toml` in `dir`, else in the user's config folder
    /// (`$XDG_CONFIG_HOME/fmoec/` or `~/.config/fmoec/`), else defaults.
    pub fn discover(dir: &Path) -> Result<Settings, SettingsError> {
        let mut candidates = vec![dir.join(FILE_NAME)];
        let config = std::env::var_os("XDG_CONFIG_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")));
        if let Some(c) = config {
            candidates.push(c.join("fmoec").join(FILE_NAME));
        }
        match candidates.into_iter().find(|p| p.is_file()) {
            Some(p) => Settings::read(&p),
            None => Ok(Settings::default()),
        }
    }

    /// A user hardware profile by name.
    pub fn hardware(&self, name: &str) -> Option<Hardware> {
        self.hardware
            .get(name)
            .and_then(|p| p.to_hardware(name).ok())
    }
}

impl HardwareProfile {
    /// The checked profile, or what is wrong with it.
    pub fn to_hardware(&self, name: &str) -> Result<Hardware, String> {
        let memory_bytes = match (self.memory_bytes, self.memory_gib) {
            (Some(b), None) => b,
            (None, Some(g)) if g.is_finite() && g > 0.0 => (g * (1u64 << 30) as f64) as u64,
            (None, Some(g)) => return Err(format!("memory_gib = {g} must be positive")),
            (Some(_), Some(_)) => return Err("give memory_bytes or memory_gib, not both".into()),
            (None, None) => return Err("needs memory_bytes or memory_gib".into()),
        };
        if memory_bytes == 0 {
            return Err("memory must be positive".into());
        }
        let fp16 = self.fp16_tflops.unwrap_or(self.bf16_tflops);
        for (what, v) in [
            ("bf16_tflops", self.bf16_tflops),
            ("fp16_tflops", fp16),
            ("fp32_tflops", self.fp32_tflops),
            ("hbm_gbps", self.hbm_gbps),
            ("nvlink_gbps", self.nvlink_gbps),
            ("network_gbps", self.network_gbps),
        ] {
            if !(v.is_finite() && v > 0.0) {
                return Err(format!("{what} = {v} must be a positive number"));
            }
        }
        if self.gpus_per_node == 0 {
            return Err("gpus_per_node must be at least 1".into());
        }
        Ok(Hardware {
            name: name.to_string(),
            memory_bytes,
            bf16_tflops: self.bf16_tflops,
            fp16_tflops: fp16,
            fp32_tflops: self.fp32_tflops,
            hbm_gbps: self.hbm_gbps,
            nvlink_gbps: self.nvlink_gbps,
            network_gbps: self.network_gbps,
            gpus_per_node: self.gpus_per_node,
        })
    }
}
