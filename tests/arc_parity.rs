//! Arc parity (issue #16): unsized values (`Strong<dyn Trait>`,
//! `Strong<str>`, `Strong<[T]>`), their constructors, `unsize!`, and
//! `new_cyclic`, `into_inner`, `unwrap_or_clone`, `make_mut`. Most tests
//! follow std's own `Arc` tests (`library/alloctests/tests/{arc,sync}.rs`),
//! in this crate's words. Handles only, so Miri run 1 (strict provenance,
//! leak check) covers the file.

use std::any::Any;
use std::cell::RefCell;
use std::collections::hash_map::DefaultHasher;
use std::ffi::CStr;
use std::fmt::{Debug, Display};
use std::hash::{Hash, Hasher};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::thread;

use weakrefs::{unsize, Strong, Weak};

/// Counts its drops in a shared counter.
#[derive(Debug)]
struct Counted(Arc<AtomicUsize>);

impl Clone for Counted {
    fn clone(&self) -> Self {
        Counted(self.0.clone())
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

fn counter() -> Arc<AtomicUsize> {
    Arc::new(AtomicUsize::new(0))
}

fn count(counter: &Arc<AtomicUsize>) -> usize {
    counter.load(Ordering::SeqCst)
}

fn hash_of<T: Hash + ?Sized>(value: &T) -> u64 {
    let mut hasher = DefaultHasher::new();
    value.hash(&mut hasher);
    hasher.finish()
}

trait Listener: Send + Sync {
    fn notify(&self) -> usize;
}

#[derive(Debug)]
struct Printer(usize);

impl Listener for Printer {
    fn notify(&self) -> usize {
        self.0
    }
}

/// A listener aligned above anything the header has, so its offset in the
/// block comes from the vtable's alignment.
#[repr(align(128))]
struct Aligned {
    byte: u8,
    drops: Arc<AtomicUsize>,
}

impl Listener for Aligned {
    fn notify(&self) -> usize {
        usize::from(self.byte)
    }
}

impl Drop for Aligned {
    fn drop(&mut self) {
        self.drops.fetch_add(1, Ordering::SeqCst);
    }
}

// ---- unsizing -------------------------------------------------------------

#[test]
fn an_array_handle_unsizes_to_a_slice_equal_to_a_converted_one() {
    let array: Strong<[u32; 3]> = Strong::new([3, 2, 1]);
    let unsized_handle: Strong<[u32]> = unsize!(array);
    let converted: Strong<[u32]> = Strong::from(&[3, 2, 1][..]);
    assert_eq!(unsized_handle, converted);
    assert!(!Strong::ptr_eq(&unsized_handle, &converted));

    let weak = Strong::downgrade(&unsized_handle).clone();
    assert_eq!(weak.upgrade().as_deref(), Some(&[3, 2, 1][..]));
}

#[test]
fn a_trait_object_handle_names_the_same_object() {
    let printer = Strong::new(Printer(7));
    let listener: Strong<dyn Listener> = unsize!(printer.clone());
    assert_eq!(listener.notify(), 7);
    assert_eq!(Strong::strong_count(&printer), 2);
    assert_eq!(
        Strong::as_ptr(&listener).cast::<u8>(),
        Strong::as_ptr(&printer).cast::<u8>()
    );

    let weak: Weak<dyn Listener> = unsize!(Strong::downgrade(&printer));
    assert_eq!(Strong::weak_count(&listener), 1);
    assert!(Strong::ptr_eq(&weak.upgrade().unwrap(), &listener));

    drop(printer);
    assert_eq!(weak.upgrade().unwrap().notify(), 7);
    drop(listener);
    assert!(weak.upgrade().is_none());
}

#[test]
fn any_downcasts_through_the_unsized_handle() {
    let any: Strong<dyn Any + Send + Sync> = unsize!(Strong::new(41_i32));
    assert_eq!(any.downcast_ref::<i32>(), Some(&41));
    assert!(any.downcast_ref::<u32>().is_none());
}

#[test]
fn unsizing_a_weak_of_an_uninhabited_type_names_no_object() {
    enum Void {}
    let weak = Weak::<Void>::new().clone();
    assert!(weak.upgrade().is_none());
    let weak: Weak<dyn Any> = unsize!(weak);
    let weak = weak.clone();
    assert!(weak.upgrade().is_none());
    assert_eq!(weak.strong_count(), 0);
}

#[test]
fn unsizing_a_dead_weak_gives_a_weak_that_names_no_object() {
    let drops = counter();
    let strong = Strong::new(Counted(drops.clone()));
    let weak = Strong::downgrade(&strong);
    drop(strong);
    assert_eq!(count(&drops), 1);
    let weak: Weak<dyn Debug + Send + Sync> = unsize!(weak);
    assert!(weak.upgrade().is_none());
    assert_eq!(weak, Weak::<Counted>::new().into_unsized_for_test());
    assert_eq!(count(&drops), 1);
}

/// `unsize!` on a `Weak::new()`, for comparisons with unset unsized weaks.
trait IntoUnsizedForTest {
    fn into_unsized_for_test(self) -> Weak<dyn Debug + Send + Sync>;
}

impl IntoUnsizedForTest for Weak<Counted> {
    fn into_unsized_for_test(self) -> Weak<dyn Debug + Send + Sync> {
        unsize!(self)
    }
}

#[test]
fn the_last_unsized_strong_drops_the_value_once_through_its_vtable() {
    let drops = counter();
    let strong: Strong<dyn Debug + Send + Sync> = unsize!(Strong::new(Counted(drops.clone())));
    let other = strong.clone();
    drop(strong);
    assert_eq!(count(&drops), 0);
    drop(other);
    assert_eq!(count(&drops), 1);
}

#[test]
fn a_weak_dyn_outlives_its_value_and_frees_the_block() {
    let drops = counter();
    let strong: Strong<dyn Listener> = unsize!(Strong::new(Aligned {
        byte: 9,
        drops: drops.clone(),
    }));
    let weak = Strong::downgrade(&strong);
    let weak_clone = weak.clone();
    drop(strong);
    assert_eq!(count(&drops), 1);
    assert!(weak.upgrade().is_none());
    assert_eq!(weak.strong_count(), 0);
    assert!(weak.ptr_eq(&weak_clone));
    // The last `Weak` frees a block whose over-aligned unsized value is
    // dead: Miri checks the layout it frees with.
    drop(weak);
    drop(weak_clone);
    assert_eq!(count(&drops), 1);
}

#[test]
fn an_over_aligned_dyn_value_sits_at_its_alignment() {
    let drops = counter();
    for byte in 0..3 {
        let listener: Strong<dyn Listener> = unsize!(Strong::new(Aligned {
            byte,
            drops: drops.clone(),
        }));
        assert_eq!(Strong::as_ptr(&listener).cast::<u8>().align_offset(128), 0);
        assert_eq!(listener.notify(), usize::from(byte));
        let boxed: Box<dyn Listener> = Box::new(Aligned {
            byte: byte + 10,
            drops: drops.clone(),
        });
        let from_box = Strong::<dyn Listener>::from(boxed);
        assert_eq!(Strong::as_ptr(&from_box).cast::<u8>().align_offset(128), 0);
        assert_eq!(from_box.notify(), usize::from(byte) + 10);
    }
    assert_eq!(count(&drops), 6);
}

#[test]
fn ptr_eq_and_weak_identity_compare_addresses_only() {
    let printer = Strong::new(Printer(1));
    let as_listener: Strong<dyn Listener> = unsize!(printer.clone());
    let as_debug: Strong<dyn Debug + Send + Sync> = unsize!(printer.clone());
    assert_eq!(
        Strong::as_ptr(&as_listener).cast::<u8>(),
        Strong::as_ptr(&as_debug).cast::<u8>()
    );

    let first: Weak<dyn Listener> = unsize!(Strong::downgrade(&printer));
    let second = Strong::downgrade(&as_listener);
    assert!(first.ptr_eq(&second));
    assert_eq!(first, second);
    assert_eq!(hash_of(&first), hash_of(&second));
    drop((printer, as_listener, as_debug));
    assert_eq!(first, second); // identity survives death
}

// ---- unsized values: formatting, comparison, access ------------------------

#[test]
fn unsized_values_compare_hash_and_format_by_value() {
    let text: Strong<str> = Strong::from("abc");
    assert_eq!(format!("{text}"), "abc");
    assert_eq!(format!("{text:?}"), "\"abc\"");
    assert_eq!(hash_of(&text), hash_of("abc"));
    assert!(text < Strong::from("abd"));
    assert_eq!(text, Strong::from(String::from("abc")));

    let slice: Strong<[i32]> = Strong::from(vec![1, 2, 3]);
    assert_eq!(format!("{slice:?}"), "[1, 2, 3]");
    let borrowed: &[i32] = std::borrow::Borrow::borrow(&slice);
    assert_eq!(borrowed, slice.as_ref());
    assert_eq!(
        format!("{slice:p}"),
        format!("{:p}", Strong::as_ptr(&slice))
    );

    let shown: Strong<dyn Display + Send + Sync> = unsize!(Strong::new(5));
    assert_eq!(shown.to_string(), "5");
}

#[test]
fn nan_is_not_equal_to_itself() {
    let nan = Strong::new(f32::NAN);
    assert!(nan != nan);
}

/// `Arc` skips `T::eq` for two handles to one allocation when `T: Eq`
/// (specialization); `Strong` always calls it (API.md, deliberate
/// differences).
#[test]
fn eq_always_calls_the_values_eq() {
    #[derive(Eq)]
    struct CountsEq(RefCell<usize>);
    impl PartialEq for CountsEq {
        fn eq(&self, other: &Self) -> bool {
            *self.0.borrow_mut() += 1;
            *other.0.borrow_mut() += 1;
            true
        }
    }
    let x = Strong::new(CountsEq(RefCell::new(0)));
    assert!(x == x);
    assert!(!(x != x));
    assert_eq!(*x.0.borrow(), 4);
}

#[test]
fn get_mut_works_on_an_unsized_value() {
    let mut slice: Strong<[i32]> = Strong::from(vec![1, 2]);
    Strong::get_mut(&mut slice).unwrap()[0] = 10;
    let weak = Strong::downgrade(&slice);
    assert!(Strong::get_mut(&mut slice).is_none());
    drop(weak);
    assert_eq!(*slice, [10, 2]);
}

#[test]
fn raw_round_trips_keep_unsized_metadata() {
    let text: Strong<str> = Strong::from("hello");
    let raw = Strong::into_raw(text.clone());
    // SAFETY: from `into_raw`, turned back once.
    let back = unsafe { Strong::from_raw(raw) };
    assert_eq!(&*back, "hello");
    assert!(Strong::ptr_eq(&text, &back));

    let listener: Strong<dyn Listener> = unsize!(Strong::new(Printer(3)));
    let raw = Strong::into_raw(listener);
    // SAFETY: from `into_raw`, turned back once.
    let back = unsafe { Strong::from_raw(raw) };
    assert_eq!(back.notify(), 3);
}

#[test]
fn unsized_handles_cross_threads() {
    let printer = Strong::new(Printer(11));
    let listener: Strong<dyn Listener> = unsize!(printer.clone());
    let weak: Weak<dyn Listener> = unsize!(Strong::downgrade(&printer));
    drop(printer);
    let barrier = Arc::new(Barrier::new(2));
    let upgrader = {
        let barrier = barrier.clone();
        thread::spawn(move || {
            barrier.wait();
            weak.upgrade().map(|l| l.notify())
        })
    };
    barrier.wait();
    drop(listener);
    // Either the upgrade won and saw the value, or it saw a dead object.
    assert!(matches!(upgrader.join().unwrap(), Some(11) | None));
}

// ---- constructors ---------------------------------------------------------

#[test]
fn from_str_string_and_box_str() {
    let r: Strong<str> = Strong::from("foo");
    assert_eq!(&r[..], "foo");
    let r: Strong<str> = Strong::from(String::from("bar"));
    assert_eq!(&*r, "bar");
    let r: Strong<str> = Strong::from(String::from("baz").into_boxed_str());
    assert_eq!(&*r, "baz");
}

#[test]
fn zero_length_slices_and_strs() {
    let empty: Strong<str> = Strong::from("");
    assert_eq!(&*empty, "");
    assert_eq!(Strong::<str>::default().len(), 0);
    let empty: Strong<[String]> = Strong::from(Vec::new());
    assert!(empty.is_empty());
    let empty: Strong<[String]> = Strong::from(&[][..]);
    let weak = Strong::downgrade(&empty);
    drop(empty);
    assert!(weak.upgrade().is_none());
    let empty: Strong<[u8]> = std::iter::empty().collect();
    assert!(empty.is_empty());
    assert!(Strong::<[u64]>::default().is_empty());
}

#[test]
fn from_slice_copies_and_clones() {
    let copied: Strong<[u32]> = Strong::from(&[1, 2, 3][..]);
    assert_eq!(&copied[..], [1, 2, 3]);

    #[derive(Clone, Debug, PartialEq)]
    struct X(u32);
    let source = [X(1), X(2), X(3)];
    let cloned: Strong<[X]> = Strong::from(&source[..]);
    assert_eq!(&cloned[..], &source[..]);
}

#[test]
fn a_panicking_clone_drops_what_was_cloned_and_leaks_nothing() {
    struct Fails {
        index: u32,
        drops: Arc<AtomicUsize>,
        _heap: String,
    }
    impl Clone for Fails {
        fn clone(&self) -> Self {
            assert_ne!(self.index, 2, "clone of element 2 fails");
            Fails {
                index: self.index,
                drops: self.drops.clone(),
                _heap: String::from("owned"),
            }
        }
    }
    impl Drop for Fails {
        fn drop(&mut self) {
            self.drops.fetch_add(1, Ordering::SeqCst);
        }
    }
    let drops = counter();
    let source: Vec<Fails> = (0..4)
        .map(|index| Fails {
            index,
            drops: drops.clone(),
            _heap: String::new(),
        })
        .collect();
    let result = catch_unwind(AssertUnwindSafe(|| Strong::<[Fails]>::from(&source[..])));
    assert!(result.is_err());
    // The two clones made before the panic were dropped; the source
    // elements were not.
    assert_eq!(count(&drops), 2);
    drop(source);
    assert_eq!(count(&drops), 6);
}

#[test]
fn slice_elements_with_destructors_drop_exactly_once() {
    let drops = counter();
    let make = |n: usize| (0..n).map(|_| Counted(drops.clone())).collect::<Vec<_>>();

    let from_vec: Strong<[Counted]> = Strong::from(make(3));
    let from_slice: Strong<[Counted]> = Strong::from(&make(2)[..]); // the 2 originals drop here
    assert_eq!(count(&drops), 2);
    let collected: Strong<[Counted]> = make(4).into_iter().collect();
    let boxed: Strong<[Counted]> = Strong::from(make(1).into_boxed_slice());
    let weak = Strong::downgrade(&from_vec);
    let extra = from_vec.clone();
    drop((from_vec, from_slice, collected, boxed));
    assert_eq!(count(&drops), 2 + 2 + 4 + 1);
    drop(extra);
    assert_eq!(count(&drops), 2 + 3 + 2 + 4 + 1);
    drop(weak);
    assert_eq!(count(&drops), 12);
}

#[test]
fn from_iter_matches_vec_and_frees_on_panic() {
    let iter = (0..100_u16).filter(|n| n % 2 == 0).map(Box::new);
    let vec = iter.clone().collect::<Vec<_>>();
    let strong = iter.collect::<Strong<[_]>>();
    assert_eq!(&*vec, &*strong);

    let zst = (0..10).map(drop).collect::<Strong<[()]>>();
    assert_eq!(zst.len(), 10);
    assert_eq!(std::mem::size_of_val(&*zst), 0);

    let panicking = (0..100_u16).map(|n| {
        assert_ne!(n, 98, "the iterator fails");
        Box::new(n)
    });
    assert!(catch_unwind(|| panicking.collect::<Strong<[_]>>()).is_err());
}

#[test]
fn from_box_moves_sized_unsized_and_zero_sized_values() {
    let r: Strong<u32> = Strong::from(Box::new(123));
    assert_eq!(*r, 123);

    let r: Strong<[u32]> = Strong::from(vec![1, 2, 3].into_boxed_slice());
    assert_eq!(&r[..], [1, 2, 3]);

    let b: Box<dyn Display> = Box::new(123);
    let r: Strong<dyn Display> = Strong::from(b);
    assert_eq!(r.to_string(), "123");

    let b: Box<dyn Debug> = Box::new(());
    let r: Strong<dyn Debug> = Strong::from(b);
    assert_eq!(format!("{r:?}"), "()");

    let drops = counter();
    let b: Box<dyn Debug + Send + Sync> = Box::new(Counted(drops.clone()));
    let r: Strong<dyn Debug + Send + Sync> = Strong::from(b);
    assert_eq!(count(&drops), 0); // moved, not dropped
    drop(r);
    assert_eq!(count(&drops), 1);
}

#[test]
fn a_custom_dst_is_freed_by_its_last_weak() {
    let name: Strong<CStr> = Strong::from(Box::<CStr>::from(c"swordfish"));
    assert_eq!(format!("{name:?}"), "\"swordfish\"");
    let weak: Weak<CStr> = Strong::downgrade(&name);
    drop(name);
    // The weak names a dropped unsized value, whose block it must still
    // free with the right layout.
    assert!(weak.upgrade().is_none());
    drop(weak);
}

#[test]
fn arrays_convert_to_and_from_slices() {
    let from_array: Strong<[u32]> = Strong::from([1, 2, 3]);
    let from_vec: Strong<[u32]> = Strong::from(vec![1, 2, 3]);
    assert_eq!(from_array, from_vec);
    let array: Result<Strong<[u32; 3]>, _> = from_vec.clone().try_into();
    let array = array.unwrap();
    let seen_as_slice: Strong<[u32]> = unsize!(array.clone());
    assert!(Strong::ptr_eq(&seen_as_slice, &from_vec));
    drop(seen_as_slice);
    let wrong: Result<Strong<[u32; 2]>, _> = from_vec.clone().try_into();
    assert!(Strong::ptr_eq(&wrong.unwrap_err(), &from_vec));
    assert_eq!(Strong::strong_count(&from_vec), 2); // `array` and itself
}

#[test]
fn any_downcasts_to_its_own_type_only() {
    let r1: Strong<dyn Any + Send + Sync> = unsize!(Strong::new(i32::MAX));
    let r2: Strong<dyn Any + Send + Sync> =
        Strong::from(Box::new("abc") as Box<dyn Any + Send + Sync>);
    assert!(r1.clone().downcast::<u32>().is_err());
    let r1 = r1.downcast::<i32>().unwrap();
    assert_eq!(r1, Strong::new(i32::MAX));
    assert!(r2.clone().downcast::<i32>().is_err());
    let r2 = r2.downcast::<&'static str>().unwrap();
    assert_eq!(r2, Strong::new("abc"));

    let drops = counter();
    let any: Strong<dyn Any + Send + Sync> = unsize!(Strong::new(Counted(drops.clone())));
    let weak = Strong::downgrade(&any);
    let counted = any.downcast::<Counted>().unwrap();
    assert!(Strong::ptr_eq(
        &weak.upgrade().unwrap(),
        &unsize!(counted.clone())
    ));
    drop(counted);
    assert_eq!(count(&drops), 1);
    assert!(weak.upgrade().is_none());
}

// ---- new_cyclic -----------------------------------------------------------

#[test]
fn new_cyclic_with_no_weak_kept() {
    struct ZeroRefs {
        inner: Weak<ZeroRefs>,
    }
    let zero_refs = Strong::new_cyclic(|inner| {
        assert_eq!(inner.strong_count(), 0);
        assert!(inner.upgrade().is_none());
        ZeroRefs { inner: Weak::new() }
    });
    assert_eq!(Strong::strong_count(&zero_refs), 1);
    assert_eq!(Strong::weak_count(&zero_refs), 0);
    assert_eq!(zero_refs.inner.strong_count(), 0);
}

#[test]
fn new_cyclic_with_one_and_two_weaks_kept() {
    struct OneRef {
        inner: Weak<OneRef>,
    }
    let one_ref = Strong::new_cyclic(|inner| {
        assert!(inner.upgrade().is_none());
        OneRef {
            inner: inner.clone(),
        }
    });
    assert_eq!(Strong::strong_count(&one_ref), 1);
    assert_eq!(Strong::weak_count(&one_ref), 1);
    let one_ref2 = one_ref.inner.upgrade().unwrap();
    assert!(Strong::ptr_eq(&one_ref, &one_ref2));
    assert_eq!(Strong::strong_count(&one_ref), 2);

    struct TwoRefs {
        inner1: Weak<TwoRefs>,
        inner2: Weak<TwoRefs>,
    }
    let two_refs = Strong::new_cyclic(|inner| {
        let inner1 = inner.clone();
        let inner2 = inner1.clone();
        TwoRefs { inner1, inner2 }
    });
    assert_eq!(Strong::weak_count(&two_refs), 2);
    assert!(Strong::ptr_eq(
        &two_refs,
        &two_refs.inner1.upgrade().unwrap()
    ));
    assert!(Strong::ptr_eq(
        &two_refs,
        &two_refs.inner2.upgrade().unwrap()
    ));
    // The value holds Weaks to itself, which do not keep it alive.
    let weak = two_refs.inner1.clone();
    drop((one_ref, one_ref2, two_refs));
    assert!(weak.upgrade().is_none());
}

#[test]
fn a_panic_in_new_cyclic_frees_the_block_and_leaves_its_weaks_dead() {
    let escaped: RefCell<Option<Weak<String>>> = RefCell::new(None);
    let result = catch_unwind(AssertUnwindSafe(|| {
        Strong::new_cyclic(|me: &Weak<String>| {
            *escaped.borrow_mut() = Some(me.clone());
            panic!("construction fails")
        })
    }));
    assert!(result.is_err());
    let escaped = escaped.into_inner().unwrap();
    assert!(escaped.upgrade().is_none());
    assert_eq!(escaped.strong_count(), 0);
    // Dropping the last Weak frees the block, whose value was never
    // written (Miri's leak check and use-of-uninit check watch it).
    drop(escaped);

    let result = catch_unwind(|| Strong::<String>::new_cyclic(|_| panic!("nothing kept")));
    assert!(result.is_err());
}

#[test]
fn a_weak_sent_away_during_new_cyclic_upgrades_once_it_returns() {
    let (sender, receiver) = std::sync::mpsc::channel::<Weak<String>>();
    let reader = thread::spawn(move || {
        let weak = receiver.recv().unwrap();
        // `new_cyclic` may not have returned yet: retry until it has; the
        // value is then whole (the Acquire upgrade, O3, O11).
        loop {
            if let Some(strong) = weak.upgrade() {
                return strong.len();
            }
            thread::yield_now();
        }
    });
    let strong = Strong::new_cyclic(|me| {
        sender.send(me.clone()).unwrap();
        String::from("built")
    });
    assert_eq!(reader.join().unwrap(), 5);
    drop(strong);
}

// ---- into_inner, unwrap_or_clone, try_unwrap ---------------------------------

#[test]
fn into_inner_gives_the_value_to_exactly_one_caller() {
    let rounds = if cfg!(miri) { 5 } else { 100 };
    for _ in 0..rounds {
        let x = Strong::new(3);
        let y = x.clone();
        let first = thread::spawn(move || Strong::into_inner(x));
        let second = thread::spawn(move || Strong::into_inner(y));
        let results = (first.join().unwrap(), second.join().unwrap());
        assert!(
            matches!(results, (None, Some(3)) | (Some(3), None)),
            "{results:?}"
        );
    }

    assert_eq!(Strong::into_inner(Strong::new(3)), Some(3));
    let x = Strong::new(4);
    let y = x.clone();
    assert_eq!(Strong::into_inner(x), None);
    assert_eq!(Strong::into_inner(y), Some(4));
    let x = Strong::new(5);
    let weak = Strong::downgrade(&x);
    assert_eq!(Strong::into_inner(x), Some(5));
    assert!(weak.upgrade().is_none());
}

#[test]
fn into_inner_does_not_drop_the_value_it_returns() {
    let drops = counter();
    let x = Strong::new(Counted(drops.clone()));
    let y = x.clone();
    assert!(Strong::into_inner(x).is_none());
    assert_eq!(count(&drops), 0);
    let value = Strong::into_inner(y).unwrap();
    assert_eq!(count(&drops), 0);
    drop(value);
    assert_eq!(count(&drops), 1);
}

#[test]
fn try_unwrap_and_unwrap_or_clone() {
    assert_eq!(Strong::try_unwrap(Strong::new(3)), Ok(3));
    let x = Strong::new(4);
    let _y = x.clone();
    assert_eq!(Strong::try_unwrap(x), Err(Strong::new(4)));
    let x = Strong::new(5);
    let _w = Strong::downgrade(&x);
    assert_eq!(Strong::try_unwrap(x), Ok(5));

    let drops = counter();
    let shared = Strong::new(Counted(drops.clone()));
    let other = shared.clone();
    let cloned = Strong::unwrap_or_clone(shared);
    assert_eq!(count(&drops), 0);
    let moved = Strong::unwrap_or_clone(other);
    assert_eq!(count(&drops), 0);
    drop((cloned, moved));
    assert_eq!(count(&drops), 2);
}

// ---- make_mut -------------------------------------------------------------

#[test]
fn make_mut_clones_only_when_shared() {
    let mut cow0 = Strong::new(75);
    let mut cow1 = cow0.clone();
    let mut cow2 = cow1.clone();
    assert_eq!(*Strong::make_mut(&mut cow0), 75);
    assert_eq!(*Strong::make_mut(&mut cow1), 75);
    assert_eq!(*Strong::make_mut(&mut cow2), 75);
    *Strong::make_mut(&mut cow0) += 1;
    *Strong::make_mut(&mut cow1) += 2;
    *Strong::make_mut(&mut cow2) += 3;
    assert_eq!((*cow0, *cow1, *cow2), (76, 77, 78));
    assert!(!Strong::ptr_eq(&cow0, &cow1) && !Strong::ptr_eq(&cow1, &cow2));

    let mut cow0 = Strong::new(75);
    let cow1 = cow0.clone();
    let cow2 = cow1.clone();
    *Strong::make_mut(&mut cow0) += 1;
    assert_eq!((*cow0, *cow1, *cow2), (76, 75, 75));
    assert!(Strong::ptr_eq(&cow1, &cow2));
}

#[test]
fn make_mut_mutates_in_place_when_unique() {
    let drops = counter();
    let mut only = Strong::new(vec![Counted(drops.clone())]);
    let before = Strong::as_ptr(&only);
    Strong::make_mut(&mut only).push(Counted(drops.clone()));
    assert_eq!(Strong::as_ptr(&only), before);
    assert_eq!(only.len(), 2);
    assert_eq!(count(&drops), 0);
    // A Weak made afterwards sees the mutation.
    assert_eq!(Strong::downgrade(&only).upgrade().unwrap().len(), 2);
}

#[test]
fn make_mut_moves_the_value_away_from_weaks_without_cloning() {
    let drops = counter();
    let mut cow = Strong::new(Counted(drops.clone()));
    let weak = Strong::downgrade(&cow);
    assert!(weak.upgrade().is_some());
    let before = Strong::as_ptr(&cow);
    let value = Strong::make_mut(&mut cow);
    // Moved, not cloned: the clone would share the counter, so count
    // the handles to it instead.
    assert_eq!(Arc::strong_count(&value.0), 2);
    assert_ne!(Strong::as_ptr(&cow), before);
    assert!(weak.upgrade().is_none());
    assert_eq!(weak.strong_count(), 0);
    assert_eq!(Strong::weak_count(&cow), 0);
    assert_eq!(count(&drops), 0);
    drop(cow);
    assert_eq!(count(&drops), 1);
    drop(weak);
}

// ---- drop checking ----------------------------------------------------------

/// std's `weak_may_dangle`, for `Strong`: dropping a `Strong<&'a str>`
/// needs `'a` alive (it may drop the `&str`), as for `Arc`. The `Weak`
/// half of std's test does not compile for `Weak` (the crate docs say why).
#[test]
fn a_strong_of_a_borrow_is_dropped_while_the_borrow_lives() {
    let text = String::from("borrowed");
    let strong: Strong<&str> = Strong::new(text.as_str());
    let weak = Strong::downgrade(&strong);
    assert_eq!(*weak.upgrade().unwrap(), "borrowed");
    drop(strong);
    drop(weak);
    drop(text);
}

/// `__private::unsize`'s closure can return an enclosing closure's block
/// (another object's: the `for<'a>` bound does not stop that); the address
/// check refuses it, and both handles are released on the way out.
#[test]
#[should_panic(expected = "the coercion must return the block it was given")]
fn a_block_returned_for_another_object_is_refused() {
    use std::marker::PhantomData;
    let _: Strong<dyn Debug> = weakrefs::__private::unsize(Strong::new(1), PhantomData, |outer| {
        let _: Strong<dyn Debug> =
            weakrefs::__private::unsize(Strong::new(2), PhantomData, |_inner| outer);
        outer
    });
}

/// Panics when dropped, after counting the drop.
struct PanicsOnDrop(Arc<AtomicUsize>);

impl Drop for PanicsOnDrop {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
        panic!("drop failure (expected by this test)");
    }
}

#[test]
fn the_last_weak_frees_a_block_however_its_value_went() {
    // A dead block's layout is kept where its value was (SAFETY.md, U2):
    // each way a value goes must leave it there before the last `Weak`
    // frees the block. Under Miri, every free's layout is checked against
    // its allocation's.
    fn freed_by_weak<T: ?Sized>(strong: Strong<T>, end: impl FnOnce(Strong<T>)) {
        let weak = Strong::downgrade(&strong);
        end(strong);
        assert!(weak.upgrade().is_none());
        drop(weak);
    }
    // Dropped, for values smaller than the layout word, of no size, and
    // unsized of no size.
    freed_by_weak(Strong::new(7u8), drop);
    freed_by_weak(Strong::new(()), drop);
    freed_by_weak(Strong::<str>::from(""), drop);
    freed_by_weak(Strong::<[u64]>::from(Vec::new()), drop);
    let zero_sized: Strong<dyn Any + Send + Sync> = unsize!(Strong::new(()));
    freed_by_weak(zero_sized, drop);
    // Moved out.
    freed_by_weak(Strong::new(String::from("moved")), |s| {
        assert_eq!(Strong::try_unwrap(s).unwrap(), "moved");
    });
    freed_by_weak(Strong::new(5u16), |s| {
        assert_eq!(Strong::into_inner(s), Some(5));
    });
    freed_by_weak(Strong::new(vec![1u8]), |mut s| {
        Strong::make_mut(&mut s).push(2);
        assert_eq!(*s, [1, 2]);
    });
    // Dropped by a `Drop` that panics, behind a `dyn`.
    let drops = counter();
    let panicky: Strong<dyn Any + Send + Sync> = unsize!(Strong::new(PanicsOnDrop(drops.clone())));
    freed_by_weak(panicky, |s| {
        assert!(catch_unwind(AssertUnwindSafe(|| drop(s))).is_err());
    });
    assert_eq!(count(&drops), 1);
}
