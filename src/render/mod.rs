//! Every text made from the model, one renderer per format: words for people ([`text`]: the
//! verdicts' reasons, a pair's details, the causes' sentences) and the report as JSON
//! ([`json`]). The CLI and the C ABI print what these give; none of them builds its own.

pub(crate) mod json;
pub(crate) mod text;
