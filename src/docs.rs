//! The guide: coming from Python's `weakref`, three patterns with
//! runnable examples, when not to use weak references, and the soundness
//! argument (SAFETY.md).
//!
//! * [`from_python`]: Python's `weakref`, name by name, with each
//!   deliberate difference.
//! * [`from_arc`]: moving from `Arc<dyn Trait>`, `Arc<str>`, `Arc<[T]>`,
//!   and where `Strong` differs from `Arc`.
//! * [`patterns`]: a canonicalising cache, a side table keyed by object, an
//!   observer registry.
//! * [`when_not_to`]: cycles, short-lived values, caches nobody holds,
//!   maps where a sweep would do.
//! * [`safety`]: why the unsafe code is sound, invariant by invariant.
//! * [`internals`]: for contributors: each module's job, the path of a
//!   death from the last `Strong` to a map removal, and which loom model
//!   covers which protocol.

pub mod from_python {
    //! # From Python's `weakref`
    //!
    //! | Python | weakrefs |
    //! | --- | --- |
    //! | an object, kept alive by references | [`Strong<T>`](crate::Strong), like `Arc<T>`: cloning is a new reference |
    //! | `weakref.ref(obj)` | [`Strong::downgrade(&obj)`](crate::Strong::downgrade) → [`Weak<T>`](crate::Weak) |
    //! | `r()` | [`weak.upgrade()`](crate::Weak::upgrade) → `Option<Strong<T>>` |
    //! | `weakref.proxy(obj)` raising `ReferenceError` | [`weak.try_upgrade()`](crate::Weak::try_upgrade) → `Result<Strong<T>, ReferenceError>` |
    //! | `weakref.getweakrefcount(obj)` | [`Strong::weak_count(&obj)`](crate::Strong::weak_count) |
    //! | `weakref.finalize(obj, f)` | [`finalize(&obj, f)`](crate::finalize) → [`Finalizer`](crate::Finalizer): `alive`, `detach`, `call` (Python's `f()`), `atexit` |
    //! | `weakref.WeakMethod` | [`WeakMethod<T, F>`](crate::WeakMethod): `call` returns `None` once the receiver is dead |
    //! | `weakref.WeakValueDictionary` | [`WeakValueMap<K, V>`](crate::WeakValueMap), plus single-flight `get_or_insert_with` |
    //! | `weakref.WeakKeyDictionary` | [`WeakKeyMap<K, V>`](crate::WeakKeyMap), keys by identity; `with` borrows a value in place |
    //! | `weakref.WeakSet` | [`WeakSet<T>`](crate::WeakSet), members by identity |
    //! | `gc.collect()` in tests | [`flush()`](crate::flush): waits until every callback queued so far has run |
    //! | interpreter exit, `atexit` finalizers | [`shutdown()`](crate::shutdown), called at the end of `main` |
    //!
    //! ```
    //! use weakrefs::{finalize, flush, Strong};
    //!
    //! // Python:  obj = Doc(); r = weakref.ref(obj); weakref.finalize(obj, print, "gone")
    //! let obj = Strong::new(String::from("doc"));
    //! let r = Strong::downgrade(&obj);
    //! let done = finalize(&obj, || println!("gone"));
    //! assert_eq!(r.upgrade().as_deref().map(String::as_str), Some("doc"));
    //! drop(obj);                 // del obj
    //! assert!(r.upgrade().is_none());
    //! flush();                   // the callback has run
    //! assert!(!done.alive());
    //! ```
    //!
    //! ## Deliberate differences
    //!
    //! * **Identity, not equality, where Python mixes them.** `Weak`'s `Eq`
    //!   and `Hash` are by identity and never change when the object dies
    //!   (Python compares referents while alive and refuses to hash a
    //!   reference first hashed after death). `WeakKeyMap` and `WeakSet`
    //!   compare keys and members by identity, as JavaScript's `WeakMap`
    //!   and `WeakSet` do; Python compares them by value. They hash the
    //!   object's address with [`IdentityState`](crate::IdentityState), a
    //!   seeded multiply hasher, by default: nobody but the allocator picks
    //!   the keys, so SipHash's guard against chosen keys buys nothing there.
    //! * **Callbacks run on a background thread** (the `weakrefs-finalizer`
    //!   thread), newest first, never inside the thread that dropped the
    //!   object, so a request never pays for clean-up. A panicking callback
    //!   is caught, counted in [`stats()`](crate::stats) and reported on
    //!   stderr. After [`shutdown()`](crate::shutdown) they run inline.
    //!   One thread runs them all, so threads that queue work faster than
    //!   it runs it (deaths with slow callbacks, or keys of a `WeakKeyMap`
    //!   whose values have destructors) wait for it to catch up once more
    //!   than 32 768 are pending, at the end of their next map write or
    //!   death: for the work queued ahead of them, 100 ms at most, and 10
    //!   ms at most in which it finishes nothing. The queue stays bounded
    //!   against threads that write or drop handles; reads never wait (so
    //!   deaths a read sets off, such as values a keep-warm tier lets go
    //!   of, are not held back); and a thread holding a lock a callback
    //!   needs is held up, never deadlocked ([`Stats::backlog_waits`](crate::Stats::backlog_waits)
    //!   counts the waits).
    //! * **Iteration never fails on concurrent change** (Python raises
    //!   `RuntimeError: dictionary changed size during iteration`): it is
    //!   weakly consistent, never yields a dead entry, and may or may not
    //!   see changes made meanwhile.
    //! * **Removal is exact, not eventual.** A dead entry is removed by a
    //!   death callback, so `len()` is exact after `flush()`; a newer value
    //!   inserted under the same key is never removed by the older value's
    //!   death (CPython bug 28427).
    //! * **`del d[k]` hands nothing back in a `WeakKeyMap`**: `insert` and
    //!   `remove` return whether they displaced a value, which is dropped
    //!   on the finalizer thread once no reader borrowing it is left, so
    //!   lookups never pay to let a writer take it back.
    //! * **No interpreter exit to hook**: call `shutdown()` at the end of
    //!   `main` to run the `atexit` finalizers.
    //! * **Reference counting cannot free cycles**, as Python's cycle
    //!   collector can: see [`when_not_to`](super::when_not_to).
}

