//! The UidPool: computes the user namespace mapping of unprivileged
//! containers once and counts who holds it.
//!
//! Every unprivileged container gets the same mapping: container root is
//! the top id 4294967294 on the host, and container ids `start..start+length`
//! are the same host ids (by default 1..4294967293). The server can only
//! hand out host ids that its own user namespace maps, so the mapping is
//! checked against `/proc/self/uid_map` and `/proc/self/gid_map`.

use actix::prelude::*;

use crate::config::TOP_ID;
use crate::runtime::{IdMap, IdMappings};

/// The identity range of one map (uid or gid).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdRange {
    pub start: u32,
    /// `None` means up to just below the top id.
    pub length: Option<u32>,
}

/// One line of a kernel `uid_map`: inside id, outside id, count.
type MapLine = (u64, u64, u64);

/// Parses the text of `/proc/<pid>/uid_map`.
pub fn parse_id_map(text: &str) -> Result<Vec<MapLine>, String> {
    text.lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| {
            let fields: Vec<u64> = line
                .split_whitespace()
                .map(|field| field.parse::<u64>().map_err(|_| format!("invalid id map line {line:?}")))
                .collect::<Result<_, _>>()?;
            match fields[..] {
                [inside, outside, count] => Ok((inside, outside, count)),
                _ => Err(format!("invalid id map line {line:?}")),
            }
        })
        .collect()
}

/// Returns whether the server's own map covers ids `first..first+count`.
fn covers(own: &[MapLine], first: u64, count: u64) -> bool {
    own.iter().any(|&(inside, _, size)| inside <= first && first + count <= inside + size)
}

/// Builds one map (root to the top id, then the identity range) and checks
/// that the server's own namespace maps every host id in it.
pub fn compute_map(own: &[MapLine], range: IdRange, kind: &str) -> Result<Vec<IdMap>, String> {
    let length = range.length.unwrap_or(TOP_ID - range.start);
    if range.start == 0 || u64::from(range.start) + u64::from(length) > u64::from(TOP_ID) {
        return Err(format!("{kind} range {}+{length} must lie within 1..{TOP_ID}", range.start));
    }
    if !covers(own, u64::from(TOP_ID), 1) {
        return Err(format!("the server's user namespace does not map {kind} {TOP_ID}, which container root needs"));
    }
    if !covers(own, u64::from(range.start), u64::from(length)) {
        return Err(format!("the server's user namespace does not map {kind}s {}..{}", range.start, u64::from(range.start) + u64::from(length)));
    }
    Ok(vec![
        IdMap { container_id: 0, host_id: TOP_ID, size: 1 },
        IdMap { container_id: range.start, host_id: range.start, size: length },
    ])
}

/// Computes the mappings from the server's own maps.
pub fn compute_mappings(uid_map: &str, gid_map: &str, uids: IdRange, gids: IdRange) -> Result<IdMappings, String> {
    Ok(IdMappings {
        uid_map: compute_map(&parse_id_map(uid_map)?, uids, "uid")?,
        gid_map: compute_map(&parse_id_map(gid_map)?, gids, "gid")?,
    })
}

/// The pool actor. A mapping that cannot be computed is kept as its error,
/// so privileged containers still work and unprivileged creates report why.
pub struct UidPool {
    mappings: Result<IdMappings, String>,
    holders: u64,
    mailbox: crate::actors::stats::MailboxStats,
}

impl UidPool {
    /// Computes the mapping from `/proc/self/uid_map` and `/proc/self/gid_map`.
    pub fn from_proc(uids: IdRange, gids: IdRange) -> UidPool {
        let read = |path: &str| std::fs::read_to_string(path).map_err(|error| format!("cannot read {path}: {error}"));
        let mappings = read("/proc/self/uid_map")
            .and_then(|uid_map| Ok((uid_map, read("/proc/self/gid_map")?)))
            .and_then(|(uid_map, gid_map)| compute_mappings(&uid_map, &gid_map, uids, gids));
        UidPool { mappings, holders: 0, mailbox: Default::default() }
    }

