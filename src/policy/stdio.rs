//! An `[[upstream]]` that is a stdio server: `command = [...]` and its settings, checked at
//! load like every other field (the program must exist and be executable now, not at the
//! first agent's initialize).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use toml::Spanned;

use super::PolicyError;
use super::fields::{At, Env, RawUpstream, expand_env};
use crate::upstream::Transport;
use crate::upstream::process::{INHERITED, Spec};
use crate::upstream::stdio::{Options, Stdio};

/// The stdio transport an `[[upstream]]` table describes, `None` when it has no `command`.
pub(super) fn transport(
    u: &RawUpstream,
    policy: &Path,
    env: &dyn Env,
    at: &At<'_>,
) -> Result<Option<Transport>, PolicyError> {
    let name = u.name.get_ref();
    let Some(command) = &u.command else {
        // The process settings belong with a command.
        let stray = [
            ("upstream.env", u.env.values().next().map(Spanned::span)),
            ("upstream.cwd", u.cwd.as_ref().map(Spanned::span)),
            ("upstream.max_processes", span(&u.max_processes)),
            ("upstream.idle_timeout_s", span(&u.idle_timeout_s)),
            ("upstream.startup_timeout_s", span(&u.startup_timeout_s)),
            ("upstream.share", u.share.as_ref().map(Spanned::span)),
        ];
        if let Some((field, s)) = stray.into_iter().find(|(_, s)| s.is_some()) {
            return Err(at(
                s,
                field,
                format!("upstream {name:?}: {field} is for stdio upstreams (command = [...])"),
            ));
        }
        return Ok(None);
    };
    let here = Some(command.span());
    if let Some(url) = &u.url {
        return Err(at(
            Some(url.span()),
            "upstream.url",
            format!("upstream {name:?} has both url and command: it is one or the other"),
        ));
    }
    let network_only = [
        (
            "upstream.headers",
            u.headers.values().next().map(Spanned::span),
        ),
        ("upstream.ca_file", u.ca_file.as_ref().map(Spanned::span)),
        (
            "upstream.client_cert_file",
            u.client_cert_file.as_ref().map(Spanned::span),
        ),
        (
            "upstream.client_key_file",
            u.client_key_file.as_ref().map(Spanned::span),
        ),
        (
            "upstream.tls_server_name",
            u.tls_server_name.as_ref().map(Spanned::span),
        ),
    ];
    if let Some((field, s)) = network_only.into_iter().find(|(_, s)| s.is_some()) {
        let hint = if field == "upstream.headers" {
            "; give a stdio server its credentials with env = { NAME = \"${VAR}\" }"
        } else {
            ""
        };
        return Err(at(
            s,
            field,
            format!("upstream {name:?} is a stdio server: {field} is for url upstreams{hint}"),
        ));
    }
    let words = command.get_ref();
    let Some(program) = words.first() else {
        return Err(at(
            here,
            "upstream.command",
            "is empty: name the program to run".into(),
        ));
    };
    if words.iter().any(|w| w.contains('\0')) {
        return Err(at(here, "upstream.command", "contains a NUL byte".into()));
    }
    let dir = policy.parent().unwrap_or(Path::new("."));
    let cwd = match &u.cwd {
        None => None,
        Some(c) => {
            let path = dir.join(c.get_ref());
            if !path.is_dir() {
                return Err(at(
                    Some(c.span()),
                    "upstream.cwd",
                    format!("{} is not a directory", path.display()),
                ));
            }
            Some(path)
        }
    };
    let mut vars = Vec::new();
    for (var, value) in &u.env {
        let field = format!("upstream.env.{var}");
        if var.is_empty() || var.contains(['=', '\0']) {
            return Err(at(
                Some(value.span()),
                &field,
                format!("{var:?} is not a variable name"),
            ));
        }
        let expanded =
            expand_env(value.get_ref(), env).map_err(|m| at(Some(value.span()), &field, m))?;
        if expanded.contains('\0') {
            return Err(at(Some(value.span()), &field, "contains a NUL byte".into()));
        }
        vars.push((var.clone(), expanded));
    }
    // The PATH the child will search: its own if the upstream sets one, else scopegate's.
    let path_var = vars
        .iter()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| v.clone())
        .or_else(|| {
            INHERITED
                .contains(&"PATH")
                .then(|| std::env::var("PATH").ok())
                .flatten()
        });
    let resolved = find_program(program, dir, path_var.as_deref()).ok_or_else(|| {
        at(
            here,
            "upstream.command",
            format!(
                "upstream {name:?}: {program:?} is not an executable file{}",
                if program.contains('/') {
                    String::new()
                } else {
                    " on PATH".into()
                }
            ),
        )
    })?;
    let mut command_line = words.clone();
    command_line[0] = resolved.to_string_lossy().into_owned();
    let defaults = Options::default();
    let seconds = |v: &Option<Spanned<i64>>, field: &str, max: i64, default: Duration| match v {
        None => Ok(default),
        Some(s) if (1..=max).contains(s.get_ref()) => Ok(Duration::from_secs(*s.get_ref() as u64)),
        Some(s) => Err(at(
            Some(s.span()),
            field,
            format!("must be 1 to {max} seconds"),
        )),
    };
    let max_processes = match &u.max_processes {
        None => defaults.max_processes,
        Some(s) if (1..=100_000).contains(s.get_ref()) => *s.get_ref() as usize,
        Some(s) => {
            return Err(at(
                Some(s.span()),
                "upstream.max_processes",
                "must be 1 to 100000".into(),
            ));
        }
    };
    let options = Options {
        share: u.share.as_ref().is_some_and(|s| *s.get_ref()),
        max_processes,
        idle_timeout: seconds(
            &u.idle_timeout_s,
            "upstream.idle_timeout_s",
            7 * 24 * 3600,
            defaults.idle_timeout,
        )?,
        startup_timeout: seconds(
            &u.startup_timeout_s,
            "upstream.startup_timeout_s",
            3600,
            defaults.startup_timeout,
        )?,
    };
    let spec = Spec {
        command: command_line,
        env: vars,
        cwd,
    };
    Ok(Some(Transport::Stdio(Arc::new(Stdio::new(
        name, spec, options,
    )))))
}

