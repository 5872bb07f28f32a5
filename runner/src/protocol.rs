//! Frames between the supervisor and a worker, used by both sides.
//!
//! Every frame is a little-endian `u32` body length followed by the body. The
//! body's first byte is the message kind. Lengths above [`MAX_FRAME`] are
//! refused before anything is allocated for them, and a body that does not
//! decode means the sending side is broken.
//!
//! | kind | direction          | body after the kind byte                                  |
//! |------|--------------------|-----------------------------------------------------------|
//! | 1    | worker → supervisor | hello: protocol, ABI version, pid, name, version, description |
//! | 2    | worker → supervisor | load failed: a UTF-8 message                             |
//! | 3    | supervisor → worker | task: `u64` frame number, `u64` task index, params' JSON  |
//! | 4    | worker → supervisor | done: `u64` id, `u32` status, `u64` nanoseconds, payload  |
//! | 5    | supervisor → worker | revoke: `u64` frame number; drop unstarted tasks from it on |
//! | 6    | worker → supervisor | revoked: `u64` how many unstarted tasks were dropped      |
//!
//! Strings in a hello are a `u32` length followed by UTF-8 bytes. The
//! supervisor ends a worker by shutting its side of the socket: a worker that
//! reads end-of-file between frames exits with status 0.

use std::io::{self, BufReader, Read};

/// The protocol version both sides must agree on. Sent in the hello.
pub const PROTOCOL_VERSION: u32 = 1;

/// The largest frame body either side accepts: 1 GiB.
pub const MAX_FRAME: u32 = 1 << 30;

/// The descriptor on which a worker finds its socket to the supervisor.
pub const WORKER_FD: i32 = 3;

/// The descriptor on which a worker finds the plugin library to load.
pub const LIBRARY_FD: i32 = 4;

const KIND_HELLO: u8 = 1;
const KIND_LOAD_FAILED: u8 = 2;
const KIND_TASK: u8 = 3;
const KIND_DONE: u8 = 4;
const KIND_REVOKE: u8 = 5;
const KIND_REVOKED: u8 = 6;

/// What a worker says once its plugin is loaded and set up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// The worker's [`PROTOCOL_VERSION`].
    pub protocol: u32,
    /// The plugin ABI version the worker checked the plugin against.
    pub abi_version: u32,
    /// The worker's process id.
    pub pid: u32,
    /// The plugin's crate name.
    pub name: String,
    /// The plugin's crate version.
    pub version: String,
    /// The plugin's description.
    pub description: String,
}

/// A finished call, from worker to supervisor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Done {
    /// The id of the task frame this answers.
    pub id: u64,
    /// A `plugin_api::CallStatus` as a number.
    pub status: u32,
    /// How long the plugin call took, in nanoseconds.
    pub nanos: u64,
    /// The output JSON or the error message.
    pub payload: Vec<u8>,
}

/// A message from a worker to the supervisor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WorkerMessage {
    /// The plugin is loaded and ready for tasks.
    Hello(Hello),
    /// The plugin could not be loaded; the worker exits after sending this.
    LoadFailed(String),
    /// A task ended.
    Done(Done),
    /// Answers a revoke: the last `0` tasks sent were dropped unstarted.
    Revoked(u64),
}

/// A message from the supervisor to a worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SupervisorMessage<'a> {
    /// Run this task.
    Task(TaskFrame<'a>),
    /// Do not start the tasks numbered from this one on; say how many were
    /// dropped.
    Revoke(u64),
}

/// A task, from supervisor to worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskFrame<'a> {
    /// The frame's number on this worker's socket, echoed back in the
    /// [`Done`] frame.
    pub id: u64,
    /// The task's index in the run, for tagging its output.
    pub index: u64,
    /// The params as JSON.
    pub params: &'a [u8],
}

