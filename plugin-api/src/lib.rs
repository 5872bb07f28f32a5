//! The contract between `runner` and its task plugins.
//!
//! A task is a Rust crate built as a `cdylib`. Its author writes an ordinary
//! function and exports it with [`export_task!`]:
//!
//! ```
//! use plugin_api::export_task;
//!
//! fn run(numbers: Vec<u64>) -> Result<u64, String> {
//!     numbers.iter().try_fold(0u64, |sum, n| {
//!         sum.checked_add(*n).ok_or_else(|| "sum overflows u64".to_string())
//!     })
//! }
//!
//! export_task!(run);
//! ```
//!
//! # What the macro produces
//!
//! One `#[no_mangle]` static named [`SYMBOL`], of type [`TaskDeclaration`].
//! Its first two fields, [`MAGIC`] and [`ABI_VERSION`], never move, so a host
//! of any version can read them and refuse a plugin it does not speak with a
//! message that names both versions. Everything else in the declaration is
//! only read after that check.
//!
//! # Parameters, results and errors
//!
//! - Parameters arrive as JSON and are decoded into any
//!   [`serde::de::DeserializeOwned`] type. Parameters that do not decode are a
//!   permanent failure of that task, carrying serde's message.
//! - The return value is any [`serde::Serialize`] type, encoded as JSON.
//! - The error is any [`std::fmt::Display`] type and is retryable: the runner
//!   may run the task again, on any worker, until its retries are spent. Wrap
//!   it in [`Permanent`], or return a [`TaskError`], to say that trying again
//!   cannot help.
//! - A panic that unwinds is caught and becomes a failure of that attempt with
//!   the panic message. The worker survives. A plugin built with
//!   `panic = "abort"` dies instead, which the runner handles as a crash.
//!
//! # Per-worker state
//!
//! `export_task!(run, setup = init)` calls `init()` once, after the library
//! is loaded in a worker and before its first task. `init` returns
//! `Result<S, E>`; each call of `run` then receives `&mut S` as its first
//! argument. An error from `init` means the worker cannot serve, and the run
//! stops with that message.
//!
//! # Across the boundary
//!
//! Rust has no stable ABI between compiler versions, so only C types cross:
//! pointers with lengths, integers and `extern "C"` function pointers. Bytes
//! are JSON. Whoever allocates frees: the plugin hands its output to a host
//! callback ([`Sink`]) that copies it before returning, and neither side ever
//! frees memory the other allocated.

#![deny(missing_docs)]

use std::ffi::c_void;
use std::fmt::{self, Display};

/// The name of the static that [`export_task!`] emits.
pub const SYMBOL: &[u8] = b"RUNNER_TASK_DECLARATION";

/// The tag in the first bytes of every [`TaskDeclaration`].
pub const MAGIC: [u8; 8] = *b"RUNRTASK";

/// The version of the layout of [`TaskDeclaration`] and of the calls in it.
///
/// Raised whenever anything after [`DeclarationHeader`] changes.
pub const ABI_VERSION: u32 = 1;

/// The part of a declaration that every ABI version shares.
///
/// A host reads this first and only reads the rest of [`TaskDeclaration`]
/// when both fields match its own.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct DeclarationHeader {
    /// Always [`MAGIC`].
    pub magic: [u8; 8],
    /// The [`ABI_VERSION`] the plugin was built against.
    pub abi_version: u32,
}

/// A borrowed UTF-8 string with a `'static` lifetime on the plugin's side.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct RawStr {
    /// The first byte; valid for `len` bytes while the library is loaded.
    pub ptr: *const u8,
    /// The length in bytes.
    pub len: usize,
}

impl RawStr {
    /// Borrows a static string.
    pub const fn new(s: &'static str) -> Self {
        Self {
            ptr: s.as_ptr(),
            len: s.len(),
        }
    }