pub mod from_arc {
    //! # From `Arc`
    //!
    //! `Strong<T>` is `Arc<T>` with weak references that collections and
    //! death callbacks can use. Code written against `Arc` mostly changes
    //! names; unsized values need one more step, since stable Rust lets no
    //! crate but std coerce its handles implicitly.
    //!
    //! | `Arc` | weakrefs |
    //! | --- | --- |
    //! | `let l: Arc<dyn L> = Arc::new(x);` (implicit coercion) | `let l: Strong<dyn L> = weakrefs::unsize!(Strong::new(x));` |
    //! | `let w: sync::Weak<dyn L> = Arc::downgrade(&a);` with `a: Arc<X>` | `let w: Weak<dyn L> = weakrefs::unsize!(Strong::downgrade(&a));`, or `Strong::downgrade(&l)` of a `Strong<dyn L>` |
    //! | `Arc::<str>::from("…")`, `Arc::<[T]>::from(vec)`, `iter.collect::<Arc<[T]>>()` | the same with `Strong` |
    //! | `Arc::<dyn L>::from(boxed)` | `Strong::<dyn L>::from(boxed)` (the value moves into the new allocation) |
    //! | `Arc::new_cyclic`, `into_inner`, `unwrap_or_clone`, `make_mut`, `get_mut`, `try_unwrap` | the same names |
    //! | `Arc::ptr_eq` | `Strong::ptr_eq` (addresses only, never vtables) |
    //! | `Arc::<dyn Any + Send + Sync>::downcast`, `Arc<[T]>` from `[T; N]` and back with `try_into` | the same |
    //!
    //! ## Moving a `dyn Trait` service
    //!
    //! A registry of mixed listener types that used `Arc<dyn Listener>` for
    //! the owners and `std::sync::Weak<dyn Listener>` for the registry:
    //!
    //! ```
    //! use std::sync::atomic::{AtomicUsize, Ordering};
    //! use std::sync::Arc;
    //! use weakrefs::{finalize, flush, Strong, Weak};
    //!
    //! trait Listener: Send + Sync {
    //!     fn notify(&self, event: &str) -> usize;
    //! }
    //!
    //! struct Counter(AtomicUsize);
    //! impl Listener for Counter {
    //!     fn notify(&self, _: &str) -> usize {
    //!         self.0.fetch_add(1, Ordering::Relaxed) + 1
    //!     }
    //! }
    //!
    //! struct Logger;
    //! impl Listener for Logger {
    //!     fn notify(&self, event: &str) -> usize {
    //!         event.len()
    //!     }
    //! }
    //!
    //! // Owners hold `Strong<dyn Listener>`; `unsize!` replaces the implicit
    //! // coercion of `Arc::new(Counter(..))` to `Arc<dyn Listener>`.
    //! let counter: Strong<dyn Listener> = weakrefs::unsize!(Strong::new(Counter(AtomicUsize::new(0))));
    //! let logger: Strong<dyn Listener> = Strong::from(Box::new(Logger) as Box<dyn Listener>);
    //!
    //! // The registry holds `Weak<dyn Listener>`, which never keeps a
    //! // listener alive.
    //! let registry: Vec<Weak<dyn Listener>> =
    //!     vec![Strong::downgrade(&counter), Strong::downgrade(&logger)];
    //! let notify_all = |event: &str| -> Vec<usize> {
    //!     registry.iter().filter_map(Weak::upgrade).map(|l| l.notify(event)).collect()
    //! };
    //! assert_eq!(notify_all("start"), [1, 5]);
    //!
    //! // Death callbacks work on unsized objects too.
    //! let unsubscribed = Arc::new(AtomicUsize::new(0));
    //! let seen = unsubscribed.clone();
    //! finalize(&logger, move || {
    //!     seen.fetch_add(1, Ordering::SeqCst);
    //! });
    //! drop(logger);
    //! flush();
    //! assert_eq!(unsubscribed.load(Ordering::SeqCst), 1);
    //! assert_eq!(notify_all("stop"), [2]);
    //! ```
    //!
    //! A [`WeakSet<dyn Listener>`](crate::WeakSet) is the same registry,
    //! shared by threads and forgetting each listener by itself when it
    //! dies:
    //!
    //! ```
    //! use std::sync::atomic::{AtomicUsize, Ordering};
    //! use weakrefs::{flush, Strong, WeakSet};
    //!
    //! trait Listener: Send + Sync {
    //!     fn notify(&self, event: &str) -> usize;
    //! }
    //!
    //! struct Counter(AtomicUsize);
    //! impl Listener for Counter {
    //!     fn notify(&self, _: &str) -> usize {
    //!         self.0.fetch_add(1, Ordering::Relaxed) + 1
    //!     }
    //! }
    //!
    //! struct Logger;
    //! impl Listener for Logger {
    //!     fn notify(&self, event: &str) -> usize {
    //!         event.len()
    //!     }
    //! }
    //!
    //! let registry: WeakSet<dyn Listener> = WeakSet::new();
    //! let counter: Strong<dyn Listener> = weakrefs::unsize!(Strong::new(Counter(AtomicUsize::new(0))));
    //! let logger: Strong<dyn Listener> = weakrefs::unsize!(Strong::new(Logger));
    //! registry.insert(&counter);
    //! registry.insert(&logger);
    //! let mut heard: Vec<usize> = registry.iter().map(|l| l.notify("start")).collect();
    //! heard.sort();
    //! assert_eq!(heard, [1, 5]);
    //!
    //! drop(logger); // unsubscribes itself
    //! flush();
    //! assert_eq!(registry.len(), 1);
    //! assert!(registry.contains(&counter));
    //! ```
    //!
    //! `WeakKeyMap<dyn Trait, V>` and `WeakValueMap<K, dyn Trait>` (or
    //! `str`, or `[T]`) work alike, except that the `get_or_insert_with`
    //! family, whose `init` returns the value itself, needs a sized value.
    //!
    //! ## Deliberate differences from `Arc`
    //!
    //! * **Unsizing is explicit.** `CoerceUnsized` is unstable, so
    //!   [`unsize!`](crate::unsize) stands in for the implicit coercion; the
    //!   compiler still checks that the value coerces. A dead (or unset)
    //!   `Weak` unsizes to one that names no object.
    //! * **`==` always calls `T::eq`.** For `T: Eq`, `Arc`'s `==` returns
    //!   `true` for two handles to one allocation without calling `T::eq`
    //!   (specialization, which stable Rust does not offer). `Strong`'s
    //!   comparisons always delegate to the value; use
    //!   [`Strong::ptr_eq`](crate::Strong::ptr_eq) for identity.
    //! * **`Weak::as_ptr`, `into_raw` and `from_raw` are for sized values.**
    //!   A `Weak` that names no object keeps no pointer metadata.
    //! * **Drop check.** A `Strong<&'a T>` or a `Weak<&'a T>` must be
    //!   dropped while `'a` lives; std's `Arc` and `Weak` are exempt through
    //!   the unstable `#[may_dangle]` (SAFETY.md, section 9, says what a
    //!   stable equivalent would cost).
    //! * **`unsize!` of a `Weak` upgrades it** for the moment of the
    //!   coercion, to read the value's metadata, where `Arc`'s coercion
    //!   touches no count: meanwhile `strong_count` counts one more, and a
    //!   [`Strong::try_unwrap`](crate::Strong::try_unwrap) or
    //!   [`Strong::into_inner`](crate::Strong::into_inner) racing it on
    //!   another thread can find a second `Strong` (then `into_inner`
    //!   returns `None` and the value is dropped by the converting thread).
    //! * **Entries removed from a collection count as `Weak`s for an epoch.**
    //!   A removed entry lets go of its weak reference once no reader can
    //!   still see it, not at the removal. Until then
    //!   [`Strong::weak_count`](crate::Strong::weak_count) counts it,
    //!   [`Strong::get_mut`](crate::Strong::get_mut) returns `None`, and
    //!   [`Strong::make_mut`](crate::Strong::make_mut) moves the value to a
    //!   new object as if a `Weak` were left (so its death callbacks run).
    //!   [`flush`](crate::flush) settles it, unless another thread stays
    //!   pinned.
    //! * **32-bit counts.** More than `i32::MAX` handles to one object abort
    //!   the process, the limit `Arc` has on 32-bit targets (`isize::MAX`
    //!   on 64-bit ones): it keeps the header at 16 bytes, as `Arc`'s.
    //! * **`make_mut` and death callbacks.** When only `Weak`s share the
    //!   object, `make_mut` moves the value to a new object and leaves the
    //!   `Weak`s dead, as `Arc::make_mut` does; here that old object dies,
    //!   so its callbacks ([`finalize`](crate::finalize), collection
    //!   entries) run, as after [`Strong::try_unwrap`](crate::Strong::try_unwrap).
    //!   When no other handle exists it mutates in place and the callbacks
    //!   stay.
}

