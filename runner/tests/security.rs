use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use serde_json::json;

use crate::util::{faulty_command, read_results, run, runner, work_dir_with};

fn refused(work: &std::path::Path, task: &str) -> crate::util::Run {
    let mut command = runner();
    command
        .args(["--task", task, "--range", "0..1", "--work-dir"])
        .arg(work);
    let run = run(command, Duration::from_secs(30));
    check!(run, run.code() == Some(2));
    check!(run, run.worker_pids().is_empty(), "a worker started");
    run
}

#[test]
fn a_library_linked_from_outside_the_work_dir_is_refused() {
    let outside = work_dir_with(&["test"]);
    let work = work_dir_with(&[]);
    std::os::unix::fs::symlink(
        outside.path().join("libtest.so"),
        work.path().join("libtest.so"),
    )
    .unwrap();
    let run = refused(work.path(), "test");
    check!(run, run.stderr.contains("outside the work dir"));
    check!(
        run,
        run.stderr
            .contains(&outside.path().join("libtest.so").display().to_string())
    );
}

#[test]
fn a_library_or_work_dir_that_others_can_write_is_refused_with_the_fix() {
    let work = work_dir_with(&["test"]);
    let library = work.path().join("libtest.so");
    // Group write access matters when the group is not the owner's private
    // one: give the file to the `nogroup` group.
    let c_path = std::ffi::CString::new(library.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: chown on a path we created; -1 leaves the owner as it is.
    if unsafe { libc::chown(c_path.as_ptr(), u32::MAX, 65534) } != 0 {
        eprintln!("skipped the group part: cannot give a file to group 65534 as this user");
        return;
    }
    std::fs::set_permissions(&library, std::fs::Permissions::from_mode(0o775)).unwrap();
    let run = refused(work.path(), "test");
    let expected = format!("run `chmod go-w {}`", library.display());
    check!(run, run.stderr.contains("writable by its group"));
    check!(run, run.stderr.contains(&expected), "expected {expected:?}");

    std::fs::set_permissions(&library, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(work.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let run = refused(work.path(), "test");
    check!(run, run.stderr.contains("writable by others"));
}

#[test]
fn a_worker_inherits_no_descriptor_but_its_own() {
    let work = work_dir_with(&["faulty"]);
    let (mut command, results) = faulty_command(work.path(), &[json!({"do": "fds"})], &[]);
    // Hand the runner a descriptor without close-on-exec, as a careless
    // parent would.
    let leaked = std::fs::File::open("/dev/null").unwrap();
    let leaked_fd = std::os::fd::AsRawFd::as_raw_fd(&leaked);
    // SAFETY: dup2 and fcntl are async-signal-safe, and work on the child's
    // own descriptor table.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut command, move || {
            libc::dup2(leaked_fd, 9);
            libc::fcntl(9, libc::F_SETFD, 0);
            Ok(())
        });
    }
    let run = run(command, Duration::from_secs(30));

    check!(run, run.code() == Some(0));
    let record = &read_results(&results)[0];
    check!(run, record["output"] == json!([0, 1, 2, 3]), "{record}");
}
