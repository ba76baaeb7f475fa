//! User resolution from a container's `/etc/passwd` and `/etc/group`, and
//! the environment of a container process.
//!
//! Everything here is pure: callers read the files (from inside the
//! container's mount namespace, so symlinks cannot leave its root) and pass
//! their contents in.

/// Errors of user resolution; the messages are the ones Garden clients match.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UserError {
    #[error("unable to find user {name}: no matching entries in passwd file")]
    UnknownUser { name: String },
    #[error("unable to find group {name}: no matching entries in group file")]
    UnknownGroup { name: String },
}

/// A user resolved for a process: ids, supplementary groups and home.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecUser {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups: the groups of `/etc/group` that list the
    /// matched user name as a member.
    pub groups: Vec<u32>,
    /// The passwd home directory, `/` without a passwd entry.
    pub home: String,
}

struct PasswdEntry<'a> {
    name: &'a str,
    uid: u32,
    gid: u32,
    home: &'a str,
}

struct GroupEntry<'a> {
    name: &'a str,
    gid: u32,
    members: Vec<&'a str>,
}

fn passwd_entries(passwd: &str) -> impl Iterator<Item = PasswdEntry<'_>> {
    passwd.lines().filter_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        if fields.len() < 7 || line.starts_with('#') {
            return None;
        }
        Some(PasswdEntry { name: fields[0], uid: fields[2].parse().ok()?, gid: fields[3].parse().ok()?, home: fields[5] })
    })
}

fn group_entries(group: &str) -> impl Iterator<Item = GroupEntry<'_>> {
    group.lines().filter_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        if fields.len() < 4 || line.starts_with('#') {
            return None;
        }
        let members = fields[3].split(',').map(str::trim).filter(|member| !member.is_empty()).collect();
        Some(GroupEntry { name: fields[0], gid: fields[2].parse().ok()?, members })
    })
}

/// Resolves `user` (empty, a name, a uid, `uid:gid` or `name:group`) against
/// the contents of the container's passwd and group files, either of which
/// may be missing. Empty means root.
pub fn resolve_user(user: &str, passwd: Option<&str>, group: Option<&str>) -> Result<ExecUser, UserError> {
    let passwd = passwd.unwrap_or("");
    let group = group.unwrap_or("");
    let (user_part, group_part) = match user.split_once(':') {
        Some((user_part, group_part)) => (user_part, Some(group_part)),
        None => (user, None),
    };
    let user_part = if user_part.is_empty() { "root" } else { user_part };

    let entry = match user_part.parse::<u32>() {
        Ok(uid) => passwd_entries(passwd).find(|entry| entry.uid == uid),
        Err(_) => passwd_entries(passwd).find(|entry| entry.name == user_part),
    };
    let (uid, mut gid, home, name) = match (&entry, user_part.parse::<u32>()) {
        (Some(entry), _) => (entry.uid, entry.gid, entry.home.to_string(), Some(entry.name)),
        (None, Ok(uid)) => (uid, 0, "/".to_string(), None),
        // Root works without a passwd file, as 0:0 with home /.
        (None, Err(_)) if user_part == "root" => (0, 0, "/".to_string(), None),
        (None, Err(_)) => return Err(UserError::UnknownUser { name: user_part.to_string() }),
    };

    if let Some(group_part) = group_part.filter(|group_part| !group_part.is_empty()) {
        gid = match group_part.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => group_entries(group)
                .find(|entry| entry.name == group_part)
                .map(|entry| entry.gid)
                .ok_or_else(|| UserError::UnknownGroup { name: group_part.to_string() })?,
        };
    }

    let mut groups = Vec::new();
    if let Some(name) = name {
        for entry in group_entries(group) {
            if entry.members.contains(&name) && !groups.contains(&entry.gid) {
                groups.push(entry.gid);
            }
        }
    }
    Ok(ExecUser { uid, gid, groups, home })
}

/// `PATH` given to processes of uid 0 that set none.
pub const ROOT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// `PATH` given to processes of other users that set none.
pub const USER_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

fn variable_name(entry: &str) -> &str {
    entry.split_once('=').map_or(entry, |(name, _)| name)
}

/// Builds a process environment as Garden does. Container env comes first,
/// then process env, and each name is kept only at its last occurrence.
/// `PATH`, `USER` and `HOME` are appended when missing.
pub fn build_env(container_env: &[String], process_env: &[String], user_field: &str, exec_user: &ExecUser) -> Vec<String> {
    let all: Vec<&String> = container_env.iter().chain(process_env).collect();
    let mut env = Vec::new();
    for (index, entry) in all.iter().enumerate() {
        let name = variable_name(entry);
        let later = all[index + 1..].iter().any(|other| variable_name(other) == name);
        if !later {
            env.push((*entry).clone());
        }
    }

    let has = |env: &[String], wanted: &str| env.iter().any(|entry| variable_name(entry) == wanted);
    if !has(&env, "PATH") {
        let path = if exec_user.uid == 0 { ROOT_PATH } else { USER_PATH };
        env.push(format!("PATH={path}"));
    }
    if !has(&env, "USER") {
        let user = if user_field.is_empty() { "root" } else { user_field };
        env.push(format!("USER={user}"));
    }
    if !has(&env, "HOME") {
        env.push(format!("HOME={}", exec_user.home));
    }
    env
}

