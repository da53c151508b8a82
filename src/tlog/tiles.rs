//! The read side of the log as C2SP tlog-tiles lays it out: hash tiles
//! `tile/<L>/<N>[.p/<W>]` and entry bundles `tile/entries/<N>[.p/<W>]`.
//!
//! A tile is 256 wide: tile level `L` holds the hashes of tree level `8 * L`,
//! tile `N` the ones at indices `N * 256 ..`, a full tile all 256 of them
//! (8,192 bytes), a partial one (`.p/<W>`) its first `W` while the tree is
//! not yet that large. `N` is written in groups of three digits, every group
//! but the last prefixed with `x` (1234067 is `x001/x234/067`). A full tile
//! never changes, so it can be cached forever; a partial one is replaced by
//! a wider one as the tree grows. Entry bundles hold the entries themselves,
//! each prefixed by its length as a big-endian u16.

use super::tree::{Hash, HashReader, Node};

/// Hashes (or entries) per tile.
pub const WIDTH: u64 = 256;
/// Tree levels per tile level.
pub const HEIGHT: u8 = 8;
/// The longest entry a bundle can carry (its length is a u16).
pub const MAX_ENTRY: usize = u16::MAX as usize;

/// A tile of the log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tile {
    /// `None`: an entry bundle; `Some(L)`: hash tile level `L`.
    pub level: Option<u8>,
    pub index: u64,
    /// 1 to [`WIDTH`].
    pub width: u16,
}

impl Tile {
    pub fn is_full(&self) -> bool {
        u64::from(self.width) == WIDTH
    }

    /// Its path under the log's prefix, e.g. `tile/0/x001/234.p/7`.
    pub fn path(&self) -> String {
        let level = match self.level {
            Some(l) => l.to_string(),
            None => "entries".to_string(),
        };
        let mut groups = Vec::new();
        let mut n = self.index;
        loop {
            groups.push(n % 1000);
            n /= 1000;
            if n == 0 {
                break;
            }
        }
        let digits: Vec<String> = groups
            .iter()
            .rev()
            .enumerate()
            .map(|(i, g)| match i + 1 == groups.len() {
                true => format!("{g:03}"),
                false => format!("x{g:03}"),
            })
            .collect();
        let mut p = format!("tile/{level}/{}", digits.join("/"));
        if !self.is_full() {
            p.push_str(&format!(".p/{}", self.width));
        }
        p
    }

    /// The tile a path (after the log's prefix) names; `None` for anything
    /// that is not exactly such a path (the only form a server answers).
    pub fn parse(path: &str) -> Option<Tile> {
        let rest = path.strip_prefix("tile/")?;
        let (level, rest) = rest.split_once('/')?;
        let level = match level {
            "entries" => None,
            l if l.len() == 1 && l.as_bytes()[0].is_ascii_digit() => Some(l.parse().ok()?),
            _ => return None,
        };
        let (digits, width) = match rest.split_once(".p/") {
            Some((d, w)) => (d, w.parse().ok().filter(|w| (1..WIDTH as u16).contains(w))?),
            None => (rest, WIDTH as u16),
        };
        let groups: Vec<&str> = digits.split('/').collect();
        let mut index: u64 = 0;
        for (i, g) in groups.iter().enumerate() {
            let g = match i + 1 == groups.len() {
                true => *g,
                false => g.strip_prefix('x')?,
            };
            index = index.checked_mul(1000)?.checked_add(g.parse().ok()?)?;
        }
        // any other spelling of the same numbers (leading zeros, a group of four
        // digits, "+7") reads as a tile whose path is not this one
        let t = Tile {
            level,
            index,
            width,
        };
        (t.path() == path).then_some(t)
    }

    /// The stored hashes this hash tile holds, in order.
    pub fn nodes(&self) -> Vec<Node> {
        let level = self.level.expect("a hash tile") * HEIGHT;
        let first = self.index * WIDTH;
        (0..u64::from(self.width))
            .map(|i| Node {
                level,
                index: first + i,
            })
            .collect()
    }

    /// How many hashes (or entries) the tile's level has in a tree of `size` leaves,
    /// and where the tile ends in it (`None`: past any tree).
    fn span(&self, size: u64) -> (u64, Option<u64>) {
        let shift = u32::from(self.level.unwrap_or(0)) * u32::from(HEIGHT);
        let count = size.checked_shr(shift).unwrap_or(0);
        let end = self
            .index
            .checked_mul(WIDTH)
            .and_then(|s| s.checked_add(u64::from(self.width)));
        (count, end)
    }

    /// Whether the tree of `size` leaves has this tile: a full one once it
    /// covers it, a partial one of exactly the width the tree gives it.
    pub fn exists_in(&self, size: u64) -> bool {
        let (count, end) = self.span(size);
        match self.is_full() {
            true => end.is_some_and(|end| end <= count),
            false => count / WIDTH == self.index && count % WIDTH == u64::from(self.width),
        }
    }

    /// Whether a tree of `size` leaves holds everything this tile names: any partial
    /// width up to the tree's, not only the newest one (a client holding an older
    /// checkpoint asks for that, and its bytes never change: they are a prefix of the
    /// full tile's). What a server may answer.
    pub fn covered_by(&self, size: u64) -> bool {
        let (count, end) = self.span(size);
        end.is_some_and(|end| end <= count)
    }
}

/// The bottom tiles of a tree of `size` leaves, from tile `from` on: its level-0 hash
/// tiles (`level` `Some(0)`) or its entry bundles (`None`), the full ones, then the
/// partial one if the size is not a multiple of [`WIDTH`].
pub fn bottom_tiles(level: Option<u8>, from: u64, size: u64) -> impl Iterator<Item = Tile> {
    (from..size.div_ceil(WIDTH)).map(move |index| Tile {
        level,
        index,
        width: (size - index * WIDTH).min(WIDTH) as u16,
    })
}

