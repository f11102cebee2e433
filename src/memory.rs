//! Reading a process's memory from /proc, the way it should be read for a prefork server:
//! private memory (USS), not RSS, which counts the model pages every worker shares.

/// Private_Clean + Private_Dirty of `pid`, in bytes, from /proc/PID/smaps_rollup.
pub fn private_bytes(pid: i32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    Some(parse_private_kib(&text)? * 1024)
}

fn parse_private_kib(smaps_rollup: &str) -> Option<u64> {
    let mut total = None;
    for line in smaps_rollup.lines() {
        let mut parts = line.split_whitespace();
        if let (Some("Private_Clean:" | "Private_Dirty:"), Some(kib)) = (parts.next(), parts.next())
        {
            *total.get_or_insert(0) += kib.parse::<u64>().ok()?;
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_private_pages_only() {
        let text = "Rss:  100000 kB\nPss:  40000 kB\nShared_Clean:  90000 kB\n\
                    Private_Clean:  1000 kB\nPrivate_Dirty:  3000 kB\n";
        assert_eq!(parse_private_kib(text), Some(4000));
        assert_eq!(parse_private_kib("Rss: 5 kB\n"), None);
    }

    #[test]
    fn reads_this_process() {
        assert!(private_bytes(std::process::id() as i32).is_some_and(|b| b > 0));
    }
}
