//! A short tour of what `weakrefs` does today: `Strong`/`Weak` handles shared
//! across threads, objects that live exactly as long as someone holds them,
//! and death callbacks run by the finalizer thread.
//!
//! `cargo run --release --example tour`

use std::collections::HashSet;
use std::thread;

use weakrefs::{finalize, flush, shutdown, stats, Strong, Weak, WeakMethod, WeakValueMap};

/// A big object a server would rather not build twice: here, a "decoded
/// image" of a few hundred kilobytes.
struct Image {
    name: String,
    pixels: Vec<u8>,
}

impl Drop for Image {
    fn drop(&mut self) {
        println!(
            "    [{}] dropped {} ({} KiB), by the last holder",
            thread::current().name().unwrap_or("?"),
            self.name,
            self.pixels.len() / 1024
        );
    }
}

fn decode(name: &str) -> Image {
    Image {
        name: name.to_string(),
        pixels: vec![name.len() as u8; 256 * 1024],
    }
}

fn main() {
    println!("1. A Weak names an object without keeping it alive");
    let logo = Strong::new(decode("logo.png"));
    let weak_logo: Weak<Image> = Strong::downgrade(&logo);
    println!(
        "    strong_count = {}, weak_count = {}, alive = {}",
        Strong::strong_count(&logo),
        Strong::weak_count(&logo),
        weak_logo.is_alive()
    );
    drop(logo);
    println!(
        "    after the last Strong: upgrade() = {:?}",
        weak_logo.upgrade().map(|i| i.name.clone())
    );
    match weak_logo.try_upgrade() {
        Ok(_) => unreachable!("the object is dead"),
        Err(e) => println!("    try_upgrade(): {e}"),
    }

    println!("\n2. Weak handles are stable keys: identity, even after death");
    let a = Strong::new(decode("a.png"));
    let b = Strong::new(decode("b.png"));
    let mut seen: HashSet<Weak<Image>> = HashSet::new();
    seen.insert(Strong::downgrade(&a));
    seen.insert(Strong::downgrade(&b));
    let weak_a = Strong::downgrade(&a);
    drop(a);
    println!(
        "    {} entries; the dead one is still found: {}",
        seen.len(),
        seen.contains(&weak_a)
    );
    drop(b);

    println!("\n3. Worker threads share a WeakValueMap cache: one build per image, gone with its last request");
    let cache: WeakValueMap<String, Image> = WeakValueMap::new();
    let requests = ["hero.png", "hero.png", "icon.png", "hero.png"];
    thread::scope(|scope| {
        for (i, name) in requests.into_iter().enumerate() {
            let cache = &cache;
            thread::Builder::new()
                .name(format!("worker-{i}"))
                .spawn_scoped(scope, move || {
                    // Single flight: racing workers decode each name once.
                    let image = cache.get_or_insert_with(name.to_string(), || decode(name));
                    println!(
                        "    [worker-{i}] serving {} ({} holders)",
                        image.name,
                        Strong::strong_count(&image)
                    );
                })
                .expect("spawn worker");
        }
    });
    flush(); // the entries' removal callbacks run on the finalizer thread
    println!(
        "    requests done: {} cache entries left (removed without any purge call)",
        cache.len()
    );
    assert!(cache.is_empty());

    println!("\n4. Death callbacks: run once, newest first, on the finalizer thread");
    let page = Strong::new(decode("page.png"));
    for step in ["close the file", "update the metrics"] {
        finalize(&page, move || {
            println!(
                "    [{}] callback: {step}",
                thread::current().name().unwrap_or("?")
            )
        });
    }
    let cancelled = finalize(&page, || unreachable!("detached"));
    cancelled.detach();
    let on_render = WeakMethod::new(&page, |img: &Image, scale: u32| {
        img.pixels.len() as u32 / scale
    });
    println!("    WeakMethod while alive: {:?}", on_render.call(1024));
    drop(page);
    flush();
    println!("    WeakMethod after death: {:?}", on_render.call(1024));

    let atexit_probe = Strong::new(decode("kept-until-exit.png"));
    finalize(&atexit_probe, || {
        println!(
            "    [{}] atexit callback at shutdown()",
            thread::current().name().unwrap_or("?")
        )
    });
    shutdown();
    let stats = stats();
    println!(
        "    stats: queued {}, run {}, panicked {}, pending {}",
        stats.queued, stats.run, stats.panicked, stats.pending
    );
    drop(atexit_probe);
}
