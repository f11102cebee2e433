//! Process titles, as gunicorn's setproctitle sets them: `forkserve: master [NAME]` and
//! `forkserve: worker [NAME]` in `ps`, `top` and `/proc/PID/cmdline`, so that an operator can
//! tell the master from its workers at a glance.
//!
//! Linux shows a process's command line from the memory its arguments were passed in. The
//! title is written over that memory (and cut to fit it; the environment that follows is left
//! alone, since the C library still reads it), and the thread name (`comm`, 15 bytes) is set
//! too. The arguments must have been read before: `main` keeps what it needs at start-up.

/// Set this process's title.
pub fn set(title: &str) {
    // comm: what `top` and `ps -o comm` show.
    let comm: Vec<u8> = title.bytes().take(15).collect();
    if let Ok(name) = std::ffi::CString::new(comm) {
        let _ = nix::sys::prctl::set_name(&name);
    }
    if let Some((start, end)) = argument_area() {
        let len = end - start;
        if len < 2 {
            return;
        }
        let mut bytes = title.as_bytes()[..title.len().min(len - 1)].to_vec();
        bytes.resize(len, 0);
        // SAFETY: [arg_start, arg_end) is this process's own argument strings, which the
        // kernel mapped writable on the initial stack at exec. Nothing reads them any more:
        // the arguments were copied at start-up (clap, the re-exec invocation), and std only
        // reads them when asked. The write stays inside the range the kernel reports.
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), start as *mut u8, len);
        }
    }
}

/// `arg_start` and `arg_end` from /proc/self/stat (fields 48 and 49).
fn argument_area() -> Option<(usize, usize)> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name, which is in parentheses and may contain spaces.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state).
    let start: usize = fields.get(48 - 3)?.parse().ok()?;
    let end: usize = fields.get(49 - 3)?.parse().ok()?;
    (start != 0 && end > start).then_some((start, end))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_argument_area_is_found() {
        let (start, end) = argument_area().expect("arg_start and arg_end");
        // At least the program's own path.
        assert!(end - start >= std::env::args_os().next().unwrap().len());
    }
}
