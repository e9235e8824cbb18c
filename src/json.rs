//! A tiny strict JSON (RFC 8259) reader, and a writer ([`Object`], [`Json`]) that cannot
//! produce invalid JSON.
//!
//! Public because it is part of the report's API: [`JsonExtras`](crate::JsonExtras) takes
//! [`Json`] values (the vLLM cache's state, the doctor's explanations) that a program builds
//! with this writer, and a program reading p2pcheck's JSON outputs can use the same reader.
//!
//! Why not a crate: the only JSON we read is vLLM's small cache file (and our own `--json`
//! output in tests), and the crate keeps its dependencies to libc and once_cell.
//!
//! The reader accepts what Python's `json.loads` accepts, with these documented differences:
//!
//! * `NaN`, `Infinity` and `-Infinity` (Python extensions, not JSON) are rejected;
//! * nesting deeper than [`MAX_DEPTH`] is rejected (Python's limit is its recursion limit), so a
//!   hostile file cannot overflow the stack;
//! * a `\u` escape of an unpaired UTF-16 surrogate becomes U+FFFD (Python keeps the lone
//!   surrogate, which a Rust [`String`] cannot hold).
//!
//! Like Python, an object with a repeated key keeps the *last* value, at the position where the
//! key *first* appeared (that is what inserting into a `dict` does).

use std::collections::HashMap;
use std::fmt;

/// The deepest nesting of arrays and objects [`parse`] accepts.
pub const MAX_DEPTH: usize = 128;

/// A parsed JSON value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// `null`.
    Null,
    /// `true` or `false`.
    Bool(bool),
    /// A number, as its text in the input (checked against the JSON grammar, not converted:
    /// Python reads integers exactly, so no conversion here would be right for everyone).
    Number(String),
    /// A string, escapes decoded.
    String(String),
    /// An array.
    Array(Vec<Value>),
    /// An object's members in input order; keys are unique (see the module docs on repeats).
    Object(Vec<(String, Value)>),
}

impl Value {
    /// What kind of value this is, with an article, for messages: "an object", "null", ….
    pub fn kind(&self) -> &'static str {
        match self {
            Value::Null => "null",
            Value::Bool(_) => "a boolean",
            Value::Number(_) => "a number",
            Value::String(_) => "a string",
            Value::Array(_) => "an array",
            Value::Object(_) => "an object",
        }
    }
}

/// Why [`parse`] rejected its input: where, what it expected there, and what it found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError {
    /// Byte offset into the input of the offending character (the input's length at its end).
    pub offset: usize,
    /// What would have been valid there, e.g. `"',' or '}'"`.
    pub expected: &'static str,
    /// The character found instead; `None` at the end of the input.
    pub found: Option<char>,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid JSON at byte {}: expected {}, found ",
            self.offset, self.expected
        )?;
        match self.found {
            None => f.write_str("end of input"),
            Some(c) if c.is_control() => write!(f, "control character U+{:04X}", c as u32),
            Some(c) => write!(f, "{c:?}"),
        }
    }
}

impl std::error::Error for ParseError {}

/// Parses one JSON value filling all of `text` (whitespace around it allowed).
///
/// # Errors
///
/// [`ParseError`], with the offset, what was expected and what was found there, for text that
/// is not exactly one JSON value.
pub fn parse(text: &str) -> Result<Value, ParseError> {
    let mut p = Parser { text, pos: 0 };
    p.skip_ws();
    let value = p.value(0)?;
    p.skip_ws();
    if p.pos != text.len() {
        return Err(p.error("end of input"));
    }
    Ok(value)
}

/// `s` as a JSON string literal, quotes included ([`Json::string`] gives it to other modules).
/// Escapes what RFC 8259 requires (`"`, `\`
/// and control characters, the latter as `\n`-style short forms or lowercase `\u00xx` as Python
/// writes them); everything else, non-ASCII included, is written as is.
fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if c < ' ' => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A JSON text made by this module's writer ([`Object`], [`Json::array`], ...): valid JSON by
/// construction, whatever the strings in it hold.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Json(String);

