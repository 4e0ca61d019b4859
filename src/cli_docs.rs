//! The documentation made from the one clap definition, and the checks that keep README
//! in step with it.
//!
//! # Theory of operation
//!
//! [`crate::conf::Cli`] is the single source of the command line. The tests below walk
//! its whole command tree (attach mode, run mode, every subcommand at any depth, so that
//! subcommands added later are covered without touching this file) and compare it with
//! README.md:
//!
//! - every option `--help` shows (long and short names, `--help` and `--version`
//!   included; hidden ones excluded) is listed in the first column of a README table
//!   headed `| option | meaning |`, and every option such a table lists exists in the
//!   clap definition. Options of other programs (pasta's own getopt-style command line,
//!   RootlessKit's, podman's) belong in tables with another header, e.g.
//!   `| pasta option | meaning |`;
//! - every subcommand is named in README as `usernet PATH` (e.g. `usernet ports add`).
//!
//! The man pages (clap_mangen) and the shell completions (clap_complete) are generated
//! from the same definition at run time: `usernet man` prints `usernet(1)`, `usernet man
//! --dir DIR` writes it and one page per subcommand (`usernet-run.1`,
//! `usernet-ports-add.1`, ...), and `usernet completions bash|zsh|fish` prints a
//! completion script. A test renders them all and looks for every option `--help` shows,
//! so that they cannot drift from it.

use std::io::{self, Write};
use std::path::Path;

use clap::CommandFactory;

use crate::conf::Cli;

/// `usernet man`: `usernet(1)` on `out`, or with `dir` every page written there.
///
/// # Errors
/// Errors of writing.
pub fn man(dir: Option<&Path>, out: &mut dyn Write) -> io::Result<()> {
    let cmd = Cli::command();
    match dir {
        Some(dir) => {
            std::fs::create_dir_all(dir)?;
            clap_mangen::generate_to(cmd, dir)
        }
        None => clap_mangen::Man::new(cmd).render(out),
    }
}

