//! Async single flight (`*_async` on the maps) on tokio: waiters do not
//! block their thread, racing callers share one load, a dropped or failing
//! leader hands the load over to a waiter, and a panic reaches its own
//! caller only.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::{oneshot, Notify};
use weakrefs::{Strong, WeakKeyMap, WeakValueMap};

/// Every task's output, in order; a task that panicked fails the test.
async fn joined<T>(tasks: Vec<tokio::task::JoinHandle<T>>) -> Vec<T> {
    let mut outputs = Vec::with_capacity(tasks.len());
    for task in tasks {
        outputs.push(task.await.unwrap());
    }
    outputs
}

fn multi_thread() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// On a single-threaded runtime, waiters that blocked their thread would
/// stop the leader (and the task that releases it) from ever running.
#[test]
fn waiters_do_not_block_the_thread() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    runtime.block_on(async {
        let map: Arc<WeakValueMap<u32, String>> = Arc::new(WeakValueMap::new());
        let release = Arc::new(Notify::new());
        let (started, leading) = oneshot::channel();
        let leader = {
            let (map, release) = (map.clone(), release.clone());
            tokio::spawn(async move {
                map.get_or_insert_with_async(1, || async move {
                    started.send(()).unwrap();
                    release.notified().await;
                    "loaded".to_string()
                })
                .await
            })
        };
        leading.await.unwrap();
        let waiters: Vec<_> = (0..3)
            .map(|_| {
                let map = map.clone();
                tokio::spawn(async move {
                    map.get_or_insert_with_async(1, || async { unreachable!("the leader loads") })
                        .await
                })
            })
            .collect();
        // Let the waiters run up to their wait, then release the leader.
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        release.notify_one();
        let value = leader.await.unwrap();
        for waiter in waiters {
            assert!(Strong::ptr_eq(&waiter.await.unwrap(), &value));
        }
    });
}

#[test]
fn racing_tasks_run_init_once_and_share_the_value() {
    multi_thread().block_on(async {
        let map: Arc<WeakValueMap<&str, Vec<u8>>> = Arc::new(WeakValueMap::new());
        let calls = Arc::new(AtomicUsize::new(0));
        let tasks: Vec<_> = (0..16)
            .map(|_| {
                let (map, calls) = (map.clone(), calls.clone());
                tokio::spawn(async move {
                    map.get_or_insert_with_async("big", || async move {
                        calls.fetch_add(1, Ordering::SeqCst);
                        tokio::task::yield_now().await;
                        vec![7; 1024]
                    })
                    .await
                })
            })
            .collect();
        let values = joined(tasks).await;
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert!(values.iter().all(|v| Strong::ptr_eq(v, &values[0])));
    });
}

/// Cancellation safety: the leader's future is dropped mid-load; a waiter
/// takes the load over, and every waiter gets that one value.
#[test]
fn a_dropped_leader_hands_the_load_to_a_waiter() {
    multi_thread().block_on(async {
        let map: Arc<WeakValueMap<u32, u64>> = Arc::new(WeakValueMap::new());
        let calls = Arc::new(AtomicUsize::new(0));
        let (started, leading) = oneshot::channel();
        let leader = {
            let (map, calls) = (map.clone(), calls.clone());
            tokio::spawn(async move {
                map.get_or_insert_with_async(9, || async move {
                    calls.fetch_add(1, Ordering::SeqCst);
                    started.send(()).unwrap();
                    std::future::pending::<u64>().await
                })
                .await
            })
        };
        leading.await.unwrap();
        let waiters: Vec<_> = (0..4)
            .map(|_| {
                let (map, calls) = (map.clone(), calls.clone());
                tokio::spawn(async move {
                    map.get_or_insert_with_async(9, || async move {
                        calls.fetch_add(1, Ordering::SeqCst);
                        99
                    })
                    .await
                })
            })
            .collect();
        tokio::task::yield_now().await;
        leader.abort();
        assert!(leader.await.unwrap_err().is_cancelled());
        let values = joined(waiters).await;
        assert_eq!(*values[0], 99);
        assert!(values.iter().all(|v| Strong::ptr_eq(v, &values[0])));
        assert_eq!(
            calls.load(Ordering::SeqCst),
            2,
            "the dropped load and one takeover"
        );
    });
}

/// A failing load reaches its own caller only; the waiters retry.
#[test]
fn a_failed_or_panicking_load_reaches_its_caller_only() {
    multi_thread().block_on(async {
        let map: Arc<WeakValueMap<u32, u32>> = Arc::new(WeakValueMap::new());
        let failed = map
            .try_get_or_insert_with_async(1, || async { Err::<u32, _>("unavailable") })
            .await;
        assert_eq!(failed.unwrap_err(), "unavailable");
        assert!(map.is_empty());

        let (started, leading) = oneshot::channel();
        let release = Arc::new(Notify::new());
        let panicking = {
            let (map, release) = (map.clone(), release.clone());
            tokio::spawn(async move {
                map.get_or_insert_with_async(2, || async move {
                    started.send(()).unwrap();
                    release.notified().await;
                    panic!("the load failed (expected by this test)")
                })
                .await
            })
        };
        leading.await.unwrap();
        let waiter = {
            let map = map.clone();
            tokio::spawn(async move { map.get_or_insert_with_async(2, || async { 22 }).await })
        };
        tokio::task::yield_now().await;
        release.notify_one();
        assert!(panicking.await.unwrap_err().is_panic());
        assert_eq!(*waiter.await.unwrap(), 22);
    });
}