    /// Reads the string back.
    ///
    /// # Safety
    ///
    /// `ptr` must point to `len` readable bytes that stay valid for `'a`,
    /// which holds for a declaration of a library that is still loaded.
    pub unsafe fn as_str<'a>(&self) -> Result<&'a str, std::str::Utf8Error> {
        if self.len == 0 {
            return Ok("");
        }
        // SAFETY: the caller promises `ptr` is valid for `len` bytes for 'a.
        let bytes = unsafe { std::slice::from_raw_parts(self.ptr, self.len) };
        std::str::from_utf8(bytes)
    }
}

/// The host callback that receives a call's output bytes.
///
/// The plugin calls it at most once per call, with `ctx` as the host passed
/// it. The host copies the bytes before it returns, so the plugin keeps
/// ownership of its buffer and frees it as usual.
pub type Sink = unsafe extern "C" fn(ctx: *mut c_void, ptr: *const u8, len: usize);

/// How a call ended, as the `u32` that [`TaskDeclaration::call`] returns.
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallStatus {
    /// The task succeeded; the sink received the JSON of its return value.
    Ok = 0,
    /// The task failed and may succeed if tried again; the sink received the
    /// error message.
    Error = 1,
    /// The task failed and trying again cannot help; the sink received the
    /// error message.
    PermanentError = 2,
    /// The task panicked; the sink received the panic message.
    Panic = 3,
    /// The parameters did not decode; the sink received serde's message.
    /// Never retried.
    BadParams = 4,
}

impl CallStatus {
    /// Decodes a status returned across the boundary.
    pub fn from_u32(value: u32) -> Option<Self> {
        Some(match value {
            0 => Self::Ok,
            1 => Self::Error,
            2 => Self::PermanentError,
            3 => Self::Panic,
            4 => Self::BadParams,
            _ => return None,
        })
    }
}

/// The declaration a plugin exports under [`SYMBOL`].
///
/// `#[repr(C)]`, and its first fields are a [`DeclarationHeader`], so a host
/// can check [`MAGIC`] and [`ABI_VERSION`] before it relies on anything else.
#[repr(C)]
#[derive(Debug)]
pub struct TaskDeclaration {
    /// Always [`MAGIC`].
    pub magic: [u8; 8],
    /// The [`ABI_VERSION`] the plugin was built against.
    pub abi_version: u32,
    /// The plugin's crate name.
    pub name: RawStr,
    /// The plugin's crate version.
    pub version: RawStr,
    /// The plugin's crate description; may be empty.
    pub description: RawStr,
    /// Runs the plugin's per-worker setup and returns its state.
    ///
    /// Returns a null pointer on failure, after passing the error message to
    /// the sink. A plugin without setup returns a dangling non-null pointer.
    pub setup: unsafe extern "C" fn(sink: Sink, ctx: *mut c_void) -> *mut c_void,
    /// Runs one task.
    ///
    /// `state` is what `setup` returned; `params` points to `params_len`
    /// bytes of JSON. The output (JSON or a message) goes to the sink, and the
    /// return value is a [`CallStatus`].
    pub call: unsafe extern "C" fn(
        state: *mut c_void,
        params: *const u8,
        params_len: usize,
        sink: Sink,
        ctx: *mut c_void,
    ) -> u32,
    /// Drops the state that `setup` returned. Called at most once.
    pub teardown: unsafe extern "C" fn(state: *mut c_void),
}

// SAFETY: a declaration holds pointers to `'static` strings and to functions
// only; nothing in it is mutated after construction, so sharing it between
// threads is sound.
unsafe impl Sync for TaskDeclaration {}

/// A task error that the runner must not retry.
///
/// Wrap any [`Display`] error in it: `Err(Permanent(format!(...)))`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Permanent<E>(pub E);

/// A task error that says whether trying again can help.
///
/// For functions that fail both ways.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TaskError {
    /// The task may succeed if tried again.
    Retryable(String),
    /// Trying again cannot help.
    Permanent(String),
}

impl TaskError {
    /// A retryable error with this message.
    pub fn retryable(message: impl Display) -> Self {
        Self::Retryable(message.to_string())
    }

    /// A permanent error with this message.
    pub fn permanent(message: impl Display) -> Self {
        Self::Permanent(message.to_string())
    }
}