impl Json {
    /// `null`.
    pub fn null() -> Json {
        Json("null".into())
    }

    /// A string, quotes included, escaping what RFC 8259 requires (`"`, `\` and control
    /// characters, the latter as `\n`-style short forms or lowercase `\u00xx` as Python writes
    /// them); everything else, non-ASCII included, is written as is.
    pub fn string(s: &str) -> Json {
        Json(escape(s))
    }

    /// `true` or `false`.
    pub fn bool(b: bool) -> Json {
        Json(b.to_string())
    }

    /// An unsigned number.
    pub fn uint(n: u64) -> Json {
        Json(n.to_string())
    }

    /// An array of strings, in order.
    pub fn strings<S: AsRef<str>>(items: impl IntoIterator<Item = S>) -> Json {
        Json::array(items.into_iter().map(|s| Json::string(s.as_ref())))
    }

    /// An array of `items`, in order.
    pub fn array(items: impl IntoIterator<Item = Json>) -> Json {
        let items: Vec<String> = items.into_iter().map(|j| j.0).collect();
        Json(format!("[{}]", items.join(",")))
    }

    /// The text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Json {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Writes one JSON object, member after member in the order given: the writer escapes the keys
/// and the strings and places the commas, and every value is one it writes or a [`Json`], so
/// the object is valid JSON whatever the strings hold.
#[derive(Debug, Default)]
pub struct Object(Vec<(String, String)>);

impl Object {
    /// An empty object.
    pub fn new() -> Object {
        Object::default()
    }

    /// Appends a member: `key` escaped, `value` already valid JSON (made here or a [`Json`]).
    fn member(&mut self, key: &str, value: &str) -> &mut Object {
        self.0.push((escape(key), value.to_string()));
        self
    }

    /// Whether no member was added.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// A member whose value is `value`.
    pub fn value(&mut self, key: &str, value: &Json) -> &mut Object {
        self.member(key, &value.0)
    }

    /// A string member.
    pub fn str(&mut self, key: &str, value: &str) -> &mut Object {
        self.member(key, &escape(value))
    }

    /// A string member, or `null`.
    pub fn opt_str(&mut self, key: &str, value: Option<&str>) -> &mut Object {
        self.member(key, &value.map_or_else(|| "null".into(), escape))
    }

    /// An unsigned number.
    pub fn uint(&mut self, key: &str, value: u64) -> &mut Object {
        self.member(key, &value.to_string())
    }

    /// A signed number.
    pub fn int(&mut self, key: &str, value: i64) -> &mut Object {
        self.member(key, &value.to_string())
    }

    /// A signed number, or `null`.
    pub fn opt_int(&mut self, key: &str, value: Option<i64>) -> &mut Object {
        self.member(key, &value.map_or_else(|| "null".into(), |v| v.to_string()))
    }

    /// A member whose value is `value`, or `null`.
    pub fn opt_value(&mut self, key: &str, value: Option<&Json>) -> &mut Object {
        self.member(key, value.map_or("null", Json::as_str))
    }

    /// An unsigned number, or `null`.
    pub fn opt_uint(&mut self, key: &str, value: Option<u64>) -> &mut Object {
        self.member(key, &value.map_or_else(|| "null".into(), |v| v.to_string()))
    }

    /// `true` or `false`.
    pub fn bool(&mut self, key: &str, value: bool) -> &mut Object {
        self.member(key, &value.to_string())
    }

    /// `true`, `false` or `null`.
    pub fn opt_bool(&mut self, key: &str, value: Option<bool>) -> &mut Object {
        self.member(key, &value.map_or_else(|| "null".into(), |v| v.to_string()))
    }

    /// A number with `decimals` digits after the point (`null` for a value that is not
    /// finite, which JSON cannot hold).
    pub fn fixed(&mut self, key: &str, value: f64, decimals: usize) -> &mut Object {
        let text = match value.is_finite() {
            true => format!("{value:.decimals$}"),
            false => "null".into(),
        };
        self.member(key, &text)
    }

