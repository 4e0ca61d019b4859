//! Build script: names the git commit in `--version` (`USERNET_COMMIT`) when built from a
//! git checkout of this repository. From a tarball, without `git`, or inside someone
//! else's repository, it sets nothing and `--version` says `commit: unknown`.

use std::path::{Path, PathBuf};
use std::process::Command;

fn git(dir: &Path, args: &[&str]) -> Option<String> {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8(out.stdout).ok()?;
    Some(text.trim().to_owned())
}

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let Some(dir) = std::env::var_os("CARGO_MANIFEST_DIR").map(PathBuf::from) else {
        return;
    };
    // Only this repository's own checkout: a tarball unpacked inside another repository
    // must not take that repository's commit.
    let top = git(&dir, &["rev-parse", "--show-toplevel"]).map(PathBuf::from);
    let same = match (
        top.and_then(|t| t.canonicalize().ok()),
        dir.canonicalize().ok(),
    ) {
        (Some(top), Some(dir)) => top == dir,
        _ => false,
    };
    if !same {
        return;
    }
    let Some(commit) = git(&dir, &["rev-parse", "HEAD"]) else {
        return;
    };
    if commit.len() != 40 || !commit.bytes().all(|b| b.is_ascii_hexdigit()) {
        return;
    }
    println!("cargo:rustc-env=USERNET_COMMIT={commit}");
    // Build again when HEAD moves: HEAD itself (a checkout), the branch it names (a
    // commit), packed refs; in this checkout's git directory (a worktree has its own HEAD).
    let branch = git(&dir, &["symbolic-ref", "-q", "HEAD"]);
    let watched = [
        git(&dir, &["rev-parse", "--git-path", "HEAD"]),
        branch.and_then(|r| git(&dir, &["rev-parse", "--git-path", &r])),
        git(&dir, &["rev-parse", "--git-path", "packed-refs"]),
    ];
    for path in watched.into_iter().flatten() {
        let path = dir.join(path);
        if path.exists() {
            println!("cargo:rerun-if-changed={}", path.display());
        }
    }
}