#[test]
fn weak_key_map_async_loads_are_single_flight() {
    multi_thread().block_on(async {
        let map: Arc<WeakKeyMap<String, Strong<String>>> = Arc::new(WeakKeyMap::new());
        let key = Strong::new("request".to_string());
        let calls = Arc::new(AtomicUsize::new(0));
        let tasks: Vec<_> = (0..8)
            .map(|_| {
                let (map, key, calls) = (map.clone(), key.clone(), calls.clone());
                tokio::spawn(async move {
                    map.get_or_insert_with_async(&key, || async move {
                        calls.fetch_add(1, Ordering::SeqCst);
                        tokio::task::yield_now().await;
                        Strong::new("metadata".to_string())
                    })
                    .await
                })
            })
            .collect();
        let values = joined(tasks).await;
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert!(values.iter().all(|v| Strong::ptr_eq(v, &values[0])));
        assert_eq!(map.len(), 1);
    });
}

/// An `init` that asks for its own key would wait for itself, whether the
/// load or the nested request is async or blocking; each mix panics with a
/// message instead of hanging (the async `select!` case excepted, which may
/// legitimately finish by another branch).
#[test]
fn a_load_asking_for_its_own_key_panics_across_sync_and_async() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let map: WeakValueMap<u32, u32> = WeakValueMap::new();
    // An async load whose init blocks on the same key.
    let nested = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        runtime.block_on(
            map.get_or_insert_with_async(1, || async { *map.get_or_insert_with(1, || 0) }),
        )
    }));
    let message = *nested.unwrap_err().downcast::<String>().unwrap();
    assert!(message.contains("would wait for itself"), "{message}");
    // A blocking load whose init awaits the same key.
    let nested = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        map.get_or_insert_with(2, || {
            let inner = tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap();
            *inner.block_on(map.get_or_insert_with_async(2, || async { 0 }))
        })
    }));
    let message = *nested.unwrap_err().downcast::<String>().unwrap();
    assert!(message.contains("would wait for itself"), "{message}");
    // Both loads failed and were withdrawn: the keys load normally now.
    assert_eq!(*map.get_or_insert_with(1, || 10), 10);
    assert_eq!(
        *runtime.block_on(map.get_or_insert_with_async(2, || async { 20 })),
        20
    );
}

/// A waker that counts nothing but its own handles: a load that keeps a
/// dropped waiter's waker shows up in `Arc::strong_count`.
struct Noticed;

impl std::task::Wake for Noticed {
    fn wake(self: Arc<Self>) {}
}

/// F4: a waiter's future dropped mid-wait takes its waker back out of the
/// load at once, so a hung load under retrying clients holds nothing of
/// the waiters that gave up (each kept waker used to keep its task alive
/// until the load settled).
#[test]
fn a_dropped_waiter_leaves_nothing_in_a_hung_load() {
    use std::future::Future;
    use std::task::{Context, Poll, Waker};

    let map: WeakValueMap<u32, u32> = WeakValueMap::new();
    let leader_wake = Arc::new(Noticed);
    let leader_waker = Waker::from(leader_wake.clone());
    // A load that never finishes: its `init` waits forever.
    let mut leader = Box::pin(map.get_or_insert_with_async(1, std::future::pending));
    assert!(leader
        .as_mut()
        .poll(&mut Context::from_waker(&leader_waker))
        .is_pending());
    let waiters = if cfg!(miri) {
        20
    } else if cfg!(weakrefs_tsan) {
        20_000
    } else {
        200_000
    };
    for _ in 0..waiters {
        let wake = Arc::new(Noticed);
        let waker = Waker::from(wake.clone());
        let mut waiter = Box::pin(map.get_or_insert_with_async(1, || async { 2 }));
        let poll = waiter.as_mut().poll(&mut Context::from_waker(&waker));
        assert!(matches!(poll, Poll::Pending), "the load is in flight");
        // Ours, the `Waker`'s, and the load's copy.
        assert_eq!(Arc::strong_count(&wake), 3);
        drop(waiter); // a client gives up (a timeout, a closed connection)
        assert_eq!(
            Arc::strong_count(&wake),
            2,
            "the load kept a dropped waiter's waker"
        );
    }
    // A waiter still waiting is woken when the leader goes, and leads.
    let wake = Arc::new(Noticed);
    let waker = Waker::from(wake.clone());
    let mut last = Box::pin(map.get_or_insert_with_async(1, || async { 3 }));
    assert!(last
        .as_mut()
        .poll(&mut Context::from_waker(&waker))
        .is_pending());
    drop(leader);
    match last.as_mut().poll(&mut Context::from_waker(&waker)) {
        Poll::Ready(value) => assert_eq!(*value, 3),
        Poll::Pending => panic!("the waiter took the failed load over and its init is ready"),
    }
}
