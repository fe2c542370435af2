//! Identifiers that can only be built by parsing, so an invalid one never reaches an actor.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Why a string is not a valid identifier.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    /// Empty or longer than allowed.
    #[error("must be 1 to {max} characters long")]
    Length {
        /// The longest allowed length.
        max: usize,
    },
    /// A character outside the allowed set.
    #[error("may contain only {allowed}")]
    Charset {
        /// A human description of the allowed characters.
        allowed: &'static str,
    },
}

/// A cabinet id: 1–32 characters of `[A-Za-z0-9]`, case-sensitive (PROTOCOL.md).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct CabinetId(String);

impl CabinetId {
    /// The longest cabinet id.
    pub const MAX_LEN: usize = 32;

    /// Parses a cabinet id.
    pub fn parse(s: &str) -> Result<Self, IdError> {
        if s.is_empty() || s.len() > Self::MAX_LEN {
            return Err(IdError::Length { max: Self::MAX_LEN });
        }
        if !s.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return Err(IdError::Charset {
                allowed: "ASCII letters and digits",
            });
        }
        Ok(Self(s.to_owned()))
    }

    /// The id as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for CabinetId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for CabinetId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// A merchant id: 1–64 characters of `[A-Za-z0-9_-]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct MerchantId(String);

impl MerchantId {
    /// The longest merchant id.
    pub const MAX_LEN: usize = 64;

    /// Parses a merchant id.
    pub fn parse(s: &str) -> Result<Self, IdError> {
        if s.is_empty() || s.len() > Self::MAX_LEN {
            return Err(IdError::Length { max: Self::MAX_LEN });
        }
        if !s
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return Err(IdError::Charset {
                allowed: "ASCII letters, digits, '_' and '-'",
            });
        }
        Ok(Self(s.to_owned()))
    }

    /// The id as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for MerchantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for MerchantId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn cabinet_id_examples() {
        assert!(CabinetId::parse("KM400A00017").is_ok());
        assert!(CabinetId::parse("").is_err());
        assert!(CabinetId::parse(&"a".repeat(33)).is_err());
        assert!(CabinetId::parse("a/b").is_err());
        assert!(CabinetId::parse("a+").is_err());
        assert!(CabinetId::parse("é").is_err());
    }

    proptest! {
        #[test]
        fn cabinet_id_accepts_exactly_the_protocol_alphabet(s in "\\PC{0,40}") {
            let valid = !s.is_empty() && s.len() <= 32 && s.bytes().all(|b| b.is_ascii_alphanumeric());
            prop_assert_eq!(CabinetId::parse(&s).is_ok(), valid);
        }

        #[test]
        fn cabinet_id_roundtrips(s in "[A-Za-z0-9]{1,32}") {
            let id = CabinetId::parse(&s).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(id.as_str(), s.as_str());
        }

        #[test]
        fn merchant_id_accepts_exactly_its_alphabet(s in "\\PC{0,70}") {
            let valid = !s.is_empty() && s.len() <= 64
                && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
            prop_assert_eq!(MerchantId::parse(&s).is_ok(), valid);
        }
    }
}
