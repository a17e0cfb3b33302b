//! Batched map writes through the raw `bpf(2)` syscall:
//! `BPF_MAP_UPDATE_BATCH` and `BPF_MAP_DELETE_BATCH` (Linux 5.6+; aya 0.14
//! has no wrapper). One syscall writes up to [`CHUNK`] elements instead of
//! one each: at 10k Services × 10 endpoints the first pass is ~320,000
//! writes, and the syscall's entry and fd lookup were most of their cost.
//!
//! The kernel writes the elements in order and stops at the first that
//! fails, reporting how many it wrote in `count`; [`run`] keeps the
//! single-write promise on top of that (a failure leaves every earlier
//! element written, none later tried), skips deletes of absent keys, and
//! falls back to single writes when the kernel or map type has no batch
//! operation (EINVAL, ENOTSUP, ENOTSUPP before any element is written).

use std::ops::Range;
use std::os::fd::RawFd;

/// `BPF_MAP_UPDATE_BATCH` (include/uapi/linux/bpf.h, `enum bpf_cmd`).
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
/// `BPF_MAP_DELETE_BATCH`.
const BPF_MAP_DELETE_BATCH: libc::c_long = 27;
/// The kernel-internal ENOTSUPP, which leaks to user space from some
/// `bpf(2)` paths (a map type without the batch operation).
const ENOTSUPP: i32 = 524;

/// Elements per syscall: bounds the kernel's time in one call (it
/// reschedules between elements anyway) and nothing else.
pub const CHUNK: usize = 16_384;

/// The `batch` member of `union bpf_attr`. The kernel zero-fills the rest
/// of the union when given a shorter `size`.
#[repr(C)]
#[derive(Debug, Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

const _: () = assert!(std::mem::size_of::<BatchAttr>() == 56);

/// One batch syscall over `keys[range]` (and `values[range]` for an
/// update; None: a delete) on map `fd`: how many elements the kernel
/// wrote, and the errno it stopped with (None: all of them).
pub fn syscall<K, V>(
    fd: RawFd,
    keys: &[K],
    values: Option<&[V]>,
    range: Range<usize>,
) -> (usize, Option<i32>) {
    let (Some(ks), Ok(fd)) = (keys.get(range.clone()), u32::try_from(fd)) else {
        return (0, Some(libc::EINVAL));
    };
    let vs = match values {
        Some(v) => match v.get(range.clone()) {
            Some(vs) if vs.len() == ks.len() => Some(vs),
            _ => return (0, Some(libc::EINVAL)),
        },
        None => None,
    };
    let Ok(count) = u32::try_from(ks.len()) else {
        return (0, Some(libc::E2BIG));
    };
    let mut attr = BatchAttr {
        keys: ks.as_ptr() as u64,
        values: vs.map_or(0, |v| v.as_ptr() as u64),
        count,
        map_fd: fd,
        ..Default::default()
    };
    let cmd = if vs.is_some() {
        BPF_MAP_UPDATE_BATCH
    } else {
        BPF_MAP_DELETE_BATCH
    };
    // SAFETY: `attr` is a valid `bpf_attr.batch` of the size passed; the
    // key and value pointers cover `count` elements of the map's key and
    // value size (the caller's K and V are the map's layout types, checked
    // against the map when it was opened), which the kernel only reads; it
    // writes back `attr.count` only.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            &mut attr as *mut BatchAttr,
            std::mem::size_of::<BatchAttr>() as libc::c_uint,
        )
    };
    let done = usize::try_from(attr.count).unwrap_or(0).min(ks.len());
    if r < 0 {
        let errno = std::io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO);
        (done, Some(errno))
    } else {
        (ks.len(), None)
    }
}

/// Writes all of `keys[range]` (and `values`) in [`CHUNK`]s; false at the
/// first element that fails (how many were written is not reported: the
/// caller writes the whole range again).
pub fn syscall_all<K, V>(fd: RawFd, keys: &[K], values: Option<&[V]>, range: Range<usize>) -> bool {
    let mut i = range.start;
    while i < range.end {
        let end = range.end.min(i.saturating_add(CHUNK));
        match syscall(fd, keys, values, i..end) {
            (done, None) if done > 0 => i += done,
            _ => return false,
        }
    }
    true
}

/// Whether `errno`, before any element was written, means the kernel or
/// map type has no batch operation.
fn unsupported(errno: i32) -> bool {
    matches!(errno, libc::EINVAL | libc::ENOTSUP | libc::ENOSYS) || errno == ENOTSUPP
}

