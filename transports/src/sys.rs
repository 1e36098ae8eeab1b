//! The crate's only `unsafe` code: taking ownership of a descriptor named
//! by number, and clearing close-on-exec in a child before `exec`.

use std::collections::BTreeMap;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::sync::Mutex;

use rustix::io::FdFlags;

/// Descriptor numbers taken from `fd://` addresses and still owned by a
/// link or listener of this process, with what each named when taken.
static ADOPTED: Mutex<BTreeMap<RawFd, Adopted>> = Mutex::new(BTreeMap::new());

/// What an adopted number named: the file (device and inode) and which
/// adoption it was (`generation`, unique in the process).
#[derive(Debug, Clone, Copy)]
struct Adopted {
    file: (u64, u64),
    generation: u64,
}

/// Marks a descriptor number as owned by this crate; unmarks it on drop.
/// Keep it in a field declared after the object owning the descriptor, so
/// the number is released only once the descriptor is closed.
#[derive(Debug)]
pub(crate) struct AdoptGuard {
    raw: RawFd,
    generation: u64,
}

impl Drop for AdoptGuard {
    fn drop(&mut self) {
        let mut set = ADOPTED.lock().unwrap_or_else(|p| p.into_inner());
        // The number may have been closed, reused and adopted anew before
        // this guard went: that newer adoption is not ours to end.
        if set
            .get(&self.raw)
            .is_some_and(|a| a.generation == self.generation)
        {
            set.remove(&self.raw);
        }
    }
}

/// Takes ownership of descriptor `raw`, named by an `fd://` address, and
/// sets close-on-exec on it.
///
/// An `fd://N` address is the caller's grant of descriptor `N` to the
/// transport (as an inherited descriptor is granted to a process). The
/// number must be open; it is refused while a link or listener of this
/// process already owns it, so the same address used twice is an error
/// rather than a double close. A number whose owner closed it just now,
/// and which the kernel gave to a different file since, is not refused for
/// the moment the owner's record outlives the close.
pub(crate) fn adopt(raw: RawFd) -> Result<(OwnedFd, AdoptGuard), String> {
    static GENERATION: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    if raw < 0 {
        return Err(format!("descriptor {raw} is negative"));
    }
    let mut set = ADOPTED.lock().unwrap_or_else(|p| p.into_inner());
    // SAFETY: `raw` is not -1 (checked above), and the borrow lives only for
    // the `fstat` and `fcntl` calls below, which the kernel answers with
    // EBADF if the number is not open; nothing is read or written through it.
    let borrowed = unsafe { BorrowedFd::borrow_raw(raw) };
    let stat =
        rustix::fs::fstat(borrowed).map_err(|e| format!("descriptor {raw} is not open ({e})"))?;
    let file = (stat.st_dev, stat.st_ino);
    if set.get(&raw).is_some_and(|a| a.file == file) {
        return Err(format!(
            "descriptor {raw} is already owned by a link or listener of this process"
        ));
    }
    let flags = rustix::io::fcntl_getfd(borrowed)
        .map_err(|e| format!("descriptor {raw} is not open ({e})"))?;
    rustix::io::fcntl_setfd(borrowed, flags | FdFlags::CLOEXEC)
        .map_err(|e| format!("cannot set close-on-exec on descriptor {raw}: {e}"))?;
    let generation = GENERATION.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    set.insert(raw, Adopted { file, generation });
    // SAFETY: the descriptor is open (fstat succeeded), the `fd://` address
    // grants its ownership to us, and `ADOPTED` guarantees no other object
    // of this crate owns the same open number. A record naming another
    // file is one whose descriptor was closed: while we own a number,
    // nothing else may point it at another file (I/O safety: `dup2` onto
    // a descriptor needs its ownership), so exactly one `OwnedFd` closes
    // it.
    let owned = unsafe { OwnedFd::from_raw_fd(raw) };
    Ok((owned, AdoptGuard { raw, generation }))
}

/// Arranges for `fd` to be inherited by the child `cmd` spawns, under the
/// same number, which is returned. The descriptor stays close-on-exec in
/// this process (so no other child inherits it); only in this child is the
/// flag cleared, after `fork` and before `exec`. `cmd` owns `fd` until it
/// is dropped.
pub(crate) fn inherit(cmd: &mut Command, fd: OwnedFd) -> RawFd {
    let raw = fd.as_raw_fd();
    let hook = move || -> io::Result<()> {
        rustix::io::fcntl_setfd(&fd, FdFlags::empty()).map_err(io::Error::from)
    };
    // SAFETY: the hook runs in the child between `fork` and `exec`, where only
    // async-signal-safe work is allowed. It makes one `fcntl` system call
    // through rustix (no allocation, no lock) on a descriptor the closure
    // owns, and builds an `io::Error` from an errno without allocating.
    unsafe {
        cmd.pre_exec(hook);
    }
    raw
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::IntoRawFd;

    fn socket() -> RawFd {
        let (a, b) = std::os::unix::net::UnixStream::pair().expect("socketpair");
        drop(b);
        OwnedFd::from(a).into_raw_fd()
    }

    #[test]
    fn a_number_closed_and_reused_before_its_record_goes_can_be_adopted() {
        // Other tests of this binary open descriptors too: retry until the
        // kernel hands the closed number out again (it gives the lowest free
        // one, so this takes one try unless another thread raced us).
        for _ in 0..100 {
            let (first, old_guard) = adopt(socket()).expect("adopt");
            let raw = first.as_raw_fd();
            // The owner closes the descriptor; its record is still there.
            drop(first);
            let again = socket();
            if again != raw {
                drop(old_guard);
                let _ = close_by_number(again);
                continue;
            }
            let (second, new_guard) = adopt(again).expect("a reused number is not refused");
            // The old record going does not end the new adoption.
            drop(old_guard);
            let refused = adopt(raw).expect_err("owned twice");
            assert!(refused.contains("already owned"), "{refused}");
            drop(second);
            drop(new_guard);
            return;
        }
        panic!("the kernel never reused a closed descriptor number");
    }

    /// Closes a descriptor this test opened and still owns by number.
    fn close_by_number(raw: RawFd) -> Result<(), String> {
        adopt(raw).map(drop)
    }
}
