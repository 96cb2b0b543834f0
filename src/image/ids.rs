//! Every identifier an image carries (GPT disk and partition GUIDs, the ext4 UUID and hash seed, the FAT
//! volume id) derived from one seed string, so that the same seed gives the same bytes and another seed
//! gives other identifiers. Pure.

use sha2::{Digest, Sha256};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ids {
    pub disk: String,
    pub esp_part: String,
    pub root_part: String,
    pub root_fs: String,
    pub root_hash_seed: String,
    pub esp_volume_id: u32,
}

fn digest(seed: &str, purpose: &str) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"nixqimg image ids v1\0");
    h.update(seed.as_bytes());
    h.update(b"\0");
    h.update(purpose.as_bytes());
    h.finalize().into()
}

/// A random-looking (version 4, RFC 4122 variant) UUID, lower case as tools print them.
fn uuid(seed: &str, purpose: &str) -> String {
    let mut b = digest(seed, purpose);
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = super::closure::hex(&b[..16]);
    format!("{}-{}-{}-{}-{}", &h[0..8], &h[8..12], &h[12..16], &h[16..20], &h[20..32])
}

pub fn derive(seed: &str) -> Ids {
    let v = digest(seed, "esp volume id");
    Ids {
        disk: uuid(seed, "gpt disk"),
        esp_part: uuid(seed, "gpt esp"),
        root_part: uuid(seed, "gpt root"),
        root_fs: uuid(seed, "ext4 uuid"),
        root_hash_seed: uuid(seed, "ext4 hash seed"),
        esp_volume_id: u32::from_le_bytes([v[0], v[1], v[2], v[3]]),
    }
}

/// The seed used when none is given: a digest of everything that shapes the image, so a changed
/// system gets new identifiers and an unchanged one keeps them.
pub fn default_seed(parts: &[&str]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p.as_bytes());
        h.update(b"\0");
    }
    let d: [u8; 32] = h.finalize().into();
    super::closure::hex(&d[..16])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_ids_other_seed_other_ids() {
        let a = derive("one");
        assert_eq!(a, derive("one"));
        let b = derive("two");
        assert_ne!(a.disk, b.disk);
        assert_ne!(a.root_fs, b.root_fs);
        assert_ne!(a.esp_volume_id, b.esp_volume_id);
        let all = [&a.disk, &a.esp_part, &a.root_part, &a.root_fs, &a.root_hash_seed];
        for (i, x) in all.iter().enumerate() {
            assert_eq!(x.len(), 36);
            assert_eq!(&x[14..15], "4", "version 4: {x}");
            assert!("89ab".contains(&x[19..20]), "RFC 4122 variant: {x}");
            assert!(all[i + 1..].iter().all(|y| y != x), "{x} is used twice");
        }
    }

    #[test]
    fn default_seed_depends_on_every_part_and_their_boundaries() {
        assert_eq!(default_seed(&["a", "b"]), default_seed(&["a", "b"]));
        assert_ne!(default_seed(&["a", "b"]), default_seed(&["ab", ""]));
        assert_ne!(default_seed(&["a", "b"]), default_seed(&["a", "c"]));
    }
}