/// Writes elements `0..n` of one kind: through `batch` (a [`syscall`] over
/// a range) while `*batches` is true, else through `single` (one element,
/// its errno on failure). A delete (`delete`) of an absent key (ENOENT) is
/// not an error. On failure: (elements written before it, its errno); none
/// after it was tried. A batch the kernel does not support clears
/// `*batches` and the rest goes one by one.
pub fn run(
    n: usize,
    delete: bool,
    batches: &mut bool,
    mut batch: impl FnMut(Range<usize>) -> (usize, Option<i32>),
    mut single: impl FnMut(usize) -> Result<(), i32>,
) -> Result<(), (usize, i32)> {
    let mut i = 0;
    while i < n {
        if !*batches {
            single(i).map_err(|e| (i, e))?;
            i += 1;
            continue;
        }
        let end = n.min(i.saturating_add(CHUNK));
        match batch(i..end) {
            (done, None) if done > 0 => i += done,
            // Nothing written and no error: do not trust this path.
            (_, None) => *batches = false,
            (0, Some(e)) if unsupported(e) => *batches = false,
            (done, Some(libc::ENOENT)) if delete => i += done + 1,
            (done, Some(e)) => return Err((i + done, e)),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A kernel stand-in: element i fails with `fail[i]` (if any); a batch
    /// stops there. Records the ranges it was given.
    struct Fake {
        fail: std::collections::BTreeMap<usize, i32>,
        written: Vec<usize>,
        calls: Vec<Range<usize>>,
        no_batch: bool,
    }

    impl Fake {
        fn new(fail: &[(usize, i32)]) -> Self {
            Fake {
                fail: fail.iter().copied().collect(),
                written: Vec::new(),
                calls: Vec::new(),
                no_batch: false,
            }
        }
        fn batch(&mut self, r: Range<usize>) -> (usize, Option<i32>) {
            self.calls.push(r.clone());
            if self.no_batch {
                return (0, Some(libc::EINVAL));
            }
            for i in r.clone() {
                if let Some(e) = self.fail.get(&i) {
                    return (i - r.start, Some(*e));
                }
                self.written.push(i);
            }
            (r.len(), None)
        }
        fn single(&mut self, i: usize) -> Result<(), i32> {
            if let Some(e) = self.fail.get(&i) {
                return Err(*e);
            }
            self.written.push(i);
            Ok(())
        }
    }

    fn go(f: &mut Fake, n: usize, delete: bool) -> (Result<(), (usize, i32)>, bool) {
        let mut batches = true;
        let f = std::cell::RefCell::new(f);
        let r = run(
            n,
            delete,
            &mut batches,
            |r| f.borrow_mut().batch(r),
            |i| f.borrow_mut().single(i),
        );
        (r, batches)
    }

    #[test]
    fn a_run_goes_in_chunks_and_writes_everything_in_order() {
        let mut f = Fake::new(&[]);
        let n = CHUNK * 2 + 5;
        assert_eq!(go(&mut f, n, false), (Ok(()), true));
        assert_eq!(f.calls, [0..CHUNK, CHUNK..2 * CHUNK, 2 * CHUNK..n]);
        assert_eq!(f.written, (0..n).collect::<Vec<_>>());
    }

    #[test]
    fn a_failure_leaves_every_earlier_element_written_and_none_later_tried() {
        let mut f = Fake::new(&[(7, libc::E2BIG)]);
        assert_eq!(go(&mut f, 20, false), (Err((7, libc::E2BIG)), true));
        assert_eq!(f.written, (0..7).collect::<Vec<_>>());
        // An update of an absent key is not skipped (only deletes are).
        let mut f = Fake::new(&[(3, libc::ENOENT)]);
        assert_eq!(go(&mut f, 5, false).0, Err((3, libc::ENOENT)));
    }

    #[test]
    fn deleting_absent_keys_goes_on_after_them() {
        let mut f = Fake::new(&[(2, libc::ENOENT), (3, libc::ENOENT)]);
        assert_eq!(go(&mut f, 6, true), (Ok(()), true));
        assert_eq!(f.written, [0, 1, 4, 5]);
        assert_eq!(f.calls, [0..6, 3..6, 4..6]);
    }

    #[test]
    fn without_batch_support_it_falls_back_to_single_writes() {
        let mut f = Fake::new(&[(4, libc::EPERM)]);
        f.no_batch = true;
        assert_eq!(go(&mut f, 6, false), (Err((4, libc::EPERM)), false));
        assert_eq!(f.written, [0, 1, 2, 3]);
        assert_eq!(
            (f.calls.len(), &f.calls[0]),
            (1, &(0..6)),
            "one try, then single writes"
        );
        // EINVAL after some elements were written is that element's error.
        let mut f = Fake::new(&[(2, libc::EINVAL)]);
        assert_eq!(go(&mut f, 6, false), (Err((2, libc::EINVAL)), true));
    }
}
