//! The target's apt sources, copied into the scratch state with every key
//! they name by path (`signed-by=` in one-line entries, `Signed-By:` in
//! deb822 `.sources` files) read under the target root, not on the
//! machine the command runs on: a key the target does not have, or a path
//! that leads out of it (through `..` or a symbolic link), is an error.
//! The keys are copied beside the copied sources, where apt's sandbox
//! user can read them.

use std::path::Path;

use super::super::payload::CliError;

/// How a key's path is read: under the target (or, in tests, marked).
type KeyMap<'a> = &'a dyn Fn(&str) -> Result<String, String>;
/// A rewriting of one sources file's text.
type Rewrite = fn(&str, KeyMap<'_>) -> Result<String, String>;

/// The path `key` (absolute, as the target sees it) names under `target`.
pub fn under(target: &Path, key: &str) -> Result<String, String> {
    let inside = target.join(key.trim_start_matches('/'));
    let real = std::fs::canonicalize(&inside)
        .map_err(|e| format!("its sources name the key {key}, which it does not have ({e})"))?;
    let root = std::fs::canonicalize(target).map_err(|e| e.to_string())?;
    if !real.starts_with(&root) {
        return Err(format!(
            "its sources name the key {key}, which leads out of it (to {})",
            real.display()
        ));
    }
    Ok(real.display().to_string())
}

/// Map each absolute path of a comma-separated `signed-by` value.
fn map_paths(value: &str, separators: &[char], map: KeyMap<'_>) -> Result<String, String> {
    let mut out = String::new();
    let mut rest = value;
    while !rest.is_empty() {
        let end = rest.find(separators).unwrap_or(rest.len());
        let (token, tail) = rest.split_at(end);
        out.push_str(&if token.starts_with('/') {
            map(token)?
        } else {
            token.to_string()
        });
        let sep_len = tail.chars().next().map_or(0, char::len_utf8);
        out.push_str(&tail[..sep_len]);
        rest = &tail[sep_len..];
    }
    Ok(out)
}

/// A one-line-style sources text (`sources.list`, `*.list`) with the
/// paths of its `signed-by=` options mapped by `map`.
pub fn rewrite_list(text: &str, map: KeyMap<'_>) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    for line in text.split_inclusive('\n') {
        let trimmed = line.trim_start();
        let is_entry = trimmed.starts_with("deb ") || trimmed.starts_with("deb-src ");
        match (is_entry, line.find('['), line.find(']')) {
            (true, Some(open), Some(close)) if open < close => {
                let options = line[open + 1..close]
                    .split_whitespace()
                    .map(|o| match o.split_once('=') {
                        Some((k, v)) if k.eq_ignore_ascii_case("signed-by") => {
                            Ok(format!("{k}={}", map_paths(v, &[','], map)?))
                        }
                        _ => Ok(o.to_string()),
                    })
                    .collect::<Result<Vec<_>, String>>()?;
                out.push_str(&line[..=open]);
                out.push(' ');
                out.push_str(&options.join(" "));
                out.push(' ');
                out.push_str(&line[close..]);
            }
            _ => out.push_str(line),
        }
    }
    Ok(out)
}

/// A deb822 `.sources` text with the paths of its `Signed-By:` fields
/// mapped by `map` (a key embedded in the field is left as it is).
pub fn rewrite_deb822(text: &str, map: KeyMap<'_>) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    for line in text.split_inclusive('\n') {
        match line.split_once(':') {
            Some((field, value))
                if field.trim().eq_ignore_ascii_case("signed-by")
                    && !field.starts_with([' ', '\t']) =>
            {
                out.push_str(field);
                out.push(':');
                out.push_str(&map_paths(value, &[' ', '\t', ',', '\n'], map)?);
            }
            _ => out.push_str(line),
        }
    }
    Ok(out)
}

