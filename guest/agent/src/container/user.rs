//! The `user` of a container process: `uid`, `uid:gid`, `name` or
//! `name:group`, resolved against the image's `/etc/passwd` and
//! `/etc/group` the way Docker does: a numeric uid needs no passwd entry
//! (its gid is then 0 unless given), a name does; supplementary groups are
//! the groups that list the user as a member.

/// Most supplementary groups applied (Linux allows 65536).
pub const MAX_GROUPS: usize = 256;

/// A user or group as written: a number or a name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdOrName {
    /// Numeric id.
    Id(u32),
    /// Name to look up.
    Name(String),
}

/// A parsed, not yet resolved, `user` field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserSpec {
    /// The user.
    pub user: IdOrName,
    /// The group, when given after `:`.
    pub group: Option<IdOrName>,
}

impl Default for UserSpec {
    fn default() -> Self {
        Self {
            user: IdOrName::Id(0),
            group: Some(IdOrName::Id(0)),
        }
    }
}

/// Credentials the process gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// Supplementary groups (the primary one included).
    pub groups: Vec<u32>,
    /// Home directory from passwd, when the user has an entry.
    pub home: Option<String>,
}

fn id_or_name(part: &str) -> Result<IdOrName, String> {
    if part.is_empty() {
        return Err("empty user or group".to_owned());
    }
    if part.bytes().all(|b| b.is_ascii_digit()) {
        // u32::MAX is (uid_t)-1, "no change" to setuid: never a real id.
        return match part.parse::<u32>() {
            Ok(id) if id != u32::MAX => Ok(IdOrName::Id(id)),
            _ => Err(format!("id {part} is out of range")),
        };
    }
    let valid = part.len() <= 64
        && !part.starts_with('-')
        && part
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b'$'));
    if valid {
        Ok(IdOrName::Name(part.to_owned()))
    } else {
        Err(format!(
            "{part:?} is neither an id nor a user or group name"
        ))
    }
}

impl UserSpec {
    /// Parses `uid`, `uid:gid`, `name`, `name:group` (mixed forms too).
    pub fn parse(text: &str) -> Result<Self, String> {
        let (user, group) = match text.split_once(':') {
            Some((user, group)) => (user, Some(group)),
            None => (text, None),
        };
        Ok(Self {
            user: id_or_name(user)?,
            group: group.map(id_or_name).transpose()?,
        })
    }

    /// Whether resolving needs the image's files at all.
    pub fn needs_lookup(&self) -> bool {
        !matches!(
            (&self.user, &self.group),
            (IdOrName::Id(_), Some(IdOrName::Id(_)))
        )
    }

    /// Resolves against the contents of the image's `/etc/passwd` and
    /// `/etc/group` (`None`: the file is absent).
    pub fn resolve(
        &self,
        passwd: Option<&str>,
        group: Option<&str>,
    ) -> Result<Credentials, String> {
        let users: Vec<PasswdEntry<'_>> = passwd.map(parse_passwd).unwrap_or_default();
        let groups: Vec<GroupEntry<'_>> = group.map(parse_group).unwrap_or_default();
        let entry = match &self.user {
            IdOrName::Id(uid) => users.iter().find(|u| u.uid == *uid),
            IdOrName::Name(name) => Some(
                users
                    .iter()
                    .find(|u| u.name == name)
                    .ok_or_else(|| format!("no user {name:?} in the image's /etc/passwd"))?,
            ),
        };
        let uid = match &self.user {
            IdOrName::Id(uid) => *uid,
            IdOrName::Name(_) => entry.map_or(0, |e| e.uid),
        };
        let gid = match &self.group {
            Some(IdOrName::Id(gid)) => *gid,
            Some(IdOrName::Name(name)) => {
                groups
                    .iter()
                    .find(|g| g.name == name)
                    .ok_or_else(|| format!("no group {name:?} in the image's /etc/group"))?
                    .gid
            }
            None => entry.map_or(0, |e| e.gid),
        };
        let mut supplementary = vec![gid];
        if let Some(entry) = entry {
            for g in &groups {
                if g.members.contains(&entry.name) && !supplementary.contains(&g.gid) {
                    supplementary.push(g.gid);
                }
            }
        }
        supplementary.truncate(MAX_GROUPS);
        Ok(Credentials {
            uid,
            gid,
            groups: supplementary,
            home: entry
                .map(|e| e.home.to_owned())
                .filter(|h| h.starts_with('/')),
        })
    }
}

