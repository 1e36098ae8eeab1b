//! The crate's only `unsafe` code: taking ownership of a descriptor named
//! by number, and clearing close-on-exec in a child before `exec`.

use std::collections::BTreeSet;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::sync::Mutex;

use rustix::io::FdFlags;

/// Descriptor numbers taken from `fd://` addresses and still owned by a
/// link or listener of this process.
static ADOPTED: Mutex<BTreeSet<RawFd>> = Mutex::new(BTreeSet::new());

/// Marks a descriptor number as owned by this crate; unmarks it on drop.
/// Keep it in a field declared after the object owning the descriptor, so
/// the number is released only once the descriptor is closed.
#[derive(Debug)]
pub(crate) struct AdoptGuard {
    raw: RawFd,
}

impl Drop for AdoptGuard {
    fn drop(&mut self) {
        let mut set = ADOPTED.lock().unwrap_or_else(|p| p.into_inner());
        set.remove(&self.raw);
    }
}

/// Takes ownership of descriptor `raw`, named by an `fd://` address, and
/// sets close-on-exec on it.
///
/// An `fd://N` address is the caller's grant of descriptor `N` to the
/// transport (as an inherited descriptor is granted to a process). The
/// number must be open; it is refused while a link or listener of this
/// process already owns it, so the same address used twice is an error
/// rather than a double close.
pub(crate) fn adopt(raw: RawFd) -> Result<(OwnedFd, AdoptGuard), String> {
    if raw < 0 {
        return Err(format!("descriptor {raw} is negative"));
    }
    let mut set = ADOPTED.lock().unwrap_or_else(|p| p.into_inner());
    if set.contains(&raw) {
        return Err(format!(
            "descriptor {raw} is already owned by a link or listener of this process"
        ));
    }
    // SAFETY: `raw` is not -1 (checked above), and the borrow lives only for
    // the one `fcntl` call below, which the kernel answers with EBADF if the
    // number is not open; nothing is read or written through it.
    let borrowed = unsafe { BorrowedFd::borrow_raw(raw) };
    let flags = rustix::io::fcntl_getfd(borrowed)
        .map_err(|e| format!("descriptor {raw} is not open ({e})"))?;
    rustix::io::fcntl_setfd(borrowed, flags | FdFlags::CLOEXEC)
        .map_err(|e| format!("cannot set close-on-exec on descriptor {raw}: {e}"))?;
    set.insert(raw);
    // SAFETY: the descriptor is open (fcntl succeeded), the `fd://` address
    // grants its ownership to us, and `ADOPTED` guarantees no other object
    // of this crate owns the same number, so exactly one `OwnedFd` closes it.
    let owned = unsafe { OwnedFd::from_raw_fd(raw) };
    Ok((owned, AdoptGuard { raw }))
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