/// Returns the value of `name` in an environment list.
pub fn env_value<'a>(env: &'a [String], name: &str) -> Option<&'a str> {
    env.iter().find_map(|entry| entry.split_once('=').filter(|(key, _)| *key == name).map(|(_, value)| value))
}

/// Returns the container hostname for a handle: the handle, or its last 49
/// characters when longer (the kernel allows 64 bytes; Garden uses 49).
pub fn hostname_for(handle: &str) -> String {
    let chars: Vec<char> = handle.chars().collect();
    let start = chars.len().saturating_sub(49);
    chars[start..].iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n\
        operator:x:37:37:Operator:/var:/bin/false\n\
        alice:x:1001:1001:alice:/home/alice:/bin/sh\n";
    const GROUP: &str = "root:x:0:\nwheel:x:10:root\nalice:x:1001:\nstaff:x:50:alice,bob\n";

    fn resolve(user: &str) -> Result<ExecUser, UserError> {
        resolve_user(user, Some(PASSWD), Some(GROUP))
    }

    #[test]
    fn empty_user_is_root_with_wheel() {
        let user = resolve("").unwrap();
        assert_eq!((user.uid, user.gid), (0, 0));
        assert_eq!(user.groups, vec![10]);
        assert_eq!(user.home, "/root");
    }

    #[test]
    fn names_and_groups_resolve() {
        let alice = resolve("alice").unwrap();
        assert_eq!((alice.uid, alice.gid, alice.home.as_str()), (1001, 1001, "/home/alice"));
        assert_eq!(alice.groups, vec![50]);
        assert_eq!(resolve("alice:staff").unwrap().gid, 50);
        assert_eq!(resolve("operator").unwrap().uid, 37);
    }

    #[test]
    fn numeric_ids_need_no_entry() {
        let user = resolve("1000000000:1000000000").unwrap();
        assert_eq!((user.uid, user.gid), (1000000000, 1000000000));
        assert!(user.groups.is_empty());
        assert_eq!(user.home, "/");
        let bare = resolve("4242").unwrap();
        assert_eq!((bare.uid, bare.gid), (4242, 0));
        assert_eq!(resolve("1001:1002").unwrap().gid, 1002);
        assert_eq!(resolve("1001").unwrap().home, "/home/alice");
    }

    #[test]
    fn unknown_names_fail_with_garden_message() {
        assert_eq!(
            resolve("mallory").unwrap_err().to_string(),
            "unable to find user mallory: no matching entries in passwd file"
        );
        assert_eq!(
            resolve("alice:nogroup").unwrap_err().to_string(),
            "unable to find group nogroup: no matching entries in group file"
        );
    }

    #[test]
    fn root_works_without_passwd_file() {
        let user = resolve_user("root", None, None).unwrap();
        assert_eq!((user.uid, user.gid, user.home.as_str()), (0, 0, "/"));
        assert!(resolve_user("alice", None, None).is_err());
    }

    fn strings(values: &[&str]) -> Vec<String> {
        values.iter().map(|value| value.to_string()).collect()
    }

    #[test]
    fn env_keeps_last_occurrence_in_place() {
        let user = resolve("").unwrap();
        let env = build_env(
            &strings(&["CONTAINER_ENV=1", "TEST=hi"]),
            &strings(&["TEST=hello", "FRUIT=banana"]),
            "",
            &user,
        );
        assert_eq!(env, strings(&["CONTAINER_ENV=1", "TEST=hello", "FRUIT=banana", &format!("PATH={ROOT_PATH}"), "USER=root", "HOME=/root"]));
    }

    #[test]
    fn env_defaults_follow_user() {
        let alice = resolve("alice").unwrap();
        let env = build_env(&strings(&["APATH=x", "USER=container"]), &[], "alice", &alice);
        assert_eq!(env, strings(&["APATH=x", "USER=container", &format!("PATH={USER_PATH}"), "HOME=/home/alice"]));
        assert_eq!(env_value(&env, "PATH"), Some(USER_PATH));
    }

    #[test]
    fn hostname_keeps_last_49_characters() {
        assert_eq!(
            hostname_for("7132-ec774112a9cd-101f8293-230e-4fa8-4138-e8244e6dcfa1"),
            "ec774112a9cd-101f8293-230e-4fa8-4138-e8244e6dcfa1"
        );
        assert_eq!(hostname_for("short"), "short");
    }
}