    pub fn with_mappings(mappings: Result<IdMappings, String>) -> UidPool {
        UidPool { mappings, holders: 0, mailbox: Default::default() }
    }
}

impl Actor for UidPool {
    type Context = Context<Self>;
}

/// Hands out the mapping to one more container.
#[derive(Message)]
#[rtype(result = "Result<IdMappings, String>")]
pub struct AcquireIdMappings;

impl Handler<AcquireIdMappings> for UidPool {
    type Result = Result<IdMappings, String>;

    fn handle(&mut self, _message: AcquireIdMappings, _ctx: &mut Context<Self>) -> Self::Result {
        self.mailbox.count();
        let mappings = self.mappings.clone()?;
        self.holders += 1;
        Ok(mappings)
    }
}

/// A container no longer holds the mapping.
#[derive(Message)]
#[rtype(result = "()")]
pub struct ReleaseIdMappings;

impl Handler<ReleaseIdMappings> for UidPool {
    type Result = ();

    fn handle(&mut self, _message: ReleaseIdMappings, _ctx: &mut Context<Self>) {
        self.mailbox.count();
        self.holders = self.holders.saturating_sub(1);
    }
}

impl Handler<crate::actors::Introspect> for UidPool {
    type Result = ResponseFuture<serde_json::Value>;

    fn handle(&mut self, _message: crate::actors::Introspect, ctx: &mut Context<Self>) -> Self::Result {
        self.mailbox.count();
        let mailbox = crate::actors::stats::measure_mailbox(self, ctx);
        let mut snapshot = match &self.mappings {
            Ok(mappings) => serde_json::json!({ "mappings": mappings, "holders": self.holders }),
            Err(error) => serde_json::json!({ "error": error, "holders": self.holders }),
        };
        Box::pin(async move {
            snapshot["mailbox"] = mailbox.await;
            snapshot
        })
    }
}

crate::impl_mailbox_probe!(UidPool, mailbox);

#[cfg(test)]
mod tests {
    use super::*;

    const INITIAL: &str = "         0          0 4294967295\n";
    const DEFAULT: IdRange = IdRange { start: 1, length: None };

    #[test]
    fn default_mapping_in_initial_namespace() {
        let mappings = compute_mappings(INITIAL, INITIAL, DEFAULT, DEFAULT).unwrap();
        assert_eq!(
            mappings.uid_map,
            vec![
                IdMap { container_id: 0, host_id: 4294967294, size: 1 },
                IdMap { container_id: 1, host_id: 1, size: 4294967293 },
            ]
        );
        assert_eq!(mappings.host_root_uid(), Some(4294967294));
    }

    #[test]
    fn custom_range() {
        let range = IdRange { start: 100000, length: Some(65536) };
        let mappings = compute_mappings(INITIAL, INITIAL, range, DEFAULT).unwrap();
        assert_eq!(mappings.uid_map[1], IdMap { container_id: 100000, host_id: 100000, size: 65536 });
        assert_eq!(mappings.gid_map[1].size, 4294967293);
    }

    #[test]
    fn nested_namespace_without_top_id_fails() {
        let error = compute_mappings("0 100000 65536\n", INITIAL, DEFAULT, DEFAULT).unwrap_err();
        assert!(error.contains("4294967294"), "{error}");
    }

    #[test]
    fn malformed_map_fails() {
        assert!(parse_id_map("0 0\n").is_err());
        assert!(parse_id_map("a b c\n").is_err());
    }

    #[actix::test]
    async fn pool_counts_holders() {
        let pool = UidPool::with_mappings(compute_mappings(INITIAL, INITIAL, DEFAULT, DEFAULT)).start();
        pool.send(AcquireIdMappings).await.unwrap().unwrap();
        pool.send(AcquireIdMappings).await.unwrap().unwrap();
        pool.send(ReleaseIdMappings).await.unwrap();
        let snapshot = pool.send(crate::actors::Introspect).await.unwrap();
        assert_eq!(snapshot["holders"], 1);
    }
}
