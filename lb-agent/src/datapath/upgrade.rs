//! Upgrades across map layouts.
//!
//! Every map name carries its layout version (`LB_SERVICES_V2`); a new agent
//! whose object declares a new version creates the new map beside the old
//! pin. What happens to the old one depends on who writes it:
//!
//! - maps only the agent writes (frontends, Maglev tables, backends, source
//!   ranges, config, Service records) are rebuilt from the desired state
//!   before the new programs are swapped in, so they never see a half-filled
//!   map, while the old programs keep the old maps until the swap; except
//!   the backends, which conntrack entries name by id: they are converted
//!   under the same ids, and the rebuild goes on from them;
//! - conntrack is state no one can rebuild: a layout change must come with a
//!   conversion in [`conversions`], run before the swap, or established
//!   flows through this node would lose their translation. There is none yet
//!   for it because conntrack has had one layout;
//! - affinity and fragment entries are soft state (a client may land on
//!   another backend for its next new flow; a datagram in flight loses its
//!   later fragments), and counters restart from zero.
//!
//! Old pins are removed once the new programs are in place, each with a log
//! line saying which of these happened.

use std::{fs, path::Path};

use anyhow::{Context as _, Result};
use aya::maps::{Array, HashMap, Map, MapData};
use lb_common::{maps, Backend, BackendId};
use tracing::warn;

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
fn conversions() -> &'static [(&'static str, Conversion)] {
    &[("LB_BACKENDS_V1", backends_from_hash)]
}

/// `LB_BACKENDS_V1` (a hash map, id → backend) into the array indexed by
/// id. Conntrack entries name their backend by id, and the datapath ends a
/// flow whose id no longer names its backend's address: rebuilt afresh,
/// the ids could be handed out in another order and end every flow. The
/// new programs are not in yet, so nothing reads the array while it fills.
fn backends_from_hash(old: &Path, new: &Path) -> Result<usize> {
    let open = |path: &Path| -> Result<Map> {
        let data = MapData::from_pin(path).with_context(|| format!("open {}", path.display()))?;
        Map::from_map_data(data).with_context(|| format!("map {}", path.display()))
    };
    let old: HashMap<MapData, BackendId, Backend> = open(old)?
        .try_into()
        .context("the old backends map is not a hash of backends by id")?;
    let mut new: Array<MapData, Backend> = open(new)?
        .try_into()
        .context("the new backends map is not an array of backends")?;
    let mut moved = 0;
    for entry in old.iter() {
        let (id, b) = entry.context("read the old backends map")?;
        if id >= new.len() {
            // A smaller --backends-size than the ids in use: the reconciler
            // gives this backend a new id, and its flows end.
            warn!(
                id,
                capacity = new.len(),
                "backend id past the new backends map: its flows end (raise --backends-size)"
            );
            continue;
        }
        // Converted before by an agent that stopped before retiring the old
        // pin: what the array holds may have changed since, and wins.
        let held = new
            .get(&id, 0)
            .with_context(|| format!("read backend {id} of the new backends map"))?;
        if held.is_present() {
            continue;
        }
        new.set(id, b, 0)
            .with_context(|| format!("write backend {id} into the new backends map"))?;
        moved += 1;
    }
    Ok(moved)
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
        // Conntrack names backends by id: their older layouts keep the ids.
        let (fam, current) = family(maps::BACKENDS).expect("versioned");
        for v in 1..current {
            let old = format!("{fam}V{v}");
            assert!(
                conversions().iter().any(|(n, _)| *n == old),
                "backends changed layout: add a conversion from {old}"
            );
        }
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
