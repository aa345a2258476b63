//! The global allocator: the system's (glibc's malloc), with cache-line-aligned blocks reused.
//!
//! Tokio aligns each task (the cell holding a connection's future) and each socket's readiness
//! state (`ScheduledIo`) to 128 bytes, so every accepted connection costs two `posix_memalign`
//! calls and two frees. glibc (2.36, Debian 12) serves aligned requests outside its per-thread
//! cache, by carving an aligned chunk out of a larger one: ~1,570 instructions per connection
//! together, 9 % of a new-connection-per-request's user time (callgrind, `close`). Freed blocks
//! of those layouts are kept here instead, on one free list per size class (128-byte steps up
//! to 1 KiB), and handed out again, as HAProxy and nginx keep their own pools of
//! fixed-size objects.
//!
//! Never blocking, never allocating: each list sits behind a try-lock; a thread that finds it
//! taken (another worker is on it) just uses the system allocator for that call. A list keeps
//! at most [`KEEP_MAX`] blocks (48 KiB for the largest class), so freed connections' memory still
//! goes back to glibc, and on to the system ([`crate::memtrim`]). Every other layout goes
//! straight to the system allocator.

#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::ptr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// The alignment served from the lists (tokio's `CachePadded` on x86_64 and aarch64).
const ALIGN: usize = 128;
/// Size classes: 128, 256, ... 1,024 bytes.
const CLASSES: usize = 8;
/// Blocks kept per class.
pub const KEEP_MAX: usize = 48;

/// One free list: blocks linked through their first word.
#[repr(align(128))]
struct List {
    locked: AtomicBool,
    /// Guarded by `locked`: the first free block, or null.
    head: AtomicUsize,
    /// Guarded by `locked`: blocks on the list.
    len: AtomicUsize,
}

impl List {
    const fn new() -> List {
        List {
            locked: AtomicBool::new(false),
            head: AtomicUsize::new(0),
            len: AtomicUsize::new(0),
        }
    }

    fn try_lock(&self) -> bool {
        self.locked
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_ok()
    }

    fn unlock(&self) {
        self.locked.store(false, Ordering::Release);
    }
}

/// The layout of every block of `class` (< [`CLASSES`]): (class + 1) × 128 bytes, 128-aligned.
fn block_layout(class: usize) -> Layout {
    Layout::from_size_align((class + 1) * ALIGN, ALIGN)
        .expect("a class's size is a multiple of 128")
}

/// Free lists of 128-aligned blocks by size class; usable on its own (tests) and as the
/// process's [`Allocator`].
pub struct AlignedLists {
    lists: [List; CLASSES],
}

impl Drop for AlignedLists {
    fn drop(&mut self) {
        for (class, list) in self.lists.iter().enumerate() {
            let block = block_layout(class);
            let mut p = list.head.swap(0, Ordering::Relaxed) as *mut u8;
            while !p.is_null() {
                // SAFETY: every block on the list is free, of this class, and owned by the list.
                unsafe {
                    let next = ptr::read(p as *const usize) as *mut u8;
                    System.dealloc(p, block);
                    p = next;
                }
            }
            list.len.store(0, Ordering::Relaxed);
        }
    }
}

impl Default for AlignedLists {
    fn default() -> Self {
        Self::new()
    }
}

impl AlignedLists {
    pub const fn new() -> AlignedLists {
        AlignedLists {
            lists: [const { List::new() }; CLASSES],
        }
    }

    /// The class of `layout` and the layout its blocks have, if it is one this serves.
    fn class(layout: Layout) -> Option<(usize, Layout)> {
        if layout.align() != ALIGN || layout.size() == 0 || layout.size() > ALIGN * CLASSES {
            return None;
        }
        let class = (layout.size() - 1) / ALIGN;
        Some((class, block_layout(class)))
    }

    /// A block for `layout` from its list, else from the system.
    ///
    /// # Safety
    /// As [`GlobalAlloc::alloc`]: `layout` has a non-zero size.
    pub unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let Some((class, block)) = Self::class(layout) else {
            return System.alloc(layout);
        };
        let list = &self.lists[class];
        if list.try_lock() {
            let head = list.head.load(Ordering::Relaxed) as *mut u8;
            if !head.is_null() {
                // SAFETY: `head` is a free block of this class (at least 128 bytes, aligned),
                // owned by the list; its first word holds the next free block.
                let next = ptr::read(head as *const usize);
                list.head.store(next, Ordering::Relaxed);
                list.len.fetch_sub(1, Ordering::Relaxed);
                list.unlock();
                return head;
            }
            list.unlock();
        }
        System.alloc(block)
    }

    /// Give back a block of `layout` (from [`Self::alloc`]): onto its list, else to the system.
    ///
    /// # Safety
    /// As [`GlobalAlloc::dealloc`]: `ptr` came from `self.alloc(layout)` and is not used again.
    pub unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        let Some((class, block)) = Self::class(layout) else {
            return System.dealloc(ptr, layout);
        };
        let list = &self.lists[class];
        if list.try_lock() {
            if list.len.load(Ordering::Relaxed) < KEEP_MAX {
                // SAFETY: `ptr` is a block of this class that nobody uses any more; its first
                // word now links it into the list.
                ptr::write(ptr as *mut usize, list.head.load(Ordering::Relaxed));
                list.head.store(ptr as usize, Ordering::Relaxed);
                list.len.fetch_add(1, Ordering::Relaxed);
                list.unlock();
                return;
            }
            list.unlock();
        }
        System.dealloc(ptr, block)
    }

    /// Blocks kept on the list of `layout`'s class (tests).
    pub fn kept(&self, layout: Layout) -> usize {
        Self::class(layout).map_or(0, |(c, _)| self.lists[c].len.load(Ordering::Relaxed))
    }
}