/// Why a frame was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    /// The header claims more than [`MAX_FRAME`] bytes.
    #[error("frame of {0} bytes exceeds the limit of {MAX_FRAME} bytes")]
    TooLarge(u32),
    /// The body is empty, too short for its kind, or has bytes left over.
    #[error("malformed frame of kind {kind}: {reason}")]
    Malformed {
        /// The kind byte, or 0 for an empty body.
        kind: u8,
        /// What was wrong.
        reason: &'static str,
    },
    /// The kind byte is not one this side expects.
    #[error("unexpected frame kind {0}")]
    UnknownKind(u8),
    /// A string field is not UTF-8.
    #[error("frame string is not UTF-8")]
    NotUtf8,
}

/// Reads frame bodies from a byte source.
#[derive(Debug)]
pub struct FrameReader<R> {
    inner: R,
}

impl<R: Read> FrameReader<R> {
    /// Wraps a reader, which should be buffered.
    pub fn new(inner: R) -> Self {
        Self { inner }
    }

    /// Reads the next body into `body`, replacing its contents.
    ///
    /// Returns `Ok(false)` at a clean end of file between frames.
    ///
    /// # Errors
    ///
    /// An I/O error, a length above [`MAX_FRAME`] (as `InvalidData`, without
    /// allocating it), or end of file inside a frame.
    pub fn read_body(&mut self, body: &mut Vec<u8>) -> io::Result<bool> {
        let mut header = [0u8; 4];
        let mut filled = 0;
        while filled < header.len() {
            match self.inner.read(&mut header[filled..]) {
                Ok(0) if filled == 0 => return Ok(false),
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        let len = check_len(header).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;

        body.clear();
        // Grow as bytes arrive rather than trusting the header with one big
        // allocation: a peer that lies about the length costs only what it
        // actually sends.
        let got = (&mut self.inner).take(len as u64).read_to_end(body)?;
        if got != len as usize {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        Ok(true)
    }
}

/// Cuts frames out of bytes that arrive in arbitrary pieces.
///
/// Reading into it (see [`FrameAssembler::buffer`]) and taking frames out
/// are separate steps, so a read can be cancelled between two pieces without
/// losing a byte: the supervisor races reads against the worker's exit.
#[derive(Debug, Default)]
pub struct FrameAssembler {
    buf: Vec<u8>,
    start: usize,
}

impl FrameAssembler {
    /// An empty assembler.
    pub fn new() -> Self {
        Self::default()
    }

    /// The buffer to read more bytes into (append only).
    ///
    /// Bytes of frames already taken are dropped first, so the buffer holds
    /// at most one partial frame plus what the last read brought.
    pub fn buffer(&mut self) -> &mut Vec<u8> {
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        &mut self.buf
    }

    /// Takes the next complete frame body, if one has arrived.
    ///
    /// # Errors
    ///
    /// [`FrameError::TooLarge`] as soon as a header claims more than
    /// [`MAX_FRAME`]: nothing is allocated for it.
    pub fn next_frame(&mut self) -> Result<Option<&[u8]>, FrameError> {
        let pending = &self.buf[self.start..];
        let Some(header) = pending.first_chunk::<4>() else {
            return Ok(None);
        };
        let len = check_len(*header)? as usize;
        if pending.len() < 4 + len {
            return Ok(None);
        }
        let body = self.start + 4..self.start + 4 + len;
        self.start = body.end;
        Ok(Some(&self.buf[body]))
    }

    /// Whether bytes of an unfinished frame are waiting.
    pub fn has_partial(&self) -> bool {
        self.start < self.buf.len()
    }

    /// How much room the next read should have: what the unfinished frame
    /// still needs, but at least `min` and at most `max`, so that a large
    /// frame arrives in few reads while a header's claim alone never buys
    /// more than `max`.
    pub fn wanted(&self, min: usize, max: usize) -> usize {
        let pending = &self.buf[self.start..];
        let needed = match pending.first_chunk::<4>() {
            Some(header) => {
                (u32::from_le_bytes(*header) as usize + 4).saturating_sub(pending.len())
            }
            None => 0,
        };
        needed.clamp(min, max)
    }
}

impl<R: Read> FrameReader<BufReader<R>> {
    /// How many bytes are buffered and can be read without blocking.
    pub fn buffered(&self) -> usize {
        self.inner.buffer().len()
    }
}

/// Checks a frame header and returns the body length.
///
/// # Errors
///
/// [`FrameError::TooLarge`] past [`MAX_FRAME`].
pub fn check_len(header: [u8; 4]) -> Result<u32, FrameError> {
    let len = u32::from_le_bytes(header);
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge(len));
    }
    Ok(len)
}

fn begin(out: &mut Vec<u8>, kind: u8) -> usize {
    let start = out.len();
    out.extend_from_slice(&[0, 0, 0, 0, kind]);
    start
}

fn finish(out: &mut [u8], start: usize) {
    let len = u32::try_from(out.len() - start - 4).expect("frames are built below MAX_FRAME");
    out[start..start + 4].copy_from_slice(&len.to_le_bytes());
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    let len = u32::try_from(s.len()).expect("hello strings are short");
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// Appends a task frame to `out`.
pub fn encode_task(out: &mut Vec<u8>, task: &TaskFrame<'_>) {
    let start = begin(out, KIND_TASK);
    out.extend_from_slice(&task.id.to_le_bytes());
    out.extend_from_slice(&task.index.to_le_bytes());
    out.extend_from_slice(task.params);
    finish(out, start);
}

/// Appends a worker message frame to `out`.
pub fn encode_worker_message(out: &mut Vec<u8>, message: &WorkerMessage) {
    match message {
        WorkerMessage::Hello(hello) => {
            let start = begin(out, KIND_HELLO);
            out.extend_from_slice(&hello.protocol.to_le_bytes());
            out.extend_from_slice(&hello.abi_version.to_le_bytes());
            out.extend_from_slice(&hello.pid.to_le_bytes());
            put_str(out, &hello.name);
            put_str(out, &hello.version);
            put_str(out, &hello.description);
            finish(out, start);
        }
        WorkerMessage::LoadFailed(message) => {
            let start = begin(out, KIND_LOAD_FAILED);
            out.extend_from_slice(message.as_bytes());
            finish(out, start);
        }
        WorkerMessage::Done(done) => {
            encode_done(out, done.id, done.status, done.nanos, &done.payload)
        }
        WorkerMessage::Revoked(dropped) => {
            let start = begin(out, KIND_REVOKED);
            out.extend_from_slice(&dropped.to_le_bytes());
            finish(out, start);
        }
    }
}

/// Appends a done frame to `out` without building a [`Done`].
pub fn encode_done(out: &mut Vec<u8>, id: u64, status: u32, nanos: u64, payload: &[u8]) {
    let start = begin(out, KIND_DONE);
    out.extend_from_slice(&id.to_le_bytes());
    out.extend_from_slice(&status.to_le_bytes());
    out.extend_from_slice(&nanos.to_le_bytes());
    out.extend_from_slice(payload);
    finish(out, start);
}

/// A cursor over a frame body.
struct Cursor<'a> {
    rest: &'a [u8],
    kind: u8,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], FrameError> {
        if self.rest.len() < n {
            return Err(FrameError::Malformed {
                kind: self.kind,
                reason: "body too short",
            });
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Ok(head)
    }

    fn u32(&mut self) -> Result<u32, FrameError> {
        let bytes = self.take(4)?;
        Ok(u32::from_le_bytes(bytes.try_into().expect("took 4 bytes")))
    }

    fn u64(&mut self) -> Result<u64, FrameError> {
        let bytes = self.take(8)?;
        Ok(u64::from_le_bytes(bytes.try_into().expect("took 8 bytes")))
    }

    fn string(&mut self) -> Result<String, FrameError> {
        let len = self.u32()? as usize;
        let bytes = self.take(len)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| FrameError::NotUtf8)
    }

