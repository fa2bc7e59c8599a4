//! Stable hashing: the same bytes give the same number on every machine and every release.
//!
//! Cohorts, exploration draws, feature buckets and the feature-schema hash must agree between
//! the optimizer, every data plane and the trainer, and across upgrades, so nothing here may use
//! `std`'s randomly keyed hasher. FNV-1a over the bytes, then a SplitMix64 finaliser to spread
//! the bits.

/// FNV-1a 64 of several parts, each followed by a separator byte so that `("ab","c")` and
/// `("a","bc")` differ, then finalised.
pub fn stable_hash(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for b in p.iter().chain(std::iter::once(&0xffu8)) {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    mix(h)
}

/// SplitMix64's finaliser.
pub fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A uniform draw in `[0, 1)` from a hash.
pub fn unit(h: u64) -> f64 {
    // 53 high bits → an exactly representable fraction.
    (h >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn is_stable_across_releases() {
        // Golden value (also computed independently in Python): if it changes, every cohort in production moves. Do not update them.
        assert_eq!(
            stable_hash(&[b"salt", b"chat", b"client-1"]),
            0x02c0_5c23_95cf_0d28
        );
        assert_eq!(stable_hash(&[]), mix(0xcbf2_9ce4_8422_2325));
    }

    #[test]
    fn separates_parts() {
        assert_ne!(stable_hash(&[b"ab", b"c"]), stable_hash(&[b"a", b"bc"]));
    }

    #[test]
    fn unit_is_in_range() {
        for i in 0..1000u64 {
            let u = unit(mix(i));
            assert!((0.0..1.0).contains(&u));
        }
        assert_eq!(unit(0), 0.0);
        assert!(unit(u64::MAX) < 1.0);
    }
}
