//! The guide: coming from Python's `weakref`, three patterns with
//! runnable examples, when not to use weak references, and the soundness
//! argument (SAFETY.md).
//!
//! * [`from_python`]: Python's `weakref`, name by name, with each
//!   deliberate difference.
//! * [`patterns`]: a canonicalising cache, a side table keyed by object, an
//!   observer registry.
//! * [`when_not_to`]: cycles, short-lived values, caches nobody holds,
//!   maps where a sweep would do.
//! * [`safety`]: why the unsafe code is sound, invariant by invariant.

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
    //!   and `WeakSet` do; Python compares them by value.
    //! * **Callbacks run on a background thread** (the `weakrefs-finalizer`
    //!   thread), newest first, never inside the thread that dropped the
    //!   object, so a request never pays for clean-up. A panicking callback
    //!   is caught, counted in [`stats()`](crate::stats) and reported on
    //!   stderr. After [`shutdown()`](crate::shutdown) they run inline.
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
    //! set), or let the map itself keep the most recently used values
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
