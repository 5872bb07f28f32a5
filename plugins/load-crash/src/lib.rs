//! A fixture for a plugin that cannot even load: its static constructor
//! writes through a null pointer the moment the library is mapped, before
//! any task declaration is read.

use plugin_api::export_task;

extern "C" fn crash_at_load() {
    // SAFETY: none; crashing while loaded is the fault under test.
    unsafe { std::ptr::null_mut::<u8>().write_volatile(1) }
}

/// Runs `crash_at_load` from the dynamic loader, like a C++ global
/// constructor would.
#[used]
#[unsafe(link_section = ".init_array")]
static CRASH_AT_LOAD: extern "C" fn() = crash_at_load;

fn run(params: u64) -> Result<u64, String> {
    Ok(params)
}

export_task!(run);