/// The hashes in `bytes`, 32 each; `None` when its length is not a multiple of 32.
pub fn hashes_of(bytes: &[u8]) -> Option<Vec<Hash>> {
    bytes.len().is_multiple_of(32).then(|| {
        bytes
            .chunks_exact(32)
            .map(|c| <[u8; 32]>::try_from(c).expect("32 bytes"))
            .collect()
    })
}

/// The hashes of the hash tile `tile` from its bytes; `Err` unless they are exactly
/// its width of hashes.
pub fn tile_hashes(tile: &Tile, bytes: &[u8]) -> anyhow::Result<Vec<Hash>> {
    let want = usize::from(tile.width) * 32;
    anyhow::ensure!(
        bytes.len() == want,
        "{} has {} bytes, a tile of {} hashes has {want}",
        tile.path(),
        bytes.len(),
        tile.width
    );
    Ok(hashes_of(bytes).expect("a multiple of 32"))
}

/// The bytes of a hash tile: its hashes, 32 bytes each.
pub fn hash_tile(tile: &Tile, r: &impl HashReader) -> anyhow::Result<Vec<u8>> {
    Ok(r.read_hashes(&tile.nodes())?.concat())
}

/// The bytes of an entry bundle from its entries, each prefixed by its
/// length (big-endian u16).
pub fn entry_bundle<'a>(entries: impl IntoIterator<Item = &'a [u8]>) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::new();
    for e in entries {
        let len = u16::try_from(e.len())
            .map_err(|_| anyhow::anyhow!("a log entry of {} bytes is over {MAX_ENTRY}", e.len()))?;
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(e);
    }
    Ok(out)
}

/// The entries of a bundle (the inverse of [`entry_bundle`]).
pub fn parse_entry_bundle(mut b: &[u8]) -> anyhow::Result<Vec<&[u8]>> {
    let mut out = Vec::new();
    while !b.is_empty() {
        anyhow::ensure!(b.len() >= 2, "an entry bundle ends inside a length");
        let len = usize::from(u16::from_be_bytes([b[0], b[1]]));
        anyhow::ensure!(b.len() >= 2 + len, "an entry bundle ends inside an entry");
        out.push(&b[2..2 + len]);
        b = &b[2 + len..];
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_written_and_read_one_way_only() {
        let t = |level, index, width| Tile {
            level,
            index,
            width,
        };
        let cases = [
            (t(Some(0), 0, 256), "tile/0/000"),
            (t(Some(0), 1234067, 1), "tile/0/x001/x234/067.p/1"),
            (t(Some(2), 1000, 256), "tile/2/x001/000"),
            (t(None, 7, 255), "tile/entries/007.p/255"),
            (t(None, 999, 256), "tile/entries/999"),
        ];
        for (tile, path) in cases {
            assert_eq!(tile.path(), path);
            assert_eq!(Tile::parse(path), Some(tile), "{path}");
        }
        for bad in [
            "tile/0/7",
            "tile/0/x000/007",
            "tile/0/001/234",
            "tile/0/000.p/0",
            "tile/0/000.p/256",
            "tile/0/000.p/07",
            "tile/10/000",
            "tile/x/000",
            "tile/entries/",
            "tile/0/000/",
            "tiles/0/000",
            "tile/0/x18446744073709551/615",
        ] {
            assert_eq!(Tile::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn which_tiles_a_tree_has() {
        let full = |level, index| Tile {
            level: Some(level),
            index,
            width: 256,
        };
        let part = |level, index, width| Tile {
            level: Some(level),
            index,
            width,
        };
        // 70,000 leaves: 273 full level-0 tiles and one of 112; level 1 has 273
        // hashes: one full tile and one of 17
        let n = 70_000;
        assert!(full(0, 272).exists_in(n));
        assert!(!full(0, 273).exists_in(n));
        assert!(part(0, 273, 112).exists_in(n));
        assert!(!part(0, 273, 111).exists_in(n));
        assert!(full(1, 0).exists_in(n));
        assert!(part(1, 1, 17).exists_in(n));
        assert!(!full(2, 0).exists_in(n));
        assert!(part(2, 0, 1).exists_in(n));
        let bundle = Tile {
            level: None,
            index: 273,
            width: 112,
        };
        assert!(bundle.exists_in(n));
        // a server answers older partial widths too, never beyond the tree
        assert!(part(0, 273, 111).covered_by(n) && part(0, 273, 112).covered_by(n));
        assert!(!part(0, 273, 113).covered_by(n) && !full(0, 273).covered_by(n));
        assert!(!full(0, u64::MAX).covered_by(u64::MAX));
        assert_eq!(
            full(1, 2).nodes()[..2],
            [
                Node {
                    level: 8,
                    index: 512
                },
                Node {
                    level: 8,
                    index: 513
                }
            ]
        );
    }

    #[test]
    fn entry_bundles_round_trip_and_refuse_what_does_not_fit() {
        let entries: Vec<&[u8]> = vec![b"", b"publish x", &[0u8; 300]];
        let b = entry_bundle(entries.iter().copied()).unwrap();
        assert_eq!(&b[..4], &[0, 0, 0, 9]);
        assert_eq!(parse_entry_bundle(&b).unwrap(), entries);
        assert!(parse_entry_bundle(&b[..b.len() - 1]).is_err());
        let big = vec![0u8; MAX_ENTRY + 1];
        assert!(entry_bundle([&big[..]]).is_err());
    }
}