/// What the shim needs from a task's error type: its message and whether it
/// is permanent.
///
/// Implemented for every [`Display`] type (retryable), for [`Permanent`] and
/// for [`TaskError`].
pub trait TaskFailure {
    /// The message recorded for this failure.
    fn message(&self) -> String;
    /// Whether the runner must not try the task again.
    fn is_permanent(&self) -> bool;
}

impl<E: Display> TaskFailure for E {
    fn message(&self) -> String {
        self.to_string()
    }

    fn is_permanent(&self) -> bool {
        false
    }
}

impl<E: Display> TaskFailure for Permanent<E> {
    fn message(&self) -> String {
        self.0.to_string()
    }

    fn is_permanent(&self) -> bool {
        true
    }
}

impl TaskFailure for TaskError {
    fn message(&self) -> String {
        match self {
            Self::Retryable(message) | Self::Permanent(message) => message.clone(),
        }
    }

    fn is_permanent(&self) -> bool {
        matches!(self, Self::Permanent(_))
    }
}

/// Shows a message, or says that it is empty, so that a failure never
/// reads as a blank.
struct Fallback<'a>(&'a str);

impl Display for Fallback<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            f.write_str("(empty message)")
        } else {
            f.write_str(self.0)
        }
    }
}

/// Exports a task function from a plugin crate.
///
/// `export_task!(run)` takes `fn run(params: P) -> Result<R, E>`;
/// `export_task!(run, setup = init)` takes `fn init() -> Result<S, E1>` and
/// `fn run(state: &mut S, params: P) -> Result<R, E2>`. `P` is any
/// `DeserializeOwned` type, `R` any `Serialize` type, and the errors any type
/// that implements [`TaskFailure`] (every `Display` type does).
///
/// Use it once per crate, at the top level. The crate must be built with
/// `crate-type = ["cdylib"]`.
#[macro_export]
macro_rules! export_task {
    ($run:path) => {
        $crate::export_task!(@declare
            $crate::__private::no_setup,
            |_state: &mut (), params| $run(params)
        );
    };
    ($run:path, setup = $setup:path) => {
        $crate::export_task!(@declare $setup, $run);
    };
    (@declare $setup:expr, $run:expr) => {
        #[doc(hidden)]
        #[unsafe(no_mangle)]
        pub static RUNNER_TASK_DECLARATION: $crate::TaskDeclaration = {
            unsafe extern "C" fn __runner_setup(
                sink: $crate::Sink,
                ctx: *mut ::std::ffi::c_void,
            ) -> *mut ::std::ffi::c_void {
                // SAFETY: the host passes a sink and context that are valid
                // for this call, as the contract requires.
                unsafe { $crate::__private::setup(sink, ctx, $setup) }
            }

            unsafe extern "C" fn __runner_call(
                state: *mut ::std::ffi::c_void,
                params: *const u8,
                params_len: usize,
                sink: $crate::Sink,
                ctx: *mut ::std::ffi::c_void,
            ) -> u32 {
                // SAFETY: `state` came from `setup` with the same setup
                // function, and the host keeps `params` valid for the call.
                unsafe {
                    $crate::__private::call(
                        state, params, params_len, sink, ctx, $setup, $run,
                    )
                }
            }

            unsafe extern "C" fn __runner_teardown(state: *mut ::std::ffi::c_void) {
                // SAFETY: `state` came from `setup` and the host drops it
                // once.
                unsafe { $crate::__private::teardown(state, $setup) }
            }

            $crate::TaskDeclaration {
                magic: $crate::MAGIC,
                abi_version: $crate::ABI_VERSION,
                name: $crate::RawStr::new(env!("CARGO_PKG_NAME")),
                version: $crate::RawStr::new(env!("CARGO_PKG_VERSION")),
                description: $crate::RawStr::new(env!("CARGO_PKG_DESCRIPTION")),
                setup: __runner_setup,
                call: __runner_call,
                teardown: __runner_teardown,
            }
        };
    };
}