/// The process's global allocator (see the module docs).
pub struct Allocator(AlignedLists);

impl Allocator {
    pub const fn new() -> Allocator {
        Allocator(AlignedLists::new())
    }

    /// The lists' side, out of line: every `Box` and `Vec` drop inlines [`GlobalAlloc`]'s
    /// methods, and with the lists inlined too the fast path's code grew (callgrind `http`:
    /// 11,451 instructions per request inlined, 11,399 out of line; `l4` and `close` the same).
    #[cold]
    #[inline(never)]
    unsafe fn alloc_aligned(&self, layout: Layout) -> *mut u8 {
        self.0.alloc(layout)
    }

    #[cold]
    #[inline(never)]
    unsafe fn dealloc_aligned(&self, ptr: *mut u8, layout: Layout) {
        self.0.dealloc(ptr, layout)
    }
}

impl Default for Allocator {
    fn default() -> Self {
        Self::new()
    }
}

// SAFETY: blocks come from `System` with the layout asked for, or with a larger size and the
// same alignment (a class's block), and go back to `System` with the layout they were made with.
unsafe impl GlobalAlloc for Allocator {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.align() != ALIGN {
            return System.alloc(layout);
        }
        self.alloc_aligned(layout)
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if layout.align() != ALIGN {
            return System.alloc_zeroed(layout);
        }
        let p = self.alloc_aligned(layout);
        if !p.is_null() {
            ptr::write_bytes(p, 0, layout.size());
        }
        p
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if layout.align() != ALIGN {
            return System.dealloc(ptr, layout);
        }
        self.dealloc_aligned(ptr, layout)
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if layout.align() != ALIGN {
            return System.realloc(ptr, layout, new_size);
        }
        // Rare (tokio never grows a task): a new block, a copy, the old one given back.
        let Ok(new_layout) = Layout::from_size_align(new_size, ALIGN) else {
            return ptr::null_mut();
        };
        let new = self.alloc(new_layout);
        if !new.is_null() {
            ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
            self.dealloc(ptr, layout);
        }
        new
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(size: usize, align: usize) -> Layout {
        Layout::from_size_align(size, align).unwrap()
    }

    #[test]
    fn freed_blocks_are_reused_by_class_and_stay_aligned() {
        let lists = AlignedLists::new();
        let a = layout(384, 128);
        unsafe {
            let p = lists.alloc(a);
            assert_eq!(p as usize % 128, 0);
            p.write_bytes(0xab, 384);
            lists.dealloc(p, a);
            assert_eq!(lists.kept(a), 1);
            // Any size of the same class (257..=384) gets the same block back.
            let b = layout(300, 128);
            let q = lists.alloc(b);
            assert_eq!(q, p);
            assert_eq!(lists.kept(a), 0);
            // A different class does not.
            let c = layout(128, 128);
            let r = lists.alloc(c);
            assert_ne!(r, p);
            assert_eq!(r as usize % 128, 0);
            lists.dealloc(q, b);
            lists.dealloc(r, c);
            assert_eq!((lists.kept(a), lists.kept(c)), (1, 1));
        }
    }

    #[test]
    fn lists_are_bounded_and_other_layouts_pass_through() {
        let lists = AlignedLists::new();
        let a = layout(1024, 128);
        unsafe {
            let blocks: Vec<_> = (0..KEEP_MAX + 5).map(|_| lists.alloc(a)).collect();
            for &p in &blocks {
                assert_eq!(p as usize % 128, 0);
            }
            for p in blocks {
                lists.dealloc(p, a);
            }
            assert_eq!(lists.kept(a), KEEP_MAX);
            // Not served here: other alignments, and sizes past the largest class.
            for l in [
                layout(256, 16),
                layout(256, 64),
                layout(1025, 128),
                layout(4096, 4096),
            ] {
                let p = lists.alloc(l);
                assert_eq!(p as usize % l.align(), 0);
                lists.dealloc(p, l);
                assert_eq!(lists.kept(l), 0);
            }
        }
    }

    /// The process allocator under threads that allocate on one and free on another, with
    /// the lists contended (the try-lock falls back to the system allocator).
    #[test]
    fn the_global_allocator_survives_cross_thread_frees() {
        #[repr(align(128))]
        struct Cell([u8; 300]);
        let (tx, rx) = std::sync::mpsc::channel::<Vec<Box<Cell>>>();
        let producer = std::thread::spawn(move || {
            for i in 0..200u32 {
                let v: Vec<Box<Cell>> = (0..50).map(|_| Box::new(Cell([i as u8; 300]))).collect();
                tx.send(v).unwrap();
            }
        });
        let mut seen = 0;
        for v in rx {
            for b in &v {
                assert_eq!(&**b as *const Cell as usize % 128, 0);
                assert!(b.0.iter().all(|&x| x == b.0[0]));
            }
            seen += v.len();
        }
        producer.join().unwrap();
        assert_eq!(seen, 200 * 50);
    }
}