pub mod patterns {
    //! # Three patterns
    //!
    //! ## A canonicalising cache
    //!
    //! Worker threads share one copy of each expensive object (a decoded
    //! image, a parsed document, a compiled template) while any request
    //! uses it; the map forgets it by itself afterwards. Concurrent misses
    //! on one name build it once.
    //!
    //! ```
    //! use std::thread;
    //! use weakrefs::{flush, Strong, WeakValueMap};
    //!
    //! struct Template { source: String }
    //!
    //! let templates: WeakValueMap<String, Template> = WeakValueMap::new();
    //! let compiled: Vec<Strong<Template>> = thread::scope(|s| {
    //!     let workers: Vec<_> = (0..4)
    //!         .map(|_| {
    //!             s.spawn(|| {
    //!                 templates.get_or_insert_with("page".to_string(), || Template {
    //!                     source: "<h1>{{title}}</h1>".into(),
    //!                 })
    //!             })
    //!         })
    //!         .collect();
    //!     workers.into_iter().map(|w| w.join().unwrap()).collect()
    //! });
    //! // One compiled template, shared by every worker.
    //! assert!(compiled.iter().all(|t| Strong::ptr_eq(t, &compiled[0])));
    //! assert_eq!(compiled[0].source, "<h1>{{title}}</h1>");
    //!
    //! drop(compiled); // the requests are done
    //! flush();
    //! assert!(templates.is_empty());
    //! ```
    //!
    //! A weak cache keeps only what someone holds. If nothing holds an
    //! object between requests, it is rebuilt every time: give something
    //! a `Strong` for as long as it should stay warm (a session's working
    //! set), or let the map itself keep the values used most often lately
    //! with [`keep_recent`](crate::WeakValueMapBuilder::keep_recent). The
    //! `cache_server` example measures a strong cache, a pure weak one and
    //! one with `keep_recent` under the same load.
    //!
    //! ## A side table keyed by object
    //!
    //! Data attached to objects owned elsewhere (per-connection state,
    //! per-request metadata), which goes when they go, without the owner
    //! knowing about the table.
    //!
    //! ```
    //! use std::sync::atomic::{AtomicU64, Ordering};
    //! use weakrefs::{flush, Strong, WeakKeyMap};
    //!
    //! struct Connection { peer: String }
    //! #[derive(Default)]
    //! struct Traffic { bytes: AtomicU64 }
    //!
    //! let traffic: WeakKeyMap<Connection, Traffic> = WeakKeyMap::new();
    //! let conn = Strong::new(Connection { peer: "10.0.0.1".into() });
    //! traffic.insert(&conn, Traffic::default());
    //! traffic.with(&conn, |t| t.bytes.fetch_add(1500, Ordering::Relaxed));
    //! assert_eq!(traffic.with(&conn, |t| t.bytes.load(Ordering::Relaxed)), Some(1500));
    //! assert_eq!(conn.peer, "10.0.0.1");
    //!
    //! drop(conn); // the connection closes; its traffic record goes with it
    //! flush();
    //! assert!(traffic.is_empty());
    //! ```
    //!
    //! ## An observer registry
    //!
    //! Listeners subscribe by being put in a set that never keeps them
    //! alive; they unsubscribe by going away. [`WeakMethod`](crate::WeakMethod)
    //! does the same for a single callback bound to a receiver.
    //!
    //! ```
    //! use std::sync::atomic::{AtomicU32, Ordering};
    //! use weakrefs::{flush, Strong, WeakMethod, WeakSet};
    //!
    //! struct Listener { events: AtomicU32 }
    //!
    //! let listeners: WeakSet<Listener> = WeakSet::new();
    //! let a = Strong::new(Listener { events: AtomicU32::new(0) });
    //! let b = Strong::new(Listener { events: AtomicU32::new(0) });
    //! listeners.insert(&a);
    //! listeners.insert(&b);
    //! let notify = |set: &WeakSet<Listener>| {
    //!     for listener in set.iter() {
    //!         listener.events.fetch_add(1, Ordering::Relaxed);
    //!     }
    //! };
    //! notify(&listeners);
    //! drop(b); // unsubscribes
    //! flush();
    //! notify(&listeners);
    //! assert_eq!(a.events.load(Ordering::Relaxed), 2);
    //! assert_eq!(listeners.len(), 1);
    //!
    //! let on_event = WeakMethod::new(&a, |l: &Listener, n: u32| l.events.fetch_add(n, Ordering::Relaxed));
    //! assert_eq!(on_event.call(5), Some(2));
    //! drop(a);
    //! assert_eq!(on_event.call(1), None);
    //! ```
}