#[derive(Debug)]
struct PasswdEntry<'a> {
    name: &'a str,
    uid: u32,
    gid: u32,
    home: &'a str,
}

#[derive(Debug)]
struct GroupEntry<'a> {
    name: &'a str,
    gid: u32,
    members: Vec<&'a str>,
}

/// `name:password:uid:gid:gecos:home:shell` lines; malformed ones skipped.
fn parse_passwd(text: &str) -> Vec<PasswdEntry<'_>> {
    text.lines()
        .filter_map(|line| {
            let mut f = line.split(':');
            let name = f.next()?;
            let _password = f.next()?;
            let uid = f.next()?.parse().ok()?;
            let gid = f.next()?.parse().ok()?;
            let _gecos = f.next()?;
            let home = f.next()?;
            (!name.is_empty()).then_some(PasswdEntry {
                name,
                uid,
                gid,
                home,
            })
        })
        .collect()
}

/// `name:password:gid:member,member` lines; malformed ones skipped.
fn parse_group(text: &str) -> Vec<GroupEntry<'_>> {
    text.lines()
        .filter_map(|line| {
            let mut f = line.split(':');
            let name = f.next()?;
            let _password = f.next()?;
            let gid = f.next()?.parse().ok()?;
            let members = f
                .next()
                .unwrap_or("")
                .split(',')
                .map(str::trim)
                .filter(|m| !m.is_empty())
                .collect();
            (!name.is_empty()).then_some(GroupEntry { name, gid, members })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n\
                          # comment\n\
                          broken line\n\
                          app:x:1000:1000:App:/home/app:/bin/sh\n\
                          nobody:x:65534:65534::/nonexistent:/usr/sbin/nologin\n";
    const GROUP: &str = "root:x:0:\nwheel:x:10:root,app\napp:x:1000:\naudio:x:29: app \n";

    fn resolve(user: &str) -> Result<Credentials, String> {
        UserSpec::parse(user)?.resolve(Some(PASSWD), Some(GROUP))
    }

    #[test]
    fn parses_the_forms() {
        assert_eq!(
            UserSpec::parse("1000").expect("uid"),
            UserSpec {
                user: IdOrName::Id(1000),
                group: None
            }
        );
        assert_eq!(
            UserSpec::parse("app:wheel").expect("names"),
            UserSpec {
                user: IdOrName::Name("app".into()),
                group: Some(IdOrName::Name("wheel".into()))
            }
        );
        for bad in [
            "",
            ":",
            "1000:",
            ":0",
            "a b",
            "4294967295",
            "99999999999",
            "-x",
            "a:b:c",
        ] {
            assert!(UserSpec::parse(bad).is_err(), "{bad:?}");
        }
        assert!(!UserSpec::parse("1:2").expect("ok").needs_lookup());
        assert!(UserSpec::parse("1").expect("ok").needs_lookup());
    }

    #[test]
    fn numeric_uid_takes_gid_and_groups_from_passwd() {
        let c = resolve("1000").expect("resolves");
        assert_eq!((c.uid, c.gid), (1000, 1000));
        assert_eq!(c.groups, [1000, 10, 29]);
        assert_eq!(c.home.as_deref(), Some("/home/app"));
    }

    #[test]
    fn numeric_uid_without_entry_is_gid_zero() {
        let c = resolve("4242").expect("resolves");
        assert_eq!((c.uid, c.gid, c.groups.as_slice()), (4242, 0, &[0][..]));
        assert_eq!(c.home, None);
        let c = UserSpec::parse("7")
            .expect("parse")
            .resolve(None, None)
            .expect("no files");
        assert_eq!((c.uid, c.gid), (7, 0));
    }

    #[test]
    fn names_are_looked_up() {
        let c = resolve("app:audio").expect("resolves");
        assert_eq!((c.uid, c.gid), (1000, 29));
        let c = resolve("nobody").expect("resolves");
        assert_eq!((c.uid, c.gid), (65534, 65534));
        assert_eq!(c.home.as_deref(), Some("/nonexistent"));
        let c = resolve("0:10").expect("resolves");
        assert_eq!((c.uid, c.gid), (0, 10));
        assert_eq!(
            c.groups,
            [10],
            "root is in wheel, which is its primary group now"
        );
    }

    #[test]
    fn unknown_names_are_errors() {
        assert!(resolve("ghost").expect_err("no user").contains("ghost"));
        assert!(resolve("app:ghosts")
            .expect_err("no group")
            .contains("ghosts"));
        assert!(UserSpec::parse("app")
            .expect("parse")
            .resolve(None, None)
            .is_err());
    }
}