#[doc(hidden)]
pub mod __private {
    //! The shims behind [`export_task!`]. Not part of the public API.

    use super::{CallStatus, Fallback, Sink, TaskFailure};
    use std::any::Any;
    use std::cell::{Cell, RefCell};
    use std::ffi::c_void;
    use std::panic::{AssertUnwindSafe, catch_unwind};
    use std::sync::Once;

    thread_local! {
        /// Set while a task call runs on this thread.
        static IN_TASK: Cell<bool> = const { Cell::new(false) };
        /// Where the last caught task panic happened.
        static PANIC_LOCATION: RefCell<Option<String>> = const { RefCell::new(None) };
    }

    /// Installs, once, a panic hook that keeps quiet about panics inside a
    /// task call and notes their location for the task's message instead.
    /// Panics elsewhere (threads the plugin started) go to the hook that
    /// was there before.
    fn install_panic_hook() {
        static HOOK: Once = Once::new();
        HOOK.call_once(|| {
            let previous = std::panic::take_hook();
            std::panic::set_hook(Box::new(move |info| {
                if IN_TASK.with(Cell::get) {
                    let location = info
                        .location()
                        .map(|l| format!("{}:{}:{}", l.file(), l.line(), l.column()));
                    PANIC_LOCATION.with(|slot| *slot.borrow_mut() = location);
                } else {
                    previous(info);
                }
            }));
        });
    }

    /// Marks this thread as running a task for the guard's lifetime.
    struct InTask;

    impl InTask {
        fn enter() -> Self {
            IN_TASK.with(|flag| flag.set(true));
            PANIC_LOCATION.with(|slot| slot.borrow_mut().take());
            Self
        }
    }

    impl Drop for InTask {
        fn drop(&mut self) {
            IN_TASK.with(|flag| flag.set(false));
        }
    }

    /// serde_json's message for params that did not decode, with the column
    /// instead of its "at line 1 column N" (params are always one line).
    fn params_error(error: &serde_json::Error) -> String {
        let text = error.to_string();
        let message = match text.rfind(" at line ") {
            Some(at) => &text[..at],
            None => &text,
        };
        format!("{message} (params column {})", error.column())
    }

    /// The setup used when a plugin declares none.
    pub fn no_setup() -> Result<(), std::convert::Infallible> {
        Ok(())
    }

    fn panic_message(payload: &(dyn Any + Send)) -> String {
        if let Some(s) = payload.downcast_ref::<&str>() {
            (*s).to_string()
        } else if let Some(s) = payload.downcast_ref::<String>() {
            s.clone()
        } else {
            "panic with a non-string payload".to_string()
        }
    }

    /// Hands bytes to the host.
    ///
    /// # Safety
    ///
    /// `sink` and `ctx` must be the pair the host passed to this call.
    unsafe fn emit(sink: Sink, ctx: *mut c_void, bytes: &[u8]) {
        // SAFETY: the host's sink copies `bytes` before returning and keeps
        // no pointer into them; `ctx` is the host's own.
        unsafe { sink(ctx, bytes.as_ptr(), bytes.len()) }
    }

    /// Runs the plugin's setup and boxes its state.
    ///
    /// # Safety
    ///
    /// `sink` and `ctx` must be the pair the host passed to this call.
    pub unsafe fn setup<S, E, F>(sink: Sink, ctx: *mut c_void, init: F) -> *mut c_void
    where
        F: FnOnce() -> Result<S, E>,
        E: TaskFailure,
    {
        install_panic_hook();
        let message = match catch_unwind(AssertUnwindSafe(init)) {
            Ok(Ok(state)) => return Box::into_raw(Box::new(state)).cast(),
            Ok(Err(error)) => Fallback(&error.message()).to_string(),
            Err(payload) => format!("setup panicked: {}", panic_message(&*payload)),
        };
        // SAFETY: forwarded from this function's contract.
        unsafe { emit(sink, ctx, message.as_bytes()) };
        std::ptr::null_mut()
    }