pub mod when_not_to {
    //! # When not to use weak references
    //!
    //! * **Cycles.** Reference counting cannot free a cycle of `Strong`s:
    //!   a value that holds a `Strong` to itself, directly or through other
    //!   objects, lives forever, and so does a `WeakKeyMap` entry whose
    //!   value holds a `Strong` to its own key (there are no ephemerons).
    //!   Make the back edge a [`Weak`](crate::Weak): a child points to its
    //!   parent weakly, a session to its connection weakly. A callback that
    //!   captures a `Strong` to its own object is such a cycle too.
    //!
    //!   ```
    //!   use weakrefs::{Strong, Weak};
    //!
    //!   struct Parent { name: String }
    //!   struct Child { parent: Weak<Parent> } // not Strong: no cycle
    //!
    //!   let parent = Strong::new(Parent { name: "p".into() });
    //!   let child = Child { parent: Strong::downgrade(&parent) };
    //!   assert_eq!(child.parent.upgrade().unwrap().name, "p");
    //!   drop(parent);
    //!   assert!(child.parent.upgrade().is_none()); // freed despite the child
    //!   ```
    //!
    //! * **Short-lived values.** A weak reference pays for a control block
    //!   and, in a collection, a death callback per entry: for values that
    //!   live for one request, or that are cheap to rebuild, plain ownership
    //!   or an `Arc` passed along is simpler and faster.
    //! * **A cache nobody holds.** A `WeakValueMap` keeps exactly what is in
    //!   use. If the aim is to keep objects between uses, it needs a strong
    //!   holder beside it (`keep_recent`, a session's working set), or a
    //!   strong cache with an eviction policy instead. The `cache_server`
    //!   example measures the three against each other.
    //! * **Ownership that is really single.** If one owner decides when an
    //!   object goes, let it own the object and hand out borrows; weak
    //!   references are for objects whose lifetime is decided by many.
    //! * **Maps where a sweep would do.** Exact, automatic removal costs
    //!   every entry a registered death callback, and
    //!   every death a removal: several times the memory per entry of a
    //!   `DashMap<K, std::sync::Weak<V>>`, slower reads once the map outgrows
    //!   the caches, and slower churn (BENCHMARKS.md in the repository has
    //!   the figures and the reasons). If values seldom die, or dead entries
    //!   may linger until a periodic `retain`, that `DashMap` is faster and
    //!   smaller. This crate is for maps that must not hold what is dead:
    //!   memory bounded by what is alive without a sweep, a `len` that is
    //!   exact after `flush`, and single-flight loading.
}