    fn end(&self) -> Result<(), FrameError> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            Err(FrameError::Malformed {
                kind: self.kind,
                reason: "bytes left over",
            })
        }
    }
}

fn split_kind(body: &[u8]) -> Result<Cursor<'_>, FrameError> {
    let Some((&kind, rest)) = body.split_first() else {
        return Err(FrameError::Malformed {
            kind: 0,
            reason: "empty body",
        });
    };
    Ok(Cursor { rest, kind })
}

/// Decodes a body sent by a worker.
///
/// # Errors
///
/// A [`FrameError`] for any body that is not exactly one worker message.
pub fn decode_worker_message(body: &[u8]) -> Result<WorkerMessage, FrameError> {
    let mut cursor = split_kind(body)?;
    match cursor.kind {
        KIND_HELLO => {
            let hello = Hello {
                protocol: cursor.u32()?,
                abi_version: cursor.u32()?,
                pid: cursor.u32()?,
                name: cursor.string()?,
                version: cursor.string()?,
                description: cursor.string()?,
            };
            cursor.end()?;
            Ok(WorkerMessage::Hello(hello))
        }
        KIND_LOAD_FAILED => {
            let message =
                String::from_utf8(cursor.rest.to_vec()).map_err(|_| FrameError::NotUtf8)?;
            Ok(WorkerMessage::LoadFailed(message))
        }
        KIND_DONE => Ok(WorkerMessage::Done(Done {
            id: cursor.u64()?,
            status: cursor.u32()?,
            nanos: cursor.u64()?,
            payload: cursor.rest.to_vec(),
        })),
        KIND_REVOKED => {
            let dropped = cursor.u64()?;
            cursor.end()?;
            Ok(WorkerMessage::Revoked(dropped))
        }
        other => Err(FrameError::UnknownKind(other)),
    }
}

