//! OCI image documents as checked types: digests, the index, manifests and the image config,
//! parsed from bytes that came from outside (an archive, a registry) and never trusted.
//!
//! Invariants: a [`Digest`] is `sha256:` and 64 lowercase hex digits, nothing else, so it
//! is safe as a file name; documents are at most [`MAX_DOCUMENT`] bytes; an image has at
//! most [`MAX_LAYERS`] layers and exactly one diff_id per layer.

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

/// Largest JSON document (index, manifest, config) read.
pub const MAX_DOCUMENT: u64 = 4 << 20;
/// Most layers an image may have.
pub const MAX_LAYERS: usize = 128;

pub const MEDIA_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const MEDIA_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const MEDIA_DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const MEDIA_DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Annotation naming an image in an OCI layout's index.
pub const REF_NAME: &str = "org.opencontainers.image.ref.name";

/// A content digest: `sha256:` and 64 lowercase hex digits.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Digest(String);

impl Digest {
    pub fn parse(s: &str) -> Result<Self, String> {
        let hex = s.strip_prefix("sha256:").ok_or_else(|| format!("digest {s:?} is not sha256:<hex>"))?;
        if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
            return Err(format!("digest {s:?} is not sha256: and 64 lowercase hex digits"));
        }
        Ok(Digest(s.to_string()))
    }

    /// The digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        Self::from_hasher(Sha256::new_with_prefix(bytes))
    }

    pub fn from_hasher(h: Sha256) -> Self {
        Digest(format!("sha256:{}", hex(&h.finalize())))
    }

    /// The 64 hex digits (a safe file name).
    pub fn hex(&self) -> &str {
        &self.0[7..]
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The first 12 hex digits, as docker shows an ID.
    pub fn short(&self) -> &str {
        &self.hex()[..12]
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl TryFrom<String> for Digest {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        Digest::parse(&s)
    }
}

impl From<Digest> for String {
    fn from(d: Digest) -> String {
        d.0
    }
}

impl std::fmt::Display for Digest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct Platform {
    #[serde(default)]
    pub architecture: String,
    #[serde(default)]
    pub os: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Descriptor {
    #[serde(rename = "mediaType", default)]
    pub media_type: String,
    pub digest: Digest,
    pub size: u64,
    #[serde(default)]
    pub platform: Option<Platform>,
    #[serde(default)]
    pub annotations: std::collections::BTreeMap<String, String>,
}

impl Descriptor {
    /// Whether this index entry is for linux/amd64 (entries without a platform are taken).
    pub fn is_linux_amd64(&self) -> bool {
        self.platform.as_ref().is_none_or(|p| p.os == "linux" && p.architecture == "amd64")
    }

    pub fn is_index(&self) -> bool {
        self.media_type == MEDIA_INDEX || self.media_type == MEDIA_DOCKER_LIST
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct Index {
    pub manifests: Vec<Descriptor>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Manifest {
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
}

/// What a container runs, from the image config (docker's names).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunConfig {
    #[serde(rename = "Env", default, deserialize_with = "null_default")]
    pub env: Vec<String>,
    #[serde(rename = "Entrypoint", default, deserialize_with = "null_default")]
    pub entrypoint: Vec<String>,
    #[serde(rename = "Cmd", default, deserialize_with = "null_default")]
    pub cmd: Vec<String>,
    #[serde(rename = "WorkingDir", default, deserialize_with = "null_default")]
    pub working_dir: String,
    #[serde(rename = "User", default, deserialize_with = "null_default")]
    pub user: String,
}

fn null_default<'de, D: serde::Deserializer<'de>, T: Default + Deserialize<'de>>(d: D) -> Result<T, D::Error> {
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

#[derive(Debug, Clone, Deserialize)]
pub struct RootFs {
    pub diff_ids: Vec<Digest>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ImageConfig {
    #[serde(default)]
    pub architecture: String,
    #[serde(default)]
    pub os: String,
    #[serde(default, deserialize_with = "null_default")]
    pub config: RunConfig,
    pub rootfs: RootFs,
}

/// Parses a JSON document of at most [`MAX_DOCUMENT`] bytes.
pub fn parse<T: serde::de::DeserializeOwned>(what: &str, bytes: &[u8]) -> Result<T, String> {
    if bytes.len() as u64 > MAX_DOCUMENT {
        return Err(format!("{what} is {} bytes, more than {MAX_DOCUMENT}", bytes.len()));
    }
    serde_json::from_slice(bytes).map_err(|e| format!("{what} is not valid: {e}"))
}

impl ImageConfig {
    /// Checks the config against its manifest: linux/amd64, one diff_id per layer.
    pub fn check(&self, layers: usize) -> Result<(), String> {
        if (!self.os.is_empty() && self.os != "linux")
            || (!self.architecture.is_empty() && self.architecture != "amd64")
        {
            return Err(format!("the image is for {}/{}, sandboxes run linux/amd64", self.os, self.architecture));
        }
        if layers > MAX_LAYERS {
            return Err(format!("the image has {layers} layers, more than {MAX_LAYERS}"));
        }
        if self.rootfs.diff_ids.len() != layers {
            return Err(format!("the config lists {} diff_ids for {layers} layers", self.rootfs.diff_ids.len()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_are_strictly_sha256_hex() {
        let ok = format!("sha256:{}", "a".repeat(64));
        assert_eq!(Digest::parse(&ok).unwrap().hex(), "a".repeat(64));
        for bad in [
            "sha256:".to_string(),
            format!("sha256:{}", "A".repeat(64)),
            format!("sha256:{}/../x", "a".repeat(58)),
            format!("sha512:{}", "a".repeat(64)),
            format!("sha256:{}", "a".repeat(65)),
        ] {
            assert!(Digest::parse(&bad).is_err(), "{bad}");
        }
        assert_eq!(Digest::of(b"").as_str(), "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
    }

    #[test]
    fn a_config_must_match_its_layers_and_platform() {
        let d = Digest::of(b"x");
        let cfg: ImageConfig = parse(
            "config",
            format!(r#"{{"architecture":"amd64","os":"linux","config":{{"Env":null,"Cmd":["sh"]}},"rootfs":{{"type":"layers","diff_ids":["{d}"]}}}}"#)
                .as_bytes(),
        )
        .unwrap();
        assert_eq!(cfg.config.cmd, vec!["sh"]);
        assert!(cfg.check(1).is_ok());
        assert!(cfg.check(2).unwrap_err().contains("diff_ids"));
        let arm: ImageConfig =
            parse("config", br#"{"architecture":"arm64","os":"linux","rootfs":{"diff_ids":[]}}"#).unwrap();
        assert!(arm.check(0).unwrap_err().contains("linux/arm64"));
    }
}