/// Copy the target's `etc/apt/sources.list` and `sources.list.d` into
/// `into` (`sources.list`, `sources.list.d/`), keys read under the target.
pub fn copy(target: &Path, into: &Path) -> Result<(), CliError> {
    let refuse = |why: String| CliError::Usage(format!("--target {}: {why}", target.display()));
    let io = |p: &Path| {
        let p = p.display().to_string();
        move |source| CliError::Io { path: p, source }
    };
    // apt's gpgv method reads the keys as its sandbox user, who may not
    // reach into the target: each is copied beside the sources.
    let keys = into.join("keys");
    std::fs::create_dir_all(&keys).map_err(io(&keys))?;
    let copied = std::cell::Cell::new(0usize);
    let map = |key: &str| {
        let real = under(target, key)?;
        copied.set(copied.get() + 1);
        let name = Path::new(&real)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let copy = keys.join(format!("{}-{name}", copied.get()));
        std::fs::copy(&real, &copy).map_err(|e| format!("cannot copy the key {key}: {e}"))?;
        Ok(copy.display().to_string())
    };
    let parts = into.join("sources.list.d");
    std::fs::create_dir_all(&parts).map_err(io(&parts))?;
    let list = target.join("etc/apt/sources.list");
    let text = match std::fs::read_to_string(&list) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(io(&list)(e)),
    };
    let out = into.join("sources.list");
    std::fs::write(&out, rewrite_list(&text, &map).map_err(refuse)?).map_err(io(&out))?;
    let dir = target.join("etc/apt/sources.list.d");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Ok(());
    };
    for entry in entries.filter_map(Result::ok) {
        let name = entry.file_name().to_string_lossy().into_owned();
        let rewrite: Rewrite = if name.ends_with(".list") {
            rewrite_list
        } else if name.ends_with(".sources") {
            rewrite_deb822
        } else {
            continue;
        };
        let text = std::fs::read_to_string(entry.path()).map_err(io(&entry.path()))?;
        let out = parts.join(&name);
        std::fs::write(&out, rewrite(&text, &map).map_err(refuse)?).map_err(io(&out))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mark(key: &str) -> Result<String, String> {
        Ok(format!("/T{key}"))
    }

    #[test]
    fn signed_by_paths_are_read_under_the_target() {
        let list = "# comment [signed-by=/x]\ndeb [arch=amd64 signed-by=/usr/share/keyrings/a.gpg,/etc/b.gpg] http://deb.debian.org/debian bookworm main\ndeb http://deb.debian.org/debian-security bookworm-security main\ndeb-src [ signed-by=ABCDEF0123456789 ] http://x bookworm main\n";
        assert_eq!(
            rewrite_list(list, &mark).expect("rewritten"),
            "# comment [signed-by=/x]\ndeb [ arch=amd64 signed-by=/T/usr/share/keyrings/a.gpg,/T/etc/b.gpg ] http://deb.debian.org/debian bookworm main\ndeb http://deb.debian.org/debian-security bookworm-security main\ndeb-src [ signed-by=ABCDEF0123456789 ] http://x bookworm main\n"
        );
        let sources = "Types: deb\nURIs: http://deb.debian.org/debian\nSuites: bookworm\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\nTypes: deb\nURIs: http://example\nSigned-By:\n -----BEGIN PGP PUBLIC KEY BLOCK-----\n .\n /notapath\n";
        assert_eq!(
            rewrite_deb822(sources, &mark).expect("rewritten"),
            sources.replace("Signed-By: /usr/share", "Signed-By: /T/usr/share")
        );
    }

    #[test]
    fn a_key_outside_the_target_is_refused() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let target = tmp.path().join("root");
        std::fs::create_dir_all(target.join("usr/share/keyrings")).expect("mkdir");
        std::fs::write(target.join("usr/share/keyrings/a.gpg"), "key").expect("key");
        std::fs::write(tmp.path().join("host.gpg"), "key").expect("key");
        std::os::unix::fs::symlink(
            tmp.path().join("host.gpg"),
            target.join("usr/share/keyrings/link.gpg"),
        )
        .expect("link");
        let real = std::fs::canonicalize(&target).expect("real");
        assert_eq!(
            under(&target, "/usr/share/keyrings/a.gpg"),
            Ok(real.join("usr/share/keyrings/a.gpg").display().to_string())
        );
        assert!(
            under(&target, "/usr/share/keyrings/link.gpg")
                .is_err_and(|e| e.contains("which leads out of it")),
        );
        assert!(under(&target, "/../host.gpg").is_err_and(|e| e.contains("which leads out of it")));
        assert!(
            under(&target, "/usr/share/keyrings/none.gpg").is_err_and(|e| e.starts_with(
                "its sources name the key /usr/share/keyrings/none.gpg, which it does not have"
            ))
        );
    }
}
