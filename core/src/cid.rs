//! Content identifiers, parsed once at the edge.
//!
//! A [`PinCid`] is a bare CID (v0 or v1, any multibase). Paths such as `/ipfs/Qm…` or
//! `Qm…/file` are rejected: pinq pins whole DAGs by root. Two spellings of one CID (CIDv1
//! in base32 and in base58btc, or a CIDv0 and its CIDv1 form) compare equal through
//! [`PinCid::canonical`], never as strings.

use std::fmt;
use std::str::FromStr;

use cid::Cid;
use cid::multibase::Base;

/// Why a string is not a CID pinq accepts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CidError {
    #[error("cid is empty")]
    Empty,
    #[error("cid must be a bare CID, not a path (found '/')")]
    Path,
    #[error("cid must not contain whitespace")]
    Whitespace,
    #[error("cid is longer than {max} characters")]
    TooLong { max: usize },
    #[error("not a valid CID: {0}")]
    Invalid(String),
}

/// A validated CID as submitted, kept in its parsed form.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct PinCid(Cid);

impl PinCid {
    /// Longest string accepted; real CIDs are well below this.
    pub const MAX_LEN: usize = 512;

    pub fn parse(s: &str) -> Result<Self, CidError> {
        if s.is_empty() {
            return Err(CidError::Empty);
        }
        if s.len() > Self::MAX_LEN {
            return Err(CidError::TooLong { max: Self::MAX_LEN });
        }
        if s.contains('/') {
            return Err(CidError::Path);
        }
        if s.chars().any(char::is_whitespace) {
            return Err(CidError::Whitespace);
        }
        Cid::try_from(s)
            .map(PinCid)
            .map_err(|e| CidError::Invalid(e.to_string()))
    }

    pub fn inner(&self) -> &Cid {
        &self.0
    }

    /// The canonical spelling used as the pin index key: CIDv1 in base32 lower case.
    /// A CIDv0 is converted to its CIDv1 (dag-pb) equivalent.
    pub fn canonical(&self) -> String {
        let v1 = match self.0.version() {
            cid::Version::V0 => Cid::new_v1(self.0.codec(), *self.0.hash()),
            cid::Version::V1 => self.0,
        };
        v1.to_string_of_base(Base::Base32Lower)
            .unwrap_or_else(|_| v1.to_string())
    }

    /// The CID's [`canonical`](Self::canonical) form and its own spelling (its
    /// `Display`), in that order. They are the same text for a CIDv1, which is then
    /// encoded once.
    pub fn canonical_and_spelling(&self) -> (String, String) {
        let canonical = self.canonical();
        let spelling = match self.0.version() {
            cid::Version::V1 => canonical.clone(),
            cid::Version::V0 => self.to_string(),
        };
        (canonical, spelling)
    }
}

impl FromStr for PinCid {
    type Err = CidError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// Displays the CID in its own version's default spelling: `Qm…` for v0, base32 for v1.
impl fmt::Display for PinCid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl fmt::Debug for PinCid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PinCid({})", self.0)
    }
}

/// Canonical form of a CID string received from a backend, or `None` if it does not parse.
pub fn canonical_of(s: &str) -> Option<String> {
    PinCid::parse(s).ok().map(|c| c.canonical())
}

/// The key a stored CID string is compared by (pin index, job order): its canonical form,
/// or the string itself if it does not parse.
pub fn key_of(s: &str) -> String {
    canonical_of(s).unwrap_or_else(|| s.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    const V0: &str = "QmdfTbBqBPQ7VNxZEYEj14VmRuZBkqFbiwReogJgS1zR1n";
    const V1_B32: &str = "bafybeihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyku";

    #[test]
    fn accepts_v0_and_v1() {
        assert_eq!(PinCid::parse(V0).unwrap().to_string(), V0);
        assert_eq!(PinCid::parse(V1_B32).unwrap().to_string(), V1_B32);
    }

    #[test]
    fn v0_and_its_v1_form_share_a_canonical_key() {
        let v0 = PinCid::parse(V0).unwrap();
        let v1 = PinCid::parse(V1_B32).unwrap();
        assert_eq!(v0.canonical(), v1.canonical());
        assert_eq!(v1.canonical(), V1_B32);
    }

    #[test]
    fn base58_v1_equals_base32_v1() {
        let v1 = PinCid::parse(V1_B32).unwrap();
        let b58 = v1.inner().to_string_of_base(Base::Base58Btc).unwrap();
        assert_ne!(b58, V1_B32);
        assert_eq!(PinCid::parse(&b58).unwrap().canonical(), V1_B32);
    }

    #[test]
    fn rejects_paths_and_junk() {
        assert_eq!(PinCid::parse(""), Err(CidError::Empty));
        assert_eq!(PinCid::parse(&format!("/ipfs/{V0}")), Err(CidError::Path));
        assert_eq!(PinCid::parse(&format!("x/ipfs/{V0}")), Err(CidError::Path));
        assert_eq!(PinCid::parse(&format!("{V0}/readme")), Err(CidError::Path));
        assert_eq!(PinCid::parse(&format!(" {V0}")), Err(CidError::Whitespace));
        assert!(matches!(PinCid::parse("hello"), Err(CidError::Invalid(_))));
        assert!(matches!(
            PinCid::parse(&"b".repeat(600)),
            Err(CidError::TooLong { .. })
        ));
        // A valid CID with its last character changed fails the multihash/length checks.
        let mut broken = V0.to_string();
        broken.pop();
        assert!(PinCid::parse(&broken).is_err());
    }

    #[test]
    fn the_spelling_is_the_display_form() {
        for s in [V0, V1_B32] {
            let c = PinCid::parse(s).unwrap();
            assert_eq!(c.canonical_and_spelling(), (c.canonical(), c.to_string()));
        }
        // A CIDv1 given in base58 is spelled in base32, as `Display` does.
        let b58 = PinCid::parse(V1_B32)
            .unwrap()
            .inner()
            .to_string_of_base(Base::Base58Btc)
            .unwrap();
        let c = PinCid::parse(&b58).unwrap();
        assert_eq!(
            c.canonical_and_spelling(),
            (V1_B32.to_owned(), V1_B32.to_owned())
        );
        assert_eq!(c.to_string(), V1_B32);
    }

    #[test]
    fn canonical_of_backend_strings() {
        assert_eq!(canonical_of(V0).as_deref(), Some(V1_B32));
        assert_eq!(canonical_of("nope"), None);
    }
}