    /// The object, on one line with no spaces.
    pub fn finish(&self) -> Json {
        let members: Vec<String> = self.0.iter().map(|(k, v)| format!("{k}:{v}")).collect();
        Json(format!("{{{}}}", members.join(",")))
    }

    /// The object as Python's `json.dump(obj, f, indent=4)` writes a flat one: each member on
    /// its own line, indented by four spaces, `": "` after the key; `{}` when empty. (Values
    /// are written as they are: a nested object or array stays on one line, where Python
    /// would indent it too.)
    pub fn finish_indented(&self) -> Json {
        if self.0.is_empty() {
            return Json("{}".into());
        }
        let members: Vec<String> = self
            .0
            .iter()
            .map(|(k, v)| format!("    {k}: {v}"))
            .collect();
        Json(format!("{{\n{}\n}}", members.join(",\n")))
    }
}

/// Recursive-descent parser over the input's bytes; `pos` is always on a char boundary.
struct Parser<'a> {
    text: &'a str,
    pos: usize,
}

impl Parser<'_> {
    fn peek(&self) -> Option<u8> {
        self.text.as_bytes().get(self.pos).copied()
    }

    fn error(&self, expected: &'static str) -> ParseError {
        ParseError {
            offset: self.pos,
            expected,
            found: self.text[self.pos..].chars().next(),
        }
    }

    /// Consumes `byte` or fails expecting `expected`.
    fn eat(&mut self, byte: u8, expected: &'static str) -> Result<(), ParseError> {
        if self.peek() == Some(byte) {
            self.pos += 1;
            Ok(())
        } else {
            Err(self.error(expected))
        }
    }

    fn skip_ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.pos += 1;
        }
    }

    /// A value at nesting `depth` (the number of arrays/objects around it).
    fn value(&mut self, depth: usize) -> Result<Value, ParseError> {
        match self.peek() {
            Some(b'{' | b'[') if depth == MAX_DEPTH => {
                Err(self.error("at most 128 nested arrays and objects"))
            }
            Some(b'{') => self.object(depth + 1),
            Some(b'[') => self.array(depth + 1),
            Some(b'"') => self.string().map(Value::String),
            Some(b'-' | b'0'..=b'9') => self.number(),
            Some(b't') => self.literal("true", Value::Bool(true)),
            Some(b'f') => self.literal("false", Value::Bool(false)),
            Some(b'n') => self.literal("null", Value::Null),
            _ => Err(self.error("a JSON value")),
        }
    }

    fn literal(&mut self, word: &'static str, value: Value) -> Result<Value, ParseError> {
        for &b in word.as_bytes() {
            self.eat(b, word)?;
        }
        Ok(value)
    }

    fn object(&mut self, depth: usize) -> Result<Value, ParseError> {
        self.pos += 1; // '{'
        let mut members: Vec<(String, Value)> = Vec::new();
        // Key -> index in `members`, so repeated keys cost O(1) each even in a hostile file.
        let mut index: HashMap<String, usize> = HashMap::new();
        self.skip_ws();
        if self.peek() == Some(b'}') {
            self.pos += 1;
            return Ok(Value::Object(members));
        }
        loop {
            if self.peek() != Some(b'"') {
                return Err(self.error("a string (an object key)"));
            }
            let key = self.string()?;
            self.skip_ws();
            self.eat(b':', "':'")?;
            self.skip_ws();
            let value = self.value(depth)?;
            match index.get(&key) {
                Some(&i) => members[i].1 = value,
                None => {
                    index.insert(key.clone(), members.len());
                    members.push((key, value));
                }
            }
            self.skip_ws();
            match self.peek() {
                Some(b',') => {
                    self.pos += 1;
                    self.skip_ws();
                }
                Some(b'}') => {
                    self.pos += 1;
                    return Ok(Value::Object(members));
                }
                _ => return Err(self.error("',' or '}'")),
            }
        }
    }

    fn array(&mut self, depth: usize) -> Result<Value, ParseError> {
        self.pos += 1; // '['
        let mut items = Vec::new();
        self.skip_ws();
        if self.peek() == Some(b']') {
            self.pos += 1;
            return Ok(Value::Array(items));
        }
        loop {
            items.push(self.value(depth)?);
            self.skip_ws();
            match self.peek() {
                Some(b',') => {
                    self.pos += 1;
                    self.skip_ws();
                }
                Some(b']') => {
                    self.pos += 1;
                    return Ok(Value::Array(items));
                }
                _ => return Err(self.error("',' or ']'")),
            }
        }
    }

    /// `-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?`
    fn number(&mut self) -> Result<Value, ParseError> {
        let start = self.pos;
        if self.peek() == Some(b'-') {
            self.pos += 1;
        }
        match self.peek() {
            Some(b'0') => self.pos += 1,
            Some(b'1'..=b'9') => self.digits(),
            _ => return Err(self.error("a digit")),
        }
        if self.peek() == Some(b'.') {
            self.pos += 1;
            self.one_or_more_digits()?;
        }
        if matches!(self.peek(), Some(b'e' | b'E')) {
            self.pos += 1;
            if matches!(self.peek(), Some(b'+' | b'-')) {
                self.pos += 1;
            }
            self.one_or_more_digits()?;
        }
        Ok(Value::Number(self.text[start..self.pos].to_string()))
    }

    fn digits(&mut self) {
        while matches!(self.peek(), Some(b'0'..=b'9')) {
            self.pos += 1;
        }
    }

    fn one_or_more_digits(&mut self) -> Result<(), ParseError> {
        if !matches!(self.peek(), Some(b'0'..=b'9')) {
            return Err(self.error("a digit"));
        }
        self.digits();
        Ok(())
    }

    /// A string literal; `pos` is on its opening quote.
    fn string(&mut self) -> Result<String, ParseError> {
        self.pos += 1;
        let mut out = String::new();
        loop {
            // Copy the run of plain characters in one go. It ends at an ASCII byte (or the end),
            // so both ends are char boundaries.
            let run = self.text.as_bytes()[self.pos..]
                .iter()
                .position(|&b| b == b'"' || b == b'\\' || b < 0x20)
                .unwrap_or(self.text.len() - self.pos);
            out.push_str(&self.text[self.pos..self.pos + run]);
            self.pos += run;
            match self.peek() {
                Some(b'"') => {
                    self.pos += 1;
                    return Ok(out);
                }
                Some(b'\\') => {
                    self.pos += 1;
                    let c = self.escape()?;
                    out.push(c);
                }
                _ => return Err(self.error("a string character or '\"'")),
            }
        }
    }

    /// The escape after a backslash, decoded.
    fn escape(&mut self) -> Result<char, ParseError> {
        let c = match self.peek() {
            Some(b'"') => '"',
            Some(b'\\') => '\\',
            Some(b'/') => '/',
            Some(b'b') => '\u{8}',
            Some(b'f') => '\u{c}',
            Some(b'n') => '\n',
            Some(b'r') => '\r',
            Some(b't') => '\t',
            Some(b'u') => {
                self.pos += 1;
                return self.unicode_escape();
            }
            _ => return Err(self.error("an escape (one of \"\\/bfnrtu)")),
        };
        self.pos += 1;
        Ok(c)
    }

    /// The `XXXX` of a `\uXXXX` escape, joining a surrogate pair written as two escapes.
    fn unicode_escape(&mut self) -> Result<char, ParseError> {
        let unit = self.hex4()?;
        if (0xD800..0xDC00).contains(&unit) {
            // A high surrogate: take the low one if a `\uDC00`-`\uDFFF` escape follows.
            let rest = &self.text.as_bytes()[self.pos..];
            if rest.starts_with(b"\\u") {
                let save = self.pos;
                self.pos += 2;
                let low = self.hex4()?;
                if (0xDC00..0xE000).contains(&low) {
                    let c = 0x10000 + ((unit - 0xD800) << 10) + (low - 0xDC00);
                    return Ok(char::from_u32(c).unwrap_or(char::REPLACEMENT_CHARACTER));
                }
                self.pos = save; // not a pair: the next escape stands on its own
            }
        }
        Ok(char::from_u32(unit).unwrap_or(char::REPLACEMENT_CHARACTER))
    }

    fn hex4(&mut self) -> Result<u32, ParseError> {
        let mut unit = 0;
        for _ in 0..4 {
            let digit = self
                .peek()
                .and_then(|b| (b as char).to_digit(16))
                .ok_or_else(|| self.error("a hex digit"))?;
            unit = unit * 16 + digit;
            self.pos += 1;
        }
        Ok(unit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> ParseError {
        parse(text).expect_err(text)
    }

    fn s(v: &str) -> Value {
        Value::String(v.to_string())
    }

    fn num(v: &str) -> Value {
        Value::Number(v.to_string())
    }

    #[test]
    fn parses_every_kind_of_value() {
        let v = parse(r#" {"a": [1, -2.5e+3, true, false, null, "x", {}, []], "b": {"c": 0}} "#)
            .unwrap();
        let expected = Value::Object(vec![
            (
                "a".into(),
                Value::Array(vec![
                    num("1"),
                    num("-2.5e+3"),
                    Value::Bool(true),
                    Value::Bool(false),
                    Value::Null,
                    s("x"),
                    Value::Object(vec![]),
                    Value::Array(vec![]),
                ]),
            ),
            ("b".into(), Value::Object(vec![("c".into(), num("0"))])),
        ]);
        assert_eq!(v, expected);
        assert_eq!(parse("\t\r\n 7 \n").unwrap(), num("7"));
    }

    #[test]
    fn numbers_follow_the_grammar() {
        for ok in [
            "0",
            "-0",
            "12",
            "1.5",
            "1e5",
            "1E-5",
            "-0.0e+0",
            "123456789012345678901234",
        ] {
            assert_eq!(parse(ok).unwrap(), num(ok), "{ok}");
        }
        for (bad, offset, expected) in [
            ("-", 1, "a digit"),
            ("1.", 2, "a digit"),
            ("1e", 2, "a digit"),
            ("1e+", 3, "a digit"),
            (".5", 0, "a JSON value"),
            ("+1", 0, "a JSON value"),
            ("01", 1, "end of input"),
            ("-a", 1, "a digit"),
        ] {
            let e = err(bad);
            assert_eq!((e.offset, e.expected), (offset, expected), "{bad}: {e}");
        }
    }

    #[test]
    fn python_extensions_are_rejected() {
        for bad in [
            "NaN",
            "Infinity",
            "-Infinity",
            "[1,]",
            "{\"a\":1,}",
            "'a'",
            "// x\n1",
        ] {
            err(bad);
        }
    }

    #[test]
    fn string_escapes_are_decoded() {
        let v = parse(r#""q\" b\\ s\/ \b\f\n\r\t \u0041\u00e9\u20AC \ud83d\ude00 é€😀""#);
        let v = v.unwrap();
        assert_eq!(v, s("q\" b\\ s/ \u{8}\u{c}\n\r\t Aé€ 😀 é€😀"));
    }

    #[test]
    fn lone_surrogates_become_replacement_characters() {
        assert_eq!(parse(r#""\ud800""#).unwrap(), s("\u{fffd}"));
        assert_eq!(parse(r#""\udc00x""#).unwrap(), s("\u{fffd}x"));
        // A high surrogate followed by a non-surrogate escape keeps that escape.
        assert_eq!(parse(r#""\ud800\u0041""#).unwrap(), s("\u{fffd}A"));
        assert_eq!(
            parse(r#""\ud800\ud800\udc00""#).unwrap(),
            s("\u{fffd}\u{10000}")
        );
    }

    #[test]
    fn escape_writes_what_python_writes() {
        // json.dumps(s, ensure_ascii=False) for each s.
        assert_eq!(escape(""), r#""""#);
        assert_eq!(escape("0->1"), r#""0->1""#);
        assert_eq!(escape("a\"b\\c/d"), r#""a\"b\\c/d""#);
        assert_eq!(escape("\n\t\r\u{8}\u{c}"), r#""\n\t\r\b\f""#);
        assert_eq!(escape("\u{0}\u{1f}\u{7f}"), "\"\\u0000\\u001f\u{7f}\"");
        assert_eq!(escape("é😀"), "\"é😀\"");
    }

    #[test]
    fn escape_round_trips() {
        let all: String = (0u32..0x300)
            .chain([0x20ac, 0x1f600])
            .filter_map(char::from_u32)
            .collect();
        for text in [all.as_str(), "", "plain", "\"\\\"\\"] {
            assert_eq!(parse(&escape(text)).unwrap(), s(text));
        }
    }

    #[test]
    fn repeated_keys_keep_the_last_value_at_the_first_position() {
        // Python: json.loads('{"a": 1, "b": 2, "a": 3}') == {"a": 3, "b": 2}, in that order.
        let v = parse(r#"{"a": 1, "b": 2, "a": 3}"#).unwrap();
        assert_eq!(
            v,
            Value::Object(vec![("a".into(), num("3")), ("b".into(), num("2"))])
        );
    }

    #[test]
    fn every_error_says_where_and_what() {
        for (bad, offset, expected, found) in [
            ("", 0, "a JSON value", None),
            ("   ", 3, "a JSON value", None),
            ("x", 0, "a JSON value", Some('x')),
            ("tru", 3, "true", None),
            ("trUe", 2, "true", Some('U')),
            ("nul", 3, "null", None),
            ("fals", 4, "false", None),
            ("{", 1, "a string (an object key)", None),
            ("{1:2}", 1, "a string (an object key)", Some('1')),
            ("{\"a\" 1}", 5, "':'", Some('1')),
            ("{\"a\":}", 5, "a JSON value", Some('}')),
            ("{\"a\":1 \"b\":2}", 7, "',' or '}'", Some('"')),
            ("[1 2]", 3, "',' or ']'", Some('2')),
            ("[1,", 3, "a JSON value", None),
            ("\"abc", 4, "a string character or '\"'", None),
            ("\"a\nb\"", 2, "a string character or '\"'", Some('\n')),
            ("\"\\x\"", 2, "an escape (one of \"\\/bfnrtu)", Some('x')),
            ("\"\\u12g4\"", 5, "a hex digit", Some('g')),
            ("\"\\ud800\\u12\"", 11, "a hex digit", Some('"')),
            ("1 2", 2, "end of input", Some('2')),
            ("{} x", 3, "end of input", Some('x')),
            ("\u{feff}{}", 0, "a JSON value", Some('\u{feff}')),
        ] {
            let e = err(bad);
            assert_eq!(
                e,
                ParseError {
                    offset,
                    expected,
                    found
                },
                "{bad:?}: {e}"
            );
        }
    }

    #[test]
    fn errors_display_offset_expectation_and_finding() {
        assert_eq!(
            err("[1 2]").to_string(),
            "invalid JSON at byte 3: expected ',' or ']', found '2'"
        );
        assert_eq!(
            err("").to_string(),
            "invalid JSON at byte 0: expected a JSON value, found end of input"
        );
        assert_eq!(
            err("\"\t\"").to_string(),
            "invalid JSON at byte 1: expected a string character or '\"', \
             found control character U+0009"
        );
    }

    #[test]
    fn nesting_is_bounded() {
        let ok = format!("{}{}", "[".repeat(MAX_DEPTH), "]".repeat(MAX_DEPTH));
        assert!(parse(&ok).is_ok());
        let deep = format!("{}{}", "[".repeat(MAX_DEPTH + 1), "]".repeat(MAX_DEPTH + 1));
        let e = err(&deep);
        assert_eq!((e.offset, e.found), (MAX_DEPTH, Some('[')));
        assert!(e.expected.contains(&MAX_DEPTH.to_string()), "{e}");
        let objects = "{\"a\":".repeat(MAX_DEPTH + 1);
        assert_eq!(err(&objects).found, Some('{'));
        // Far deeper than any stack would take is still just an error.
        assert!(parse(&"[".repeat(1_000_000)).is_err());
    }

    #[test]
    fn parses_what_python_json_dump_writes() {
        // json.dump({"0->0": True, "k": [1, None, "\u00e9\n"]}, f, indent=4)
        let text = r#"{
    "0->0": true,
    "k": [
        1,
        null,
        "\u00e9\n"
    ]
}"#;
        let v = parse(text).unwrap();
        assert_eq!(
            v,
            Value::Object(vec![
                ("0->0".into(), Value::Bool(true)),
                (
                    "k".into(),
                    Value::Array(vec![num("1"), Value::Null, s("é\n")])
                ),
            ])
        );
    }

    #[test]
    fn kinds_are_named() {
        let kinds: Vec<_> = ["null", "true", "1", "\"\"", "[]", "{}"]
            .iter()
            .map(|t| parse(t).unwrap().kind())
            .collect();
        assert_eq!(
            kinds,
            [
                "null",
                "a boolean",
                "a number",
                "a string",
                "an array",
                "an object"
            ]
        );
    }

    #[test]
    fn the_writer_gives_valid_json_whatever_the_strings_hold() {
        let hostile = "\"},{\"x\":1,\\\n\u{0}\u{1f}é\u{2028}";
        let inner = Object::new().str(hostile, hostile).finish();
        let text = Object::new()
            .str("s", hostile)
            .opt_str("none", None)
            .uint("n", u64::MAX)
            .opt_bool("b", Some(false))
            .fixed("f", 1.0 / 3.0, 4)
            .fixed("nan", f64::NAN, 4)
            .value("a", &Json::array([inner.clone(), Json::null()]))
            .finish();
        let Value::Object(members) = parse(text.as_str()).unwrap() else {
            panic!("{text}");
        };
        assert_eq!(members[0], ("s".into(), Value::String(hostile.into())));
        assert_eq!(members[4], ("f".into(), Value::Number("0.3333".into())));
        assert_eq!(members[5], ("nan".into(), Value::Null));
        assert_eq!(members.len(), 7);
    }

    #[test]
    fn the_writer_writes_each_kind_as_python_would() {
        let mut o = Object::new();
        assert!(o.is_empty());
        assert_eq!(o.finish().as_str(), "{}");
        assert_eq!(o.finish_indented().as_str(), "{}");
        let inner = Object::new().int("i", -3).finish();
        o.int("min", i64::MIN)
            .opt_int("none", None)
            .opt_int("some", Some(-1))
            .opt_value("v", Some(&inner))
            .opt_value("nv", None)
            .value("s", &Json::strings(["a\"", "\u{1}"]))
            .value("e", &Json::strings(Vec::<String>::new()));
        assert!(!o.is_empty());
        assert_eq!(
            o.finish().as_str(),
            "{\"min\":-9223372036854775808,\"none\":null,\"some\":-1,\"v\":{\"i\":-3},\
             \"nv\":null,\"s\":[\"a\\\"\",\"\\u0001\"],\"e\":[]}"
        );
        // json.dumps({"0->0": True, "k": None}, indent=4)
        let flat = Object::new()
            .bool("0->0", true)
            .opt_str("k", None)
            .finish_indented();
        assert_eq!(flat.as_str(), "{\n    \"0->0\": true,\n    \"k\": null\n}");
    }

    #[test]
    fn the_indented_object_is_valid_whatever_the_keys_hold() {
        let hostile = "\"},{\"x\":1,\\\n\u{0}\u{1f}é\u{2028}";
        let text = Object::new()
            .str(hostile, hostile)
            .value(hostile, &Json::strings([hostile]))
            .finish_indented();
        let parsed = parse(text.as_str()).unwrap_or_else(|e| panic!("{e}: {text}"));
        assert_eq!(
            parsed,
            Value::Object(vec![(hostile.into(), Value::Array(vec![s(hostile)]))])
        );
    }
}
