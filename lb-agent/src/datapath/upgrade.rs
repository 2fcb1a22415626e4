//! Upgrades across map layouts.
//!
//! Every map name carries its layout version (`LB_SERVICES_V2`); a new agent
//! whose object declares a new version creates the new map beside the old
//! pin. What happens to the old one depends on who writes it:
//!
//! - maps only the agent writes (frontends, Maglev tables, backends, source
//!   ranges, config, Service records) are rebuilt from the desired state
//!   before the new programs are swapped in, so they never see a half-filled
//!   map, while the old programs keep the old maps until the swap;
//! - conntrack is state no one can rebuild: a layout change must come with a
//!   conversion in [`conversions`], run before the swap, or established
//!   flows through this node would lose their translation. There is none yet
//!   because conntrack has had one layout;
//! - affinity and fragment entries are soft state (a client may land on
//!   another backend for its next new flow; a datagram in flight loses its
//!   later fragments), and counters restart from zero.
//!
//! Old pins are removed once the new programs are in place, each with a log
//! line saying which of these happened.

use std::{fs, path::Path};

use anyhow::{Context as _, Result};
use lb_common::maps;

use super::bpffs;

/// What an upgrade does with an older map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fate {
    /// Agent-written: the new map is filled from the desired state.
    Rebuilt,
    /// Entries were converted into the new map.
    Migrated,
    /// Soft state, started afresh.
    Dropped,
    /// Counters, restarted from zero.
    Reset,
}

/// A pin of an older layout than the object's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OldPin {
    /// The old pin's name (`LB_STATS_V5`).
    pub name: String,
    /// The current map of the same family (`LB_STATS_V6`).
    pub current: &'static str,
    /// What becomes of it.
    pub fate: Fate,
}

/// Splits `LB_STATS_V6` into `("LB_STATS_", 6)`.
fn family(name: &str) -> Option<(&str, u32)> {
    let i = name.rfind("_V")?;
    let version = name[i + 2..].parse().ok()?;
    Some((&name[..i + 1], version))
}

/// The fate of maps of `current`'s family, without a conversion.
fn fate_of(current: &str) -> Fate {
    match current {
        maps::STATS => Fate::Reset,
        maps::AFFINITY | maps::FRAGS | maps::CONNTRACK | maps::CT_EMBRYO | maps::SNAT_CURSORS => {
            Fate::Dropped
        }
        _ => Fate::Rebuilt,
    }
}

/// Converts the entries of the old pin (first path) into the new one.
type Conversion = fn(&Path, &Path) -> Result<usize>;

/// Conversions of older layouts into the current ones, by old pin name; run
/// with the old and new pin paths, they return how many entries moved.
/// Empty: no map with state that matters has changed layout yet.
fn conversions() -> &'static [(&'static str, Conversion)] {
    &[]
}

/// The pins under `bpffs` of older layouts than the object's maps.
pub fn older_pins(bpffs: &Path) -> Result<Vec<OldPin>> {
    let dir = bpffs::maps_dir(bpffs);
    let Ok(entries) = fs::read_dir(&dir) else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for entry in entries {
        let name = entry
            .with_context(|| format!("read {}", dir.display()))?
            .file_name()
            .to_string_lossy()
            .into_owned();
        let Some((fam, version)) = family(&name) else {
            continue;
        };
        let current = maps::ALL
            .iter()
            .find(|m| family(m).is_some_and(|(f, v)| f == fam && v > version));
        if let Some(current) = current {
            let fate = if conversions().iter().any(|(n, _)| *n == name) {
                Fate::Migrated
            } else {
                fate_of(current)
            };
            out.push(OldPin {
                name,
                current,
                fate,
            });
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// Converts what can be converted; run after the new maps exist and before
/// the new programs are swapped in. Returns the entries moved per pin.
pub fn migrate(bpffs: &Path, old: &[OldPin]) -> Result<Vec<(String, usize)>> {
    let dir = bpffs::maps_dir(bpffs);
    let mut out = Vec::new();
    for pin in old.iter().filter(|p| p.fate == Fate::Migrated) {
        if let Some((_, convert)) = conversions().iter().find(|(n, _)| *n == pin.name) {
            let n = convert(&dir.join(&pin.name), &dir.join(pin.current))
                .with_context(|| format!("convert {} into {}", pin.name, pin.current))?;
            out.push((pin.name.clone(), n));
        }
    }
    Ok(out)
}

/// Removes the old pins; run once the new programs are attached (a map
/// lives on while an old program still holds it, so nothing breaks early).
pub fn retire(bpffs: &Path, old: &[OldPin]) -> Result<()> {
    let dir = bpffs::maps_dir(bpffs);
    for pin in old {
        let path = dir.join(&pin.name);
        fs::remove_file(&path).with_context(|| format!("remove {}", path.display()))?;
    }
    Ok(())
}

/// Says what happened to an old pin, for the log.
pub fn describe(pin: &OldPin) -> &'static str {
    match pin.fate {
        Fate::Rebuilt => "replaced; the new map was rebuilt from the desired state",
        Fate::Migrated => "migrated; its entries were converted into the new map",
        Fate::Dropped => "replaced; its soft state starts afresh",
        Fate::Reset => "replaced; counters restart from zero",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_split_into_family_and_version() {
        assert_eq!(family("LB_STATS_V6"), Some(("LB_STATS_", 6)));
        assert_eq!(family("LB_CT_V12"), Some(("LB_CT_", 12)));
        assert_eq!(family("LB_STATS"), None);
        assert_eq!(family("LB_STATS_Vx"), None);
    }

    #[test]
    fn fates_follow_who_writes_the_map() {
        assert_eq!(fate_of(maps::SERVICES), Fate::Rebuilt);
        assert_eq!(fate_of(maps::MAGLEV), Fate::Rebuilt);
        assert_eq!(fate_of(maps::STATS), Fate::Reset);
        assert_eq!(fate_of(maps::AFFINITY), Fate::Dropped);
        // Conntrack without a conversion would drop flows: every older
        // layout of it needs one.
        let (fam, current) = family(maps::CONNTRACK).expect("versioned");
        for v in 1..current {
            let old = format!("{fam}V{v}");
            assert!(
                conversions().iter().any(|(n, _)| *n == old),
                "conntrack changed layout: add a conversion from {old}"
            );
        }
    }
}
