//! Which user and group the workers run as. The master keeps its privileges (it may need them
//! to re-bind or re-read the model on HUP); workers, which face the clients, drop theirs right
//! after fork. A master running as root never runs workers as root unless told to.

use nix::unistd::{Group, User};

use crate::config::Config;

/// Used for workers when the master is root and no `user` is configured.
const FALLBACK_USER: &str = "nobody";

/// The (uid, gid) workers switch to, or None to keep the master's. Errors name the key.
pub fn resolve(config: &Config) -> Result<Option<(u32, u32)>, (&'static str, String)> {
    let root = nix::unistd::geteuid().is_root();
    let user = match (&config.user, root, config.allow_root) {
        (Some(name), _, _) => Some(lookup_user(name).map_err(|e| ("user", e))?),
        (None, true, false) => Some(lookup_user(FALLBACK_USER).map_err(|e| {
            (
                "user",
                format!("the master runs as root and no user is set; {e} (set user, or allow_root = true)"),
            )
        })?),
        (None, _, _) => None,
    };
    let gid = match &config.group {
        Some(name) => Some(lookup_group(name).map_err(|e| ("group", e))?),
        None => user.as_ref().map(|(_, gid)| *gid),
    };
    Ok(match (user, gid) {
        (Some((uid, _)), Some(gid)) => Some((uid, gid)),
        (None, Some(gid)) => Some((nix::unistd::geteuid().as_raw(), gid)),
        _ => None,
    })
}

fn lookup_user(name: &str) -> Result<(u32, u32), String> {
    let found = match name.parse::<u32>() {
        Ok(uid) => User::from_uid(uid.into()),
        Err(_) => User::from_name(name),
    };
    match found {
        Ok(Some(u)) => Ok((u.uid.as_raw(), u.gid.as_raw())),
        Ok(None) => Err(format!("no such user {name:?}")),
        Err(e) => Err(format!("cannot look up user {name:?}: {e}")),
    }
}

fn lookup_group(name: &str) -> Result<u32, String> {
    let found = match name.parse::<u32>() {
        Ok(gid) => Group::from_gid(gid.into()),
        Err(_) => Group::from_name(name),
    };
    match found {
        Ok(Some(g)) => Ok(g.gid.as_raw()),
        Ok(None) => Err(format!("no such group {name:?}")),
        Err(e) => Err(format!("cannot look up group {name:?}: {e}")),
    }
}