fn span<T>(v: &Option<Spanned<T>>) -> Option<std::ops::Range<usize>> {
    v.as_ref().map(Spanned::span)
}

/// The program as an absolute path: a path is taken relative to the policy file's directory,
/// a bare name is looked up on `path`. `None` unless it is an executable file.
fn find_program(program: &str, dir: &Path, path: Option<&str>) -> Option<PathBuf> {
    let executable = |p: &Path| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if program.contains('/') {
        let p = dir.join(program);
        return executable(&p).then_some(p);
    }
    path?
        .split(':')
        .filter(|d| !d.is_empty())
        .map(|d| Path::new(d).join(program))
        .find(|p| executable(p))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Policy;
    use std::collections::HashMap;

    fn load(upstream: &str) -> Result<Policy, PolicyError> {
        let text = format!("[[upstream]]\nname = \"s\"\n{upstream}\n");
        let env = HashMap::from([("TOKEN".to_string(), "t0ken".to_string())]);
        Policy::parse(Path::new("/etc/policy.toml"), &text, &[], &env)
    }

    fn error(upstream: &str) -> String {
        let Err(e) = load(upstream) else {
            panic!("{upstream:?} must be refused");
        };
        format!("{} {}", e.field, e.message)
    }

    const FULL: &str = "command = [\"sh\", \"-c\", \"cat\"]\nenv = { API_TOKEN = \"${TOKEN}\" }\n\
                        cwd = \"/tmp\"\nmax_processes = 3\nidle_timeout_s = 5\n\
                        startup_timeout_s = 7\nshare = true";

    #[test]
    fn a_stdio_upstream_loads_with_its_settings() {
        let p = load(FULL).unwrap();
        let Transport::Stdio(s) = &p.upstreams()[0].transport else {
            panic!("not stdio");
        };
        let (spec, o) = (&s.hub.spec, &s.hub.options);
        assert!(
            Path::new(&spec.command[0]).is_absolute(),
            "{:?}",
            spec.command
        );
        assert_eq!(&spec.command[1..], ["-c", "cat"]);
        assert_eq!(spec.env, [("API_TOKEN".to_string(), "t0ken".to_string())]);
        assert_eq!(spec.cwd.as_deref(), Some(Path::new("/tmp")));
        assert_eq!(
            (
                o.share,
                o.max_processes,
                o.idle_timeout.as_secs(),
                o.startup_timeout.as_secs()
            ),
            (true, 3, 5, 7)
        );
        // The same upstream loaded again (a reload) keeps its hub: sessions carry on.
        let again = load(FULL).unwrap();
        let Transport::Stdio(t) = &again.upstreams()[0].transport else {
            panic!("not stdio");
        };
        assert!(Arc::ptr_eq(&s.hub, &t.hub));
    }

    #[test]
    fn mistakes_are_refused_at_load_naming_the_field() {
        let cases = [
            (
                "command = [\"no-such-program-here\"]",
                "\"no-such-program-here\" is not an executable file on PATH",
            ),
            (
                "command = [\"./missing.sh\"]",
                "\"./missing.sh\" is not an executable file",
            ),
            ("command = []", "upstream.command is empty"),
            (
                "command = [\"sh\"]\nurl = \"http://127.0.0.1:1/\"",
                "both url and command",
            ),
            (
                "command = [\"sh\"]\n[upstream.headers]\nX-Key = \"k\"",
                "upstream.headers is for url upstreams",
            ),
            (
                "command = [\"sh\"]\nca_file = \"ca.pem\"",
                "upstream.ca_file is for url upstreams",
            ),
            (
                "command = [\"sh\"]\nmax_processes = 0",
                "upstream.max_processes must be 1 to",
            ),
            (
                "command = [\"sh\"]\nidle_timeout_s = -1",
                "upstream.idle_timeout_s must be 1 to",
            ),
            (
                "command = [\"sh\"]\ncwd = \"/no/such/dir\"",
                "upstream.cwd /no/such/dir is not a directory",
            ),
            (
                "command = [\"sh\"]\nenv = { X = \"${UNSET_VAR}\" }",
                "UNSET_VAR is not set",
            ),
            (
                "url = \"http://127.0.0.1:1/\"\nshare = true",
                "upstream.share is for stdio upstreams",
            ),
            (
                "url = \"http://127.0.0.1:1/\"\nidle_timeout_s = 5",
                "upstream.idle_timeout_s is for stdio",
            ),
            ("", "has no url or command"),
        ];
        for (upstream, expected) in cases {
            let got = error(upstream);
            assert!(
                got.contains(expected),
                "{upstream:?}: {got:?} lacks {expected:?}"
            );
        }
    }

    #[test]
    fn programs_are_found_on_path_or_beside_the_policy() {
        let sh = find_program(
            "sh",
            Path::new("/nowhere"),
            Some("/nonexistent:/bin:/usr/bin"),
        );
        assert!(sh.is_some_and(|p| p.is_absolute()));
        assert_eq!(
            find_program("sh", Path::new("/"), Some("/nonexistent")),
            None
        );
        assert_eq!(find_program("sh", Path::new("/"), None), None);
        assert_eq!(
            find_program("bin/sh", Path::new("/"), None),
            Some(PathBuf::from("/bin/sh"))
        );
        // Not executable.
        let dir = std::env::temp_dir();
        let name = format!("scopegate-not-executable-{}", std::process::id());
        std::fs::write(dir.join(&name), "#!/bin/sh\n").unwrap();
        assert_eq!(find_program(&name, &dir, Some(dir.to_str().unwrap())), None);
        let _ = std::fs::remove_file(dir.join(&name));
    }
}