pub mod safety {
    #![doc = include_str!("../SAFETY.md")]
}

pub mod internals {
    //! # Internals, for contributors
    //!
    //! How the crate is put together: what each module does, what calls
    //! what when an object dies, and where each lock-free protocol is
    //! model-checked. Private items are named in `code`; their own docs
    //! (`cargo doc --document-private-items`) and [SAFETY.md](super::safety)
    //! say more.
    //!
    //! ## Layers
    //!
    //! Each layer uses only the ones below it.
    //!
    //! | layer | modules | job |
    //! | --- | --- | --- |
    //! | shim | `sync` | the one place that names atomics, fences, `UnsafeCell`, thread-locals, mutexes and loom; `Mutex` without poisoning; `lazy_static` under loom |
    //! | | `marks` | what this thread is inside of (`Mark::Callback`, `Mark::Draining`, and the `Loading` frames of the loads it runs): the one thread-local the re-entrancy checks use |
    //! | | `panics` | catch and report a panic where nobody can receive it |
    //! | | `block_cache` | where callback nodes and handles' control blocks are allocated: a per-thread cache of up to 128 freed blocks a size (8 to 72 bytes) in front of the global allocator, so that what the epoch frees in batches is reused, not spilled to the allocator's slow paths (C16) |
    //! | reclamation | `reclaim` | the one module that retires memory: `Reclaimer`, `Pinned::defer`, bounded garbage, pushing garbage through at `flush`; under loom, the process's collector and what must outlive it; `reclaim::epoch`, the collector itself, whose readers pin without a locked instruction (SAFETY.md, section 11) |
    //! | callbacks | `callbacks::entry` | one callback node and its exactly-once state machine (`Entry`, `EntryRef`, `Hook`); a collection hook's `Removal` and the `HookSite` it names |
    //! | | `callbacks::list` | `EntryList`: the lock-free stack of entries with one compactor; `ObjectCallbacks` (an object's list, in its control block) and `register_hook` |
    //! | | `callbacks::queue` | `BatchQueue`: the Treiber stack of death batches, `pending`, the closed marker; `Taken` |
    //! | | `callbacks::worker` | `Worker`: the `weakrefs-finalizer` thread, its start, spin-then-park loop, wake-up and stop |
    //! | | `callbacks::backlog` | backpressure: the bound past which a producer owes a wait, and when a wait gives up (C18) |
    //! | | `callbacks::runtime` | `Runtime`: registration, `on_death`, `drain`, `flush`, `shutdown`, [`Stats`](crate::Stats) |
    //! | | `callbacks::global` | the process's `Runtime` and the thread it spawns; its loom twin |
    //! | | `callbacks::executor` | `Executor`: the one handle `raw/` holds to the runtime ("run this on the finalizer thread") |
    //! | handles | `control`, `strong`, `weak`, `unsize`, `ref_cnt` | the control block (counts, callback list, value) and the handles over it |
    //! | machinery | `raw::table` | `ShardedTable`: sharded open-addressing tables under epoch reclamation, one writer per shard |
    //! | | `raw::collection` | what the collections do alike on top of it: `remove_on_death`, iteration, `retain`, `clear`, `purge` |
    //! | | `raw::single_flight` | `Flights`: single-flight loads shared by both maps |
    //! | | `raw::shard_lock` | `ShardLock`: a shard's writer lock, released by a plain store (section 10) |
    //! | | `raw::tier`, `raw::counters` | `WeakValueMap`'s keep-warm tier; striped statistics counters |
    //! | faces | `finalizer`, `weak_value_map`, `weak_key_map`, `weak_set`, `weak_method`, `par_iter`, `error` | the public API and its docs; thin over the layers below |
    //!
    //! `raw/` imports from `callbacks` only `Executor`, `Hook` and what a
    //! hook's removal is made of (`Removal`, `HookSite`, `KEY_BITS`, the
    //! bits of a hash a hook keeps, and the `EntryRef` a removal is run
    //! with); it reaches an object's
    //! `ObjectCallbacks` through `Strong`; it never
    //! imports `finalizer` or `Runtime`. `reclaim` imports nothing above
    //! `sync`.
    //!
    //! ## The path of a death
    //!
    //! From the last `Strong` of a value held by a `WeakValueMap` to the
    //! map entry's removal:
    //!
    //! 1. `Drop for Strong` calls `Header::decrement_strong`; the decrement
    //!    that reaches zero runs an Acquire fence and returns true (O2), and
    //!    `Strong::drop_slow` drops the value (`ControlBlock::drop_value`).
    //! 2. `AfterDeath::drop` finds the object's `ObjectCallbacks` non-empty
    //!    and calls `Runtime::on_death` on `callbacks::global()`.
    //! 3. `on_death` takes the whole list (`ObjectCallbacks::take_all`, which
    //!    frees the list's anchor if it has one; no
    //!    registration can race a death, C6), and sorts the entries: a
    //!    hook (`Entry::on_dying_thread`) it finds alive runs at once, on
    //!    this thread, unclaimed (`EntryRef::run_claimed`, C14, C20), under
    //!    a pin of the epoch taken before the load that found it alive
    //!    (M14; a death that finds every hook settled does not pin); it
    //!    claims each other alive entry (`Entry::claim`, C1), and those
    //!    form one batch for `Runtime::dispatch`.
    //! 4. The map's hook is the `Removal` that
    //!    `raw::collection::remove_on_death` registered
    //!    (`ObjectCallbacks::register_hook`): the address of the site that
    //!    heads the entry's shard, and the entry's key, the bits of its hash
    //!    the shard files it by, kept in the hook's status word. Its run
    //!    calls the
    //!    site's function, `raw::collection::death_at_shard`, which reaches
    //!    the shard through that uncounted address (valid while the dying
    //!    thread stays pinned, M14), borrows the dying
    //!    thread's pin unless the entry's drop runs user code (then the
    //!    writer's `WritePin` is a lazy one), and, if the shard's lock is
    //!    free and the shard open (`Shard::try_write`; a closed one means
    //!    the map is gone), calls `remove_holding`, which counts the death
    //!    in the shard (`Shard::count_death`): `ShardWriter::remove_locked` finds the entry
    //!    whose hook is this very hook (M4), borrowing it under the lock
    //!    only, and `unlink` turns its slot into a tombstone (M2). A busy
    //!    shard, or a map with a removal listener, takes the slower way
    //!    (`slow_death`, through the shard's `HookTarget`): it upgrades the
    //!    map's core through its uncounted address (`CoreRef`, M14), tries
    //!    the lock once more if nothing must hear of the removal (or after
    //!    `shutdown`), and otherwise posts the same removal to the
    //!    finalizer thread (`Executor::post`, M10), never after `shutdown`;
    //!    a listener's notice runs there after the unlock.
    //! 5. Dropping the `ShardWriter` unlocks the shard and hands what it
    //!    unlinked to the epoch under its `WritePin` (`defer_item_drop`
    //!    for the one entry a death removes; `Retired::defer` when a write
    //!    lets go of more; `Pinned::defer`, I7, M9);
    //!    from the finalizer thread (`Executor::post`) if the entry's drop
    //!    runs user code (`Relocatable::drop_runs_user_code`, `plain_drop`,
    //!    M10). Once no
    //!    reader pinned before the unlink is left, the deferred function
    //!    drops the entry (its side, the `Hook`; then its key and `Weak`), or moves it out
    //!    and posts its drop to the finalizer thread if that runs user
    //!    code, then calls `free_slot` and `release`
    //!    (`drop_in_place_and_free`). The hook's node and,
    //!    with the last weak reference, the dead value's control block go
    //!    back to that thread's `block_cache`.
    //! 6. A posted job, or the user callbacks of step 3, go through
    //!    `Runtime::dispatch`: `BatchQueue::push` (C7) and `Worker::wake`
    //!    (C8). The worker's loop (`Worker::run`) calls `Runtime::drain`:
    //!    `BatchQueue::take`, then `run_taken` runs each batch oldest first
    //!    (`run_chain`, `run_callback`, under `Mark::Draining` and
    //!    `Mark::Callback`) and `BatchQueue::finish` counts it done, waking
    //!    a waiting `flush` (C11). After `shutdown` the push is refused and
    //!    `run_inline` runs the chain on the dying thread, never nested
    //!    (C9, C15).
    //! 7. A push that left more than the bound pending makes the dying
    //!    thread owe a wait (`backlog::note_push`); `on_death` ends at a
    //!    safe point (`Runtime::settle_backlog`), where it waits for the
    //!    worker to catch up (C18). The collections' public writes end at
    //!    one too (`SafePoint`).
    //!
    //! ## Where each protocol is model-checked
    //!
    //! `.ci/loom` runs every model, with `--cfg weakrefs_loom --cfg
    //! crossbeam_loom`. A model that needs private items lives at the end
    //! of the file that defines the protocol, in
    //! `#[cfg(all(test, weakrefs_loom))] mod loom_models`; a model that
    //! drives the public API lives in `loom-tests/tests/`, one file per
    //! concept (see the contributor section of the README).
    //!
    //! | protocol (SAFETY.md) | models | where |
    //! | --- | --- | --- |
    //! | handles: death is final, one drop, one free, `get_mut` (I1–I6, O2–O5) | `upgrade_races_last_strong_drop` and the other six | `loom-tests/tests/handles.rs` |
    //! | `make_mut`, `into_inner` (O2′, O12) | `make_mut_races_a_downgrade_clone_and_upgrade`, `make_mut_races_a_weak_upgrade`, `into_inner_on_two_threads_races_an_upgrade` | `loom-tests/tests/handles_make_mut.rs` |
    //! | unsized blocks, `new_cyclic` (U1–U4, O3, O11) | `unsized_upgrade_races_last_strong_drop`, `unsized_last_weak_drop_races_last_strong_drop`, `new_cyclic_weak_upgrades_racing_construction` | `loom-tests/tests/unsized_handles.rs` |
    //! | retired memory outlives readers (I7) | `retired_node_outlives_pinned_reader` | `src/reclaim.rs` |
    //! | exactly once, death excludes registration (C1, C6, C12) | `detach_races_death`, `call_races_death`, `registration_races_last_drop_elsewhere` | `loom-tests/tests/finalizers.rs` |
    //! | list compaction (C4, C5, C5′) | `compaction_never_forgets_a_push_it_counted` | `src/callbacks/list.rs` |
    //! | registration racing detach and compaction (C5) | `compaction_frees_while_others_push_and_detach`, `shutdown_races_registration_and_compaction` | `src/callbacks/runtime.rs` |
    //! | no lost wake-up (C8) | `push_races_drain_and_park` | `src/callbacks/worker.rs` |
    //! | one consumer per batch, flush (C7, C8, C11) | `flush_races_new_work` | `src/callbacks/runtime.rs` |
    //! | nothing lost to shutdown (C9), shutdown completes (C10) | `death_races_shutdown_without_atexit`, `death_races_shutdown_with_atexit`, `concurrent_shutdowns_return_after_the_atexit_pass` | `src/callbacks/runtime.rs` |
    //! | shard table: removal, reads, growth, rebuilds, slot reuse, the tier (section 7) | `insert_races_death_of_the_previous_value`, `get_races_remove_and_death`, `read_races_growth` and the others in that file | `loom-tests/tests/weak_value_map.rs` |
    //! | single flight (M6) | `single_flight_leader_races_waiter`, `a_failing_leader_lets_the_waiter_lead` | `loom-tests/tests/weak_value_map.rs` |
    //! | async waiter dropped while the load settles (M6) | `a_dropped_waiter_races_the_settling` | `src/raw/single_flight.rs` |
    //! | the shard lock: exclusion, no lost wake-up (L1, L2) | `two_lockers_never_overlap`, `a_waiter_is_never_left_asleep`, `two_waiters_are_both_woken` | `src/raw/shard_lock.rs` |
    //! | values borrowed in place (section 8) | `a_removal_racing_with_never_drops_a_borrowed_value` and the other six | `loom-tests/tests/weak_key_map.rs` |
    //!
    //! Models build their own `Runtime` (`Runtime::inline`,
    //! `Runtime::external`) or `Reclaimer` (`Reclaimer::with_collector`)
    //! where they can; through the public API they use the process-wide
    //! ones, which under loom are made afresh for every execution
    //! (`callbacks::global`, `reclaim::outlives_collector`).
}
