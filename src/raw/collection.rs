//! What the collections do alike on top of the shard table: remove an
//! entry when the object it watches dies, and iterate, retain, clear and
//! purge shard by shard (SAFETY.md, section 7: M4, M5, M8).

use crate::callbacks::{global, Hook};
use crate::raw::table::{Relocatable, ShardWriter, ShardedTable};
use crate::strong::Strong;
use crate::weak::Weak;

/// An entry that watches one object weakly and goes when it dies.
pub(crate) trait Watching: Relocatable + Send + Sync + 'static {
    /// The type of the watched object.
    type Target: Send + Sync + 'static;

    /// The watched object.
    fn watched(&self) -> &Weak<Self::Target>;

    /// What the entry keeps in its hook's node (`()` if nothing).
    type Payload: Send + Sync + 'static;

    /// The death callback that removes this entry, whose address names
    /// the entry (M4); detached when the entry goes any other way (M5).
    fn hook(&self) -> &Hook<Self::Payload>;
}

/// A collection's shared core: what its removal callbacks reach through a
/// `Weak`, so that they never keep it alive (M4).
pub(crate) trait Collection<I>: Send + Sync + 'static {
    fn table(&self) -> &ShardedTable<I>;
}

/// Registers on `object` the hook that removes from `core`'s table the
/// entry filed under `hash` that holds this very hook, and only that one:
/// a newer entry under the same key has a hook of its own and survives
/// (M4). The hook's address names the entry: it is reserved while the
/// entry holds the hook, and the hook runs with a borrowed handle to
/// itself, so the callback needs no handle to `object`. It holds a `Weak`
/// to the core and does nothing once the collection is gone. The hook
/// keeps `payload` in place for the entry (see `Hook::payload`).
///
/// The callback runs on the thread that drops the object's last `Strong`
/// (C14, M10), which must not block or run user code there:
///
/// * it takes the shard's lock only if it is free (the dying thread may
///   hold it already, when a drop happens inside user `Eq` under a write),
///   else posts the removal, which may wait for the lock, to the finalizer
///   thread, with a second handle to the hook that keeps its address
///   reserved until then; after `shutdown` there is none, and the dead
///   entry stays, out of sight of lookups, until `purge`, `retain` or
///   `clear`;
/// * it never lets go of the last handle to the collection there: that
///   would drop every key (user code) on the dying thread. (After
///   `shutdown`, posted work runs inline, so then it does.)
pub(crate) fn remove_on_death<C, I>(
    core: &Strong<C>,
    hash: u64,
    object: &Strong<I::Target>,
    payload: I::Payload,
) -> Hook<I::Payload>
where
    C: Collection<I>,
    I: Watching,
{
    let collection = Strong::downgrade(core);
    let list = Strong::callback_list(object);
    global().register_hook(list, payload, move |hook: &Hook<I::Payload>| {
        let Some(core) = collection.upgrade() else {
            return;
        };
        let removed_here = match core.table().try_write(hash) {
            Some(writer) => {
                remove_holding(writer, hash, hook.identity());
                true
            }
            None => false,
        };
        if !removed_here && !global().is_closed() {
            let hook = hook.keep();
            global().post(move || {
                // Inline if shutdown closed the queue meanwhile: then this
                // runs where the death happened, and must not wait.
                let writer = if global().is_closed() {
                    core.table().try_write(hash)
                } else {
                    Some(core.table().write(hash))
                };
                if let Some(writer) = writer {
                    remove_holding(writer, hash, hook.identity());
                }
            });
            return;
        }
        // The collection may have been dropped meanwhile: if ours is the
        // last handle, its drop goes to the finalizer thread.
        if let Some(last) = Strong::drop_unless_last(core) {
            global().post(move || drop(last));
        }
    })
}

/// Removes, under `writer`, the entry filed under `hash` whose hook is
/// `hook`; its drop follows once no reader can see it (M2).
fn remove_holding<I: Watching>(mut writer: ShardWriter<'_, I>, hash: u64, hook: usize) {
    writer.remove(hash, |item| item.hook().identity() == hook);
}

/// Iterates `table` shard by shard, snapshotting one shard at a time
/// through `project` (M8): a long iteration never holds a pin for long.
pub(crate) fn snapshots<'a, I, T: 'a>(
    table: &'a ShardedTable<I>,
    mut project: impl FnMut(&I) -> Option<T> + 'a,
) -> impl Iterator<Item = T> + 'a
where
    I: Watching,
{
    (0..table.shard_len()).flat_map(move |shard| shard_snapshot(table, shard, &mut project))
}

/// What `project` makes of shard `shard`'s items, under one short pin.
pub(crate) fn shard_snapshot<I, T>(
    table: &ShardedTable<I>,
    shard: usize,
    mut project: impl FnMut(&I) -> Option<T>,
) -> Vec<T>
where
    I: Watching,
{
    let mut batch = Vec::new();
    table.for_each_in_shard(shard, |item| batch.extend(project(item)));
    batch
}

/// Keeps the entries whose object is alive and for which `keep` returns
/// true; removes the others, detaching their callbacks. `keep` runs once
/// per live entry, without any lock (M8). The objects upgraded to call it
/// are dropped after each shard's lock: they may be the last handles.
pub(crate) fn retain_live<I: Watching>(
    table: &ShardedTable<I>,
    mut keep: impl FnMut(&I, &I::Target) -> bool,
) {
    for shard in 0..table.shard_len() {
        let mut held = Vec::new();
        table.retain_shard(
            shard,
            |item| match item.watched().upgrade() {
                Some(object) => {
                    let kept = keep(item, &object);
                    held.push(object);
                    kept
                }
                None => false,
            },
            |item| {
                item.hook().detach();
            },
        );
        drop(held);
    }
}

/// A table this many times larger than its live items need is rebuilt
/// smaller by `clear` and `purge`.
const OVERSIZED: usize = 4;

/// Removes every entry, detaching their callbacks, and shrinks tables
/// left far larger than needed.
pub(crate) fn clear<I: Watching>(table: &ShardedTable<I>) {
    for shard in 0..table.shard_len() {
        table.retain_locked(
            shard,
            |_| false,
            |item| {
                item.hook().detach();
            },
        );
        shrink_shard(table, shard, OVERSIZED);
    }
}

/// Removes the entries whose objects are dead now, without waiting for
/// their callbacks, and shrinks tables left far larger than needed.
/// Returns how many it removed.
pub(crate) fn purge<I: Watching>(table: &ShardedTable<I>) -> usize {
    (0..table.shard_len())
        .map(|shard| {
            let removed = table.retain_locked(shard, |item| item.watched().is_alive(), |_| {});
            shrink_shard(table, shard, OVERSIZED);
            removed
        })
        .sum()
}

/// Rebuilds every shard's table that is more than `factor` times larger
/// than its live items need.
pub(crate) fn shrink<I: Watching>(table: &ShardedTable<I>, factor: usize) {
    for shard in 0..table.shard_len() {
        shrink_shard(table, shard, factor);
    }
}

fn shrink_shard<I: Watching>(table: &ShardedTable<I>, shard: usize, factor: usize) {
    table.write_shard(shard).shrink(factor);
}