/// Appends a revoke frame to `out`.
pub fn encode_revoke(out: &mut Vec<u8>, from: u64) {
    let start = begin(out, KIND_REVOKE);
    out.extend_from_slice(&from.to_le_bytes());
    finish(out, start);
}

/// Decodes a body sent by the supervisor.
///
/// # Errors
///
/// A [`FrameError`] for any body that is not one supervisor message.
pub fn decode_supervisor_message(body: &[u8]) -> Result<SupervisorMessage<'_>, FrameError> {
    let mut cursor = split_kind(body)?;
    if cursor.kind == KIND_REVOKE {
        let from = cursor.u64()?;
        cursor.end()?;
        return Ok(SupervisorMessage::Revoke(from));
    }
    decode_task(body).map(SupervisorMessage::Task)
}

/// Decodes a task frame sent by the supervisor.
///
/// # Errors
///
/// A [`FrameError`] for any body that is not a task frame.
pub fn decode_task(body: &[u8]) -> Result<TaskFrame<'_>, FrameError> {
    let mut cursor = split_kind(body)?;
    if cursor.kind != KIND_TASK {
        return Err(FrameError::UnknownKind(cursor.kind));
    }
    let id = cursor.u64()?;
    let index = cursor.u64()?;
    Ok(TaskFrame {
        id,
        index,
        params: cursor.rest,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body_of(frame: &[u8]) -> &[u8] {
        let len = check_len(frame[..4].try_into().unwrap()).unwrap() as usize;
        assert_eq!(frame.len(), 4 + len);
        &frame[4..]
    }

    #[test]
    fn worker_messages_round_trip() {
        let messages = [
            WorkerMessage::Hello(Hello {
                protocol: PROTOCOL_VERSION,
                abi_version: 1,
                pid: 42,
                name: "sha256".into(),
                version: "0.1.0".into(),
                description: "".into(),
            }),
            WorkerMessage::LoadFailed("no symbol".into()),
            WorkerMessage::Done(Done {
                id: 7,
                status: 3,
                nanos: 12345,
                payload: b"{\"a\":1}".to_vec(),
            }),
        ];
        for message in messages {
            let mut frame = Vec::new();
            encode_worker_message(&mut frame, &message);
            assert_eq!(decode_worker_message(body_of(&frame)).unwrap(), message);
        }
    }

    #[test]
    fn task_frames_round_trip() {
        let mut frame = Vec::new();
        encode_task(
            &mut frame,
            &TaskFrame {
                id: 9,
                index: 4,
                params: b"[1,2]",
            },
        );
        let task = decode_task(body_of(&frame)).unwrap();
        assert_eq!(
            task,
            TaskFrame {
                id: 9,
                index: 4,
                params: b"[1,2]"
            }
        );
    }

    #[test]
    fn a_huge_header_is_refused_without_reading_on() {
        let bytes = [0xff, 0xff, 0xff, 0xff, 4, 0, 0];
        let mut reader = FrameReader::new(&bytes[..]);
        let error = reader.read_body(&mut Vec::new()).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::InvalidData);
        assert!(error.to_string().contains("4294967295 bytes"), "{error}");
    }

    #[test]
    fn truncated_and_garbage_bodies_are_errors() {
        assert!(decode_worker_message(&[]).is_err());
        assert!(decode_worker_message(&[KIND_DONE, 1, 2]).is_err());
        assert!(decode_worker_message(&[KIND_HELLO, 1, 0, 0, 0]).is_err());
        assert_eq!(
            decode_worker_message(&[99]),
            Err(FrameError::UnknownKind(99))
        );
        assert!(decode_task(&[KIND_TASK, 1]).is_err());

        let mut reader = FrameReader::new(&[5, 0, 0, 0, 1, 2][..]);
        let error = reader.read_body(&mut Vec::new()).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn the_assembler_cuts_frames_from_any_pieces() {
        let mut stream = Vec::new();
        for id in 0..5u64 {
            encode_done(&mut stream, id, 0, id * 10, &vec![b'x'; id as usize * 100]);
        }
        for piece in [1, 3, 7, 64, 1000] {
            let mut assembler = FrameAssembler::new();
            let mut ids = Vec::new();
            for chunk in stream.chunks(piece) {
                assembler.buffer().extend_from_slice(chunk);
                while let Some(body) = assembler.next_frame().unwrap() {
                    match decode_worker_message(body).unwrap() {
                        WorkerMessage::Done(done) => ids.push(done.id),
                        other => panic!("{other:?}"),
                    }
                }
            }
            assert_eq!(ids, [0, 1, 2, 3, 4], "pieces of {piece}");
            assert!(!assembler.has_partial());
        }

        let mut assembler = FrameAssembler::new();
        assembler
            .buffer()
            .extend_from_slice(&[0xff, 0xff, 0xff, 0xff]);
        assert_eq!(assembler.next_frame(), Err(FrameError::TooLarge(u32::MAX)));
    }

    #[test]
    fn clean_end_of_file_between_frames_is_not_an_error() {
        let mut reader = FrameReader::new(&[][..]);
        assert!(!reader.read_body(&mut Vec::new()).unwrap());
    }

    // Fuzz targets: arbitrary bytes never panic a decoder, and never make
    // a reader hold more than it was sent. A longer run:
    // `PROPTEST_CASES=200000 cargo test -p runner --lib fuzz_`.
    proptest::proptest! {
        #[test]
        fn fuzz_decoders_never_panic(body in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            let _ = decode_worker_message(&body);
            let _ = decode_task(&body);
        }

        #[test]
        fn fuzz_assembler_takes_only_whole_frames(
            stream in proptest::collection::vec(proptest::num::u8::ANY, 0..2048),
            piece in 1usize..300,
        ) {
            let mut assembler = FrameAssembler::new();
            let mut taken = 0;
            'feed: for chunk in stream.chunks(piece) {
                assembler.buffer().extend_from_slice(chunk);
                loop {
                    match assembler.next_frame() {
                        Ok(Some(body)) => {
                            taken += 4 + body.len();
                            let _ = decode_worker_message(body);
                        }
                        Ok(None) => break,
                        Err(_) => break 'feed,
                    }
                }
            }
            proptest::prop_assert!(taken <= stream.len());
        }

        #[test]
        fn fuzz_frame_reader_holds_no_more_than_it_was_sent(
            stream in proptest::collection::vec(proptest::num::u8::ANY, 0..2048),
        ) {
            let mut reader = FrameReader::new(&stream[..]);
            let mut body = Vec::new();
            while let Ok(true) = reader.read_body(&mut body) {
                proptest::prop_assert!(body.len() <= stream.len());
                let _ = decode_task(&body);
            }
            // Growth is geometric from what arrived, never from what a header claims.
            proptest::prop_assert!(body.capacity() <= 2 * stream.len() + 4096);
        }
    }
}