    /// Decodes the params, runs the task and encodes its ending.
    ///
    /// # Safety
    ///
    /// `state` must come from [`setup`] with the same `S`, not yet torn down;
    /// `params` must be valid for `params_len` bytes; `sink` and `ctx` must
    /// be the pair the host passed to this call.
    pub unsafe fn call<S, E1, P, R, E, I, F>(
        state: *mut c_void,
        params: *const u8,
        params_len: usize,
        sink: Sink,
        ctx: *mut c_void,
        _setup: I,
        run: F,
    ) -> u32
    where
        I: FnOnce() -> Result<S, E1>,
        F: FnOnce(&mut S, P) -> Result<R, E>,
        P: serde::de::DeserializeOwned,
        R: serde::Serialize,
        E: TaskFailure,
    {
        // SAFETY: the host keeps `params` valid for `params_len` bytes for
        // the duration of the call.
        let bytes = unsafe { std::slice::from_raw_parts(params, params_len) };
        // SAFETY: `state` is the live box that `setup` made for this `S`.
        let state = unsafe { &mut *state.cast::<S>() };

        let guard = InTask::enter();
        let outcome = catch_unwind(AssertUnwindSafe(|| {
            let params: P = match serde_json::from_slice(bytes) {
                Ok(params) => params,
                Err(error) => {
                    return (CallStatus::BadParams, params_error(&error).into_bytes());
                }
            };
            match run(state, params) {
                Ok(value) => match serde_json::to_vec(&value) {
                    Ok(json) => (CallStatus::Ok, json),
                    Err(error) => (
                        CallStatus::PermanentError,
                        format!("cannot encode the return value as JSON: {error}").into_bytes(),
                    ),
                },
                Err(error) => {
                    let status = if error.is_permanent() {
                        CallStatus::PermanentError
                    } else {
                        CallStatus::Error
                    };
                    let message = error.message();
                    (status, Fallback(&message).to_string().into_bytes())
                }
            }
        }));
        drop(guard);
        let (status, bytes) = match outcome {
            Ok(pair) => pair,
            Err(payload) => {
                let message = panic_message(&*payload);
                let text = match PANIC_LOCATION.with(|slot| slot.borrow_mut().take()) {
                    Some(location) => format!("panicked at {location}: {message}"),
                    None => format!("panicked: {message}"),
                };
                (CallStatus::Panic, text.into_bytes())
            }
        };

        // SAFETY: forwarded from this function's contract.
        unsafe { emit(sink, ctx, &bytes) };
        status as u32
    }

    /// Drops the state that [`setup`] boxed.
    ///
    /// # Safety
    ///
    /// `state` must come from [`setup`] with the same `S` and must not be
    /// used again.
    pub unsafe fn teardown<S, E, I>(state: *mut c_void, _setup: I)
    where
        I: FnOnce() -> Result<S, E>,
    {
        if state.is_null() {
            return;
        }
        // SAFETY: `state` is the box `setup` leaked for this `S`, dropped
        // once.
        let state = unsafe { Box::from_raw(state.cast::<S>()) };
        let _ = catch_unwind(AssertUnwindSafe(move || drop(state)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn first_line(n: u32) -> Result<u32, Permanent<String>> {
        if n == 0 {
            Err(Permanent("zero".into()))
        } else {
            Ok(n * 2)
        }
    }

    #[test]
    fn display_errors_are_retryable_and_wrapped_ones_permanent() {
        assert!(!"boom".is_permanent());
        assert!(Permanent("boom").is_permanent());
        assert!(TaskError::permanent("x").is_permanent());
        assert!(!TaskError::retryable("x").is_permanent());
        assert_eq!(first_line(0).unwrap_err().message(), "zero");
    }

    #[test]
    fn status_codes_round_trip() {
        for status in [
            CallStatus::Ok,
            CallStatus::Error,
            CallStatus::PermanentError,
            CallStatus::Panic,
            CallStatus::BadParams,
        ] {
            assert_eq!(CallStatus::from_u32(status as u32), Some(status));
        }
        assert_eq!(CallStatus::from_u32(5), None);
    }
}
