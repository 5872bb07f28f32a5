//! The reply buffer a worker shares with its supervisor, which outlives a
//! crash.
//!
//! Writing one reply per task costs a system call and a wake-up of the
//! supervisor per task, which is most of the cost of a task that takes a
//! microsecond. Holding replies back to send several at once is only safe
//! if a crash cannot take them along: the supervisor would charge the crash
//! to a task that had succeeded, and run it again.
//!
//! So a worker appends each reply (an encoded done frame) to a memory file
//! that the supervisor created and keeps open, and only then starts the
//! next call. A 16-byte header holds the length of the complete frames
//! after it, stored after each frame is whole, and a generation number.
//! When the worker would wait for input, or enough has piled up, it sends
//! the buffer over the socket in one write, sets the length back to 0 and
//! bumps the generation.
//!
//! The supervisor reads the buffer from its own descriptor in two cases:
//! when the worker died (the replies there are settled as if they had
//! arrived, and the task after them is the one that was running), and when
//! the worker's current call runs long while replies may be held (so that a
//! slow task does not hide the results of the quick ones before it). A read
//! of a live buffer is kept only if the generation was the same before and
//! after it. Replies can thus arrive twice, from the buffer and over the
//! socket; each carries the sequence number of its task frame, and the
//! supervisor drops those it has settled already.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};

/// Bytes of frames the buffer holds, after its 8-byte header.
pub const CAPACITY: usize = 1 << 20;

/// The descriptor on which a worker finds its reply buffer.
pub const STAGING_FD: i32 = 5;

const HEADER: usize = 16;

/// Creates a zeroed buffer for one worker.
///
/// # Errors
///
/// When the memory file cannot be made.
pub fn create() -> io::Result<File> {
    // SAFETY: the name is a valid C string; the call has no other inputs.
    let fd = unsafe { libc::memfd_create(c"runner-replies".as_ptr(), libc::MFD_CLOEXEC) };
    if fd == -1 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: memfd_create returned a fresh descriptor that nothing else owns.
    let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    file.set_len((HEADER + CAPACITY) as u64)?;
    Ok(file)
}

/// The frames a worker holds in its buffer, or `None` when the worker was
/// emptying the buffer during the read (read again later).
///
/// The length is clamped to the capacity, so a worker that scribbled over
/// its header costs at most one capacity's worth of reading.
///
/// # Errors
///
/// When the memory file cannot be read.
pub fn peek(file: &File) -> io::Result<Option<Vec<u8>>> {
    let mut header = [0u8; HEADER];
    file.read_exact_at(&mut header, 0)?;
    let (len, generation) = split_header(header);
    let len = usize::try_from(len).unwrap_or(CAPACITY).min(CAPACITY);
    let mut frames = vec![0u8; len];
    file.read_exact_at(&mut frames, HEADER as u64)?;
    file.read_exact_at(&mut header, 0)?;
    let (_, after) = split_header(header);
    Ok((after == generation).then_some(frames))
}

fn split_header(header: [u8; HEADER]) -> (u64, u64) {
    let (len, generation) = header.split_at(8);
    (
        u64::from_le_bytes(len.try_into().expect("8 bytes")),
        u64::from_le_bytes(generation.try_into().expect("8 bytes")),
    )
}

/// The worker's side: the buffer mapped into its memory.
#[derive(Debug)]
pub struct ReplyBuffer {
    base: *mut u8,
    len: usize,
}

impl ReplyBuffer {
    /// Maps the buffer on [`STAGING_FD`].
    ///
    /// # Errors
    ///
    /// When the descriptor is missing or cannot be mapped.
    pub fn map() -> io::Result<Self> {
        // SAFETY: the supervisor put a memory file of HEADER + CAPACITY
        // bytes on STAGING_FD; mapping it shared and writable is what it is
        // for, and the mapping stays until the process exits.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                HEADER + CAPACITY,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                STAGING_FD,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: closing our descriptor leaves the mapping in place.
        unsafe { libc::close(STAGING_FD) };
        Ok(Self {
            base: base.cast(),
            len: 0,
        })
    }

    fn committed(&self) -> &AtomicU64 {
        // SAFETY: the mapping is page-aligned, so its first 8 bytes are an
        // aligned u64 that lives as long as `self`; only this thread writes
        // it while the worker lives.
        unsafe { &*self.base.cast::<AtomicU64>() }
    }

    fn generation(&self) -> &AtomicU64 {
        // SAFETY: bytes 8 to 16 of the page-aligned mapping, as above.
        unsafe { &*self.base.add(8).cast::<AtomicU64>() }
    }

    /// Whether `frame` fits after what is held.
    pub fn fits(&self, frame: &[u8]) -> bool {
        self.len + frame.len() <= CAPACITY
    }

    /// Appends a complete frame and publishes the new length.
    ///
    /// # Panics
    ///
    /// When the frame does not fit; check [`ReplyBuffer::fits`] first.
    pub fn push(&mut self, frame: &[u8]) {
        assert!(self.fits(frame), "reply frame checked to fit");
        // SAFETY: the destination lies within the mapping (checked above)
        // and does not overlap `frame`, which is the worker's own memory.
        unsafe {
            std::ptr::copy_nonoverlapping(
                frame.as_ptr(),
                self.base.add(HEADER + self.len),
                frame.len(),
            );
        }
        self.len += frame.len();
        self.committed().store(self.len as u64, Ordering::Release);
    }

    /// The frames held, to send.
    pub fn frames(&self) -> &[u8] {
        // SAFETY: the first `len` bytes after the header were written by
        // `push` and lie within the mapping.
        unsafe { std::slice::from_raw_parts(self.base.add(HEADER), self.len) }
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Forgets the frames held, once they were sent.
    ///
    /// CAUTION: the length goes to 0 before the generation moves on, so a
    /// reader that saw the old generation on both sides of its read cannot
    /// have read frames of the next one.
    pub fn clear(&mut self) {
        self.committed().store(0, Ordering::Release);
        self.generation().fetch_add(1, Ordering::Release);
        self.len = 0;
    }
}

/// How many bytes wait unread on a socket.
pub fn pending_input(fd: &impl AsRawFd) -> usize {
    let mut count: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int into `count`.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::FIONREAD, &mut count) };
    if rc == -1 { 0 } else { count.max(0) as usize }
}
