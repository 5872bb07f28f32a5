//! A fixture for the ABI check: the declaration header that every version
//! shares, with an ABI version far in the future. A runner must refuse it
//! before it calls anything.

use plugin_api::{DeclarationHeader, MAGIC};

/// What a plugin built against a future `plugin-api` would export.
#[unsafe(no_mangle)]
pub static RUNNER_TASK_DECLARATION: DeclarationHeader = DeclarationHeader {
    magic: MAGIC,
    abi_version: 999,
};
