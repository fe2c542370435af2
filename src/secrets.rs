//! Random tokens and their hashes. Secrets and API keys are 256-bit random values, so a plain
//! SHA-256 is enough to store them: there is nothing to brute-force.

use ring::digest::{digest, SHA256};
use ring::rand::{SecureRandom, SystemRandom};

const ALPHABET: &[u8] = b"ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz23456789";

/// A random token of `len` characters from an unambiguous alphanumeric alphabet.
pub fn token(len: usize) -> Result<String, ring::error::Unspecified> {
    let rng = SystemRandom::new();
    let mut out = String::with_capacity(len);
    let mut buf = [0u8; 64];
    while out.len() < len {
        rng.fill(&mut buf)?;
        // Rejection sampling keeps every character equally likely.
        let limit = 256 - (256 % ALPHABET.len());
        for b in buf {
            if (b as usize) < limit && out.len() < len {
                out.push(ALPHABET[b as usize % ALPHABET.len()] as char);
            }
        }
    }
    Ok(out)
}

/// Hex SHA-256.
pub fn sha256_hex(s: &str) -> String {
    hex::encode(digest(&SHA256, s.as_bytes()))
}

/// Compares two strings in time independent of where they differ.
pub fn constant_time_eq(a: &str, b: &str) -> bool {
    // Both sides are hex digests of equal length in practice; the length check leaks nothing.
    use subtle::ConstantTimeEq;
    a.len() == b.len() && bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_random_and_of_the_alphabet() {
        let a = token(40).unwrap_or_default();
        let b = token(40).unwrap_or_default();
        assert_eq!(a.len(), 40);
        assert_ne!(a, b);
        assert!(a.bytes().all(|c| ALPHABET.contains(&c)));
    }

    #[test]
    fn sha256_known_vector() {
        assert_eq!(
            sha256_hex("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert!(constant_time_eq("x", "x"));
        assert!(!constant_time_eq("x", "y"));
    }
}
