//! Helpers shared by the unit tests of several modules.

/// An environment lookup over fixed `(name, value)` pairs, for the `*_from(lookup)` functions,
/// so tests never touch the process environment.
pub(crate) fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
    move |name| {
        vars.iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.to_string())
    }
}