/// `usernet completions SHELL`: the completion script on `out`.
pub fn completions(shell: clap_complete::Shell, out: &mut dyn Write) {
    clap_complete::generate(shell, &mut Cli::command(), "usernet", out);
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use clap::CommandFactory;

    use crate::conf::Cli;

    const README: &str = include_str!("../README.md");

    /// Every command of the tree with its path, the root first; clap's generated `help`
    /// subcommands are left out.
    fn commands() -> Vec<(String, clap::Command)> {
        let mut root = Cli::command();
        root.build();
        let mut out = Vec::new();
        let mut todo = vec![("usernet".to_owned(), root)];
        while let Some((path, cmd)) = todo.pop() {
            for sub in cmd.get_subcommands() {
                if sub.get_name() != "help" {
                    todo.push((format!("{path} {}", sub.get_name()), sub.clone()));
                }
            }
            out.push((path, cmd));
        }
        out
    }

    /// The option names `--help` shows for `cmd`: `--long` and `-s`.
    fn shown_options(cmd: &clap::Command) -> Vec<String> {
        let mut names = Vec::new();
        for arg in cmd.get_arguments().filter(|a| !a.is_hide_set()) {
            if let Some(long) = arg.get_long() {
                names.push(format!("--{long}"));
            }
            if let Some(short) = arg.get_short() {
                names.push(format!("-{short}"));
            }
        }
        names
    }

    /// Every name of `cmd`'s options, hidden aliases included.
    fn all_names(cmd: &clap::Command) -> Vec<String> {
        let mut names = shown_options(cmd);
        for arg in cmd.get_arguments() {
            for alias in arg.get_all_aliases().into_iter().flatten() {
                names.push(format!("--{alias}"));
            }
            for alias in arg.get_all_short_aliases().into_iter().flatten() {
                names.push(format!("-{alias}"));
            }
        }
        names
    }

    /// Option names (`--long`, `-s`) in the first cell of the rows of README's tables
    /// headed `| option | meaning |`.
    fn readme_table_options() -> BTreeSet<String> {
        let mut names = BTreeSet::new();
        let mut in_table = false;
        for line in README.lines() {
            let line = line.trim();
            if !line.starts_with('|') {
                in_table = false;
                continue;
            }
            if line.starts_with("| option | meaning |") {
                in_table = true;
                continue;
            }
            if !in_table {
                continue;
            }
            let first = line.split(" | ").next().unwrap_or("");
            let tokens = first.split(|c: char| !(c.is_ascii_alphanumeric() || c == '-'));
            for token in tokens {
                let long = token.starts_with("--")
                    && token
                        .as_bytes()
                        .get(2)
                        .is_some_and(u8::is_ascii_alphanumeric);
                let short = token.len() == 2
                    && token.starts_with('-')
                    && token.as_bytes()[1].is_ascii_alphanumeric();
                if long || short {
                    names.insert(token.to_owned());
                }
            }
        }
        names
    }

    #[test]
    fn every_option_in_help_is_in_readme_and_back() {
        let documented = readme_table_options();
        let mut known = BTreeSet::new();
        let mut missing = Vec::new();
        for (path, cmd) in commands() {
            for name in shown_options(&cmd) {
                if !documented.contains(&name) {
                    missing.push(format!("{name} (`{path} --help`)"));
                }
            }
            known.extend(all_names(&cmd));
        }
        assert!(
            missing.is_empty(),
            "options in --help but in no README table headed `| option | meaning |`: {}",
            missing.join(", ")
        );
        let unknown: Vec<&String> = documented.difference(&known).collect();
        assert!(
            unknown.is_empty(),
            "README's `| option | meaning |` tables list options that the clap definition does \
             not have: {unknown:?} (options of other programs, such as pasta's, belong in a \
             table with another header, e.g. `| pasta option | meaning |`)"
        );
    }

    #[test]
    fn every_subcommand_is_in_readme() {
        let missing: Vec<String> = commands()
            .into_iter()
            .map(|(path, _)| path)
            .filter(|path| !README.contains(path.as_str()))
            .collect();
        assert!(
            missing.is_empty(),
            "subcommands README does not name: {missing:?}"
        );
    }

    /// Every page `usernet man --dir` writes, rendered.
    fn man_pages() -> Vec<(String, String)> {
        let dir = std::env::temp_dir().join(format!("usernet-man-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        super::man(Some(&dir), &mut std::io::sink()).unwrap();
        let mut pages: Vec<(String, String)> = std::fs::read_dir(&dir)
            .unwrap()
            .flatten()
            .map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                (name, std::fs::read_to_string(e.path()).unwrap())
            })
            .collect();
        let _ = std::fs::remove_dir_all(&dir);
        pages.sort();
        pages
    }

    /// roff escapes `-` as `\-`; undo it to look for option names.
    fn unroff(page: &str) -> String {
        page.replace("\\-", "-")
    }

    #[test]
    fn man_pages_name_every_command_and_option_of_help() {
        let pages = man_pages();
        let mut stdout = Vec::new();
        super::man(None, &mut stdout).unwrap();
        let root = String::from_utf8(stdout).unwrap();
        let root = unroff(&root);
        assert!(root.starts_with(".ie"), "not roff: {root:.40}");
        for name in shown_options(&commands()[0].1) {
            assert!(root.contains(&name), "`usernet man` lacks {name}");
        }
        assert!(
            root.contains("usernet-run(1)"),
            "`usernet man` does not point at usernet-run(1)"
        );
        for (path, cmd) in commands() {
            let file = format!("{}.1", path.replace(' ', "-"));
            let page = pages
                .iter()
                .find(|(n, _)| *n == file)
                .map(|(_, p)| unroff(p))
                .unwrap_or_else(|| panic!("no man page {file} for `{path}`"));
            for name in shown_options(&cmd) {
                assert!(page.contains(&name), "{file} lacks {name}");
            }
        }
    }

    #[test]
    fn completions_know_every_subcommand_and_long_option() {
        for shell in [
            clap_complete::Shell::Bash,
            clap_complete::Shell::Zsh,
            clap_complete::Shell::Fish,
        ] {
            let mut out = Vec::new();
            super::completions(shell, &mut out);
            let script = String::from_utf8(out).unwrap();
            for (path, cmd) in commands() {
                let last = path.rsplit(' ').next().unwrap_or("");
                assert!(script.contains(last), "{shell} completion lacks `{path}`");
                for arg in cmd.get_arguments().filter(|a| !a.is_hide_set()) {
                    if let Some(long) = arg.get_long() {
                        // fish writes `-l name`, bash and zsh `--name`.
                        let found = script.contains(&format!("--{long}"))
                            || script.contains(&format!("-l {long}"));
                        assert!(found, "{shell} completion lacks --{long} of `{path}`");
                    }
                }
            }
        }
    }

    /// README stands alone: no links out of the repository's tree, no issue numbers.
    #[test]
    fn readme_points_at_nothing_outside_the_repository() {
        for (i, line) in README.lines().enumerate() {
            for bad in [
                "../",
                "shared/docs",
                "compat.md",
                "compat-pasta.md",
                "design.md",
            ] {
                assert!(
                    !line.contains(bad),
                    "README line {}: {bad:?} in {line:?}",
                    i + 1
                );
            }
            let lower = line.to_ascii_lowercase();
            for (at, _) in lower.match_indices("issue") {
                let rest = lower[at + 5..].trim_start_matches([' ', '#', 's']);
                assert!(
                    !rest.starts_with(|c: char| c.is_ascii_digit()),
                    "README line {}: an issue number in {line:?}",
                    i + 1
                );
            }
        }
    }

    #[test]
    fn readme_table_parser_sees_options() {
        let names = readme_table_options();
        for name in ["--mtu", "-m", "--help", "-h"] {
            assert!(names.contains(name), "{name} not found in {names:?}");
        }
        assert!(!names.contains("-END"));
    }
}
