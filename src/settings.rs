//! `settings`: `fmoec.toml`, what the model file does not say: the user's own hardware
//! profiles, where to run and write by default, and which Megatron-LM checkout emitted
//! patches are tested against. The model file says what to train; settings say where.
//!
//! Looked up in the working directory first, then in `$XDG_CONFIG_HOME/fmoec/` (or
//! `~/.config/fmoec/`). A missing file means defaults; a malformed one is an error that
//! names the file, line and key. This module knows nothing about phases beyond the
//! [`Hardware`] type it produces.
//!
//! ```toml
//! [run]
//! device = "cuda"          # cpu | cuda | cuda:N
//! out = "runs"             # where `fmoec run` writes checkpoints, metrics, plots
//!
//! [emit]
//! out = "megatron-out"
//! megatron_src = { "v2.2" = "/src/Megatron-LM" }
//!
//! [hardware.my_h100_pcie]
//! memory_gib = 80
//! bf16_tflops = 756
//! fp16_tflops = 756
//! fp32_tflops = 51
//! fp8_tflops = 1513   # optional: GPUs with FP8 tensor cores
//! hbm_gbps = 2000
//! nvlink_gbps = 300
//! network_gbps = 25
//! gpus_per_node = 8
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::check::Hardware;

pub const FILE_NAME: &str = "fmoec.toml";

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    #[serde(default)]
    pub run: RunSettings,
    #[serde(default)]
    pub emit: EmitSettings,
    /// User hardware profiles by name, usable like stdlib ones (`gpus = 8 of my_gpu`).
    #[serde(default)]
    pub hardware: BTreeMap<String, HardwareSettings>,
    /// The file these settings came from (`None`: defaults).
    #[serde(skip)]
    pub source: Option<PathBuf>,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RunSettings {
    /// Default `--device` of `fmoec run`.
    pub device: Option<String>,
    /// Default output folder of `fmoec run`.
    pub out: Option<PathBuf>,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EmitSettings {
    /// Default `-o` of `fmoec emit`.
    pub out: Option<PathBuf>,
    /// Megatron-LM checkouts by release (`"v2.2"`), to test emitted patches against.
    #[serde(default)]
    pub megatron_src: BTreeMap<String, PathBuf>,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HardwareSettings {
    pub memory_gib: f64,
    pub bf16_tflops: f64,
    pub fp16_tflops: Option<f64>,
    pub fp32_tflops: Option<f64>,
    /// Dense FP8 tensor-core peak, where the GPU has FP8 tensor cores.
    pub fp8_tflops: Option<f64>,
    pub hbm_gbps: f64,
    pub nvlink_gbps: f64,
    pub network_gbps: f64,
    #[serde(default = "default_gpus_per_node")]
    pub gpus_per_node: u64,
}

fn default_gpus_per_node() -> u64 {
    8
}

impl HardwareSettings {
    pub fn to_hardware(&self, name: &str) -> Hardware {
        Hardware {
            name: name.to_string(),
            memory_bytes: (self.memory_gib * (1u64 << 30) as f64) as u64,
            bf16_tflops: self.bf16_tflops,
            fp16_tflops: self.fp16_tflops.unwrap_or(self.bf16_tflops),
            fp32_tflops: self.fp32_tflops.unwrap_or(self.bf16_tflops / 16.0),
            fp8_tflops: self.fp8_tflops,
            hbm_gbps: self.hbm_gbps,
            nvlink_gbps: self.nvlink_gbps,
            network_gbps: self.network_gbps,
            gpus_per_node: self.gpus_per_node,
        }
    }
}

/// A settings file that exists but cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("cannot read settings file `{}`: {source}", crate::diag::path_text(.path))]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid settings file `{}`: {message}", crate::diag::path_text(.path))]
    Parse { path: PathBuf, message: String },
}

impl Settings {
    /// Parses settings text; `path` only names the file in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Settings, SettingsError> {
        let mut settings: Settings = toml::from_str(text).map_err(|e| SettingsError::Parse {
            path: path.to_path_buf(),
            message: e.to_string().trim_end().to_string(),
        })?;
        for (name, hw) in &settings.hardware {
            let positive = [
                ("memory_gib", Some(hw.memory_gib)),
                ("bf16_tflops", Some(hw.bf16_tflops)),
                ("fp8_tflops", hw.fp8_tflops),
                ("hbm_gbps", Some(hw.hbm_gbps)),
                ("nvlink_gbps", Some(hw.nvlink_gbps)),
                ("network_gbps", Some(hw.network_gbps)),
            ];
            for (key, value) in positive.into_iter().filter_map(|(k, v)| v.map(|v| (k, v))) {
                if !(value.is_finite() && value > 0.0) {
                    return Err(SettingsError::Parse {
                        path: path.to_path_buf(),
                        message: format!(
                            "hardware.{name}.{key} must be a positive number, not {value}"
                        ),
                    });
                }
            }
            if hw.gpus_per_node == 0 {
                return Err(SettingsError::Parse {
                    path: path.to_path_buf(),
                    message: format!("hardware.{name}.gpus_per_node must be at least 1"),
                });
            }
        }
        settings.source = Some(path.to_path_buf());
        Ok(settings)
    }

    /// Reads one settings file.
    pub fn read(path: &Path) -> Result<Settings, SettingsError> {
        let text = std::fs::read_to_string(path).map_err(|source| SettingsError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Settings::parse(&text, path)
    }

    /// The settings in force: `./fmoec.toml`, else the user's config folder, else defaults.
    pub fn discover() -> Result<Settings, SettingsError> {
        Self::discover_in(Path::new("."))
    }

    /// Like [`Settings::discover`], looking in `dir` instead of the working directory.
    pub fn discover_in(dir: &Path) -> Result<Settings, SettingsError> {
        for candidate in Self::candidates(dir) {
            if candidate.is_file() {
                return Settings::read(&candidate);
            }
        }
        Ok(Settings::default())
    }

    fn candidates(dir: &Path) -> Vec<PathBuf> {
        let mut out = vec![dir.join(FILE_NAME)];
        if let Some(dir) = std::env::var_os("XDG_CONFIG_HOME").filter(|d| !d.is_empty()) {
            out.push(PathBuf::from(dir).join("fmoec").join(FILE_NAME));
        } else if let Some(home) = std::env::var_os("HOME").filter(|d| !d.is_empty()) {
            out.push(PathBuf::from(home).join(".config/fmoec").join(FILE_NAME));
        }
        out
    }

    /// A user hardware profile by name.
    pub fn hardware_profile(&self, name: &str) -> Option<Hardware> {
        self.hardware.get(name).map(|h| h.to_hardware(name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_full_settings() {
        let text = r#"
            [run]
            device = "cuda:1"
            [emit]
            megatron_src = { "v2.2" = "/src/Megatron-LM" }
            [hardware.lab_gpu]
            memory_gib = 48
            bf16_tflops = 362
            hbm_gbps = 864
            nvlink_gbps = 0.001
            network_gbps = 12.5
        "#;
        let s = Settings::parse(text, Path::new("fmoec.toml")).unwrap();
        assert_eq!(s.run.device.as_deref(), Some("cuda:1"));
        assert_eq!(
            s.emit.megatron_src.get("v2.2"),
            Some(&PathBuf::from("/src/Megatron-LM"))
        );
        let hw = s.hardware_profile("lab_gpu").unwrap();
        assert_eq!(hw.memory_bytes, 48 << 30);
        assert_eq!(hw.gpus_per_node, 8);
        assert_eq!(hw.fp16_tflops, 362.0);
    }

    #[test]
    fn unknown_key_is_an_error_naming_it() {
        let err =
            Settings::parse("[run]\ndevise = \"cpu\"\n", Path::new("fmoec.toml")).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("fmoec.toml"), "{text}");
        assert!(text.contains("devise"), "{text}");
    }

    #[test]
    fn non_positive_hardware_value_is_refused() {
        let text = "[hardware.x]\nmemory_gib = 0\nbf16_tflops = 1\nhbm_gbps = 1\nnvlink_gbps = 1\nnetwork_gbps = 1\n";
        let err = Settings::parse(text, Path::new("f.toml")).unwrap_err();
        assert!(err.to_string().contains("memory_gib"), "{err}");
    }
}
