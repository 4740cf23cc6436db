//! A page's secrets, from a flag, the environment, a file or stdin: checked with otnd's rule and
//! never printed (a broken rule names the flag, not the value).

use std::{io::Read, path::Path};

use otnd::domain::PageSecret;

use crate::usage_error;

/// Where one secret comes from.
pub struct Source<'a> {
    /// The flag, for messages: `--access-token`.
    pub flag: &'static str,
    pub value: Option<&'a str>,
    pub file: Option<&'a Path>,
}

/// Reads every given secret; at most one may come from stdin (`-`). `None` for a secret not
/// given.
pub fn read<const N: usize>(sources: [Source<'_>; N]) -> [Option<String>; N] {
    let from_stdin = sources
        .iter()
        .filter(|s| s.file.is_some_and(|f| f == Path::new("-")))
        .count();
    if from_stdin > 1 {
        usage_error("only one secret can be read from stdin (`-`); give the others in files");
    }
    sources.map(|source| {
        let raw = match (source.value, source.file) {
            (Some(value), _) => value.to_string(),
            (None, Some(path)) => read_file(source.flag, path),
            (None, None) => return None,
        };
        if let Err(rule) = PageSecret::parse(&raw) {
            usage_error(format!("{}: {rule}", source.flag));
        }
        Some(raw)
    })
}

/// The file's content without the line break an editor or `echo` leaves at its end.
fn read_file(flag: &str, path: &Path) -> String {
    let mut text = String::new();
    let read = if path == Path::new("-") {
        std::io::stdin().read_to_string(&mut text)
    } else {
        std::fs::File::open(path).and_then(|mut f| f.read_to_string(&mut text))
    };
    if let Err(e) = read {
        usage_error(format!("{flag}-file: cannot read {}: {e}", path.display()));
    }
    text.trim_end_matches(['\n', '\r']).to_string()
}
