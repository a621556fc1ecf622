//! Tool calls out of what models really write. Hermes / Qwen models wrap a call in
//! `<tool_call>{"name": …, "arguments": {…}}</tool_call>`; small ones often write the same JSON
//! in a fenced ```json block or bare at the start of the answer; some write
//! `<function=name>{…}</function>`. The parser takes the answer piece by piece as it streams
//! and gives content and call deltas, holding back only what could still be the start of a
//! call, so a marker never leaks into `content`. The same parser runs over a whole answer for
//! non-streaming responses, so both give exactly the same calls.
//!
//! A call goes out whole, once its JSON has ended and [`ToolSet::check`] has passed it: a name
//! the request declared, arguments that are a JSON object fitting the tool's schema. A call
//! that fails the check (or is cut short by `max_tokens`) is given as the content it was
//! written as, so the client never receives a call it cannot execute. Re-parsing the (short)
//! text of the open call on each piece keeps the state machine small: the only state is the
//! open call's text.
//!
//! Small models also write calls as bare JSON objects, one per line; a `{` opens a call at the
//! start of the answer or of any line, and one that turns out not to be a call is content.

use std::sync::Arc;

use super::dialect::ToolFormat;
use super::request::{Tool, ToolChoice};
use super::toolset::ToolSet;
use crate::engine::Constraint;

/// The grammar that keeps tool calls valid, in the model's own format, or `None` when nothing
/// is constrained. `required` or a named function: the answer is one call (to one of `tools`,
/// or to that function) with arguments matching its parameter schema. `auto`: the model writes
/// freely until it starts a call with its format's marker; from there the call must be valid
/// (a lazy grammar). Errors name what is wrong with the request.
pub fn call_constraint(
    tools: &[Tool],
    choice: &ToolChoice,
    format: ToolFormat,
    parallel: bool,
) -> Result<Option<Constraint>, String> {
    let only = match choice {
        ToolChoice::None => return Ok(None),
        ToolChoice::Auto | ToolChoice::Required => None,
        ToolChoice::Function(name) => Some(name.as_str()),
    };
    let functions: Vec<&Tool> = tools
        .iter()
        .filter(|t| only.is_none_or(|n| t.name == n))
        .collect();
    if functions.is_empty() {
        return match (choice, only) {
            (ToolChoice::Auto, _) => Ok(None),
            (_, Some(n)) => Err(format!(
                "tool_choice names `{n}`, which is not among the tools"
            )),
            _ => Err("tool_choice `required` needs at least one tool".into()),
        };
    }
    let forced = *choice != ToolChoice::Auto;
    Ok(Some(grammar_for_calls(
        &functions, format, forced, parallel,
    )))
}

/// One call object per function in the format's key names, as a JSON schema.
fn grammar_for_calls(
    functions: &[&Tool],
    format: ToolFormat,
    forced: bool,
    parallel: bool,
) -> Constraint {
    use serde_json::json;
    let args_key = match format {
        ToolFormat::Llama3 => "parameters",
        ToolFormat::Hermes | ToolFormat::Mistral => "arguments",
    };
    let options: Vec<serde_json::Value> = functions
        .iter()
        .map(|f| {
            let params = if f.parameters.is_object() {
                f.parameters.clone()
            } else {
                json!({"type": "object"})
            };
            json!({
                "type": "object",
                "properties": {"name": {"const": f.name}, args_key: params},
                "required": ["name", args_key],
                "additionalProperties": false,
            })
        })
        .collect();
    let call = match <[_; 1]>::try_from(options) {
        Ok([one]) => one,
        Err(many) => json!({ "anyOf": many }),
    };
    // Several calls in one answer: Hermes repeats the block, Mistral lists them; a forced
    // answer is exactly one call.
    let many = parallel && !forced;
    let (schema, prefix, suffix, repeat, trigger) = match format {
        ToolFormat::Hermes => (
            call,
            "<tool_call>",
            "</tool_call>",
            many,
            "<tool_call>".to_string(),
        ),
        // A Llama 3 call is the whole answer, opening with its name.
        ToolFormat::Llama3 => (
            call,
            "",
            "",
            false,
            r#"^\s*(\{\s*"name"\s*:)[\s\S]*$"#.into(),
        ),
        ToolFormat::Mistral => {
            let mut list = json!({"type": "array", "items": call, "minItems": 1});
            if !many {
                list["maxItems"] = json!(1);
            }
            (list, "[TOOL_CALLS]", "", false, r"\[TOOL_CALLS\]".into())
        }
    };
    Constraint {
        schema,
        prefix: prefix.into(),
        suffix: suffix.into(),
        param: "tool_choice",
        repeat,
        triggers: if forced { Vec::new() } else { vec![trigger] },
    }
}

/// What an answer turns into, piece by piece.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delta {
    Content(String),
    /// Thinking, kept out of the content (from the reasoning splitter, never this parser).
    Reasoning(String),
    /// A call: its index in this answer, a fresh id and the function's name (its arguments
    /// follow at once, in [`Delta::CallArgs`]).
    CallStart {
        index: usize,
        id: String,
        name: String,
    },
    /// A call's arguments (JSON text; fragments of one call concatenate).
    CallArgs {
        index: usize,
        fragment: String,
    },
}

/// How a call was opened, which decides how it closes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Opener {
    /// `<tool_call>` … `</tool_call>`.
    Hermes,
    /// ```` ```json ```` … ```` ``` ````.
    Fence,
    /// `{` as the first thing in the answer or on a line.
    Bare,
    /// `<function=` name `>` … `</function>`.
    Function,
    /// Llama 3.x: `<|python_tag|>` then the call's JSON, ended by the JSON itself.
    PythonTag,
    /// Mistral: `[TOOL_CALLS]` then a JSON list of calls (v0.3, Nemo), or then `name[ARGS]{…}`
    /// (Magistral, Devstral).
    Mistral,
    /// The next call in a Mistral list, after a `,`.
    MistralItem,
}

impl Opener {
    fn text(self) -> &'static str {
        match self {
            Self::Hermes => "<tool_call>",
            Self::Fence => "```json",
            Self::Bare => "",
            Self::Function => "<function=",
            Self::PythonTag => "<|python_tag|>",
            Self::Mistral => "[TOOL_CALLS]",
            Self::MistralItem => "",
        }
    }

    fn closer(self) -> &'static str {
        match self {
            Self::Hermes => "</tool_call>",
            Self::Fence => "```",
            Self::Bare => "",
            Self::Function => "</function>",
            Self::PythonTag | Self::Mistral | Self::MistralItem => "",
        }
    }
}

/// Markers that open a call anywhere in an answer.
const TRIGGERS: [Opener; 5] = [
    Opener::Hermes,
    Opener::Fence,
    Opener::Function,
    Opener::PythonTag,
    Opener::Mistral,
];

/// How far the text of an open call has got.
#[derive(Debug, PartialEq, Eq)]
enum Progress {
    /// Not a call after all: the opener and text are content.
    NotACall,
    /// Still open: the name once known, and the arguments text so far (streamable).
    Open {
        name: Option<String>,
        args: Option<String>,
        /// Whether `args` is final (the JSON value ended; only the closer is missing).
        args_done: bool,
    },
    /// Complete: `used` bytes of the call text belong to it (closer included). `more`: a
    /// list of calls goes on with another one.
    Done {
        name: String,
        args: String,
        used: usize,
        more: bool,
    },
}

/// Streams tool calls out of an answer.
#[derive(Debug, Default)]
pub struct ToolCallParser {
    /// What a call must name and fit to go out (`None`: unchecked, the parser's own tests).
    tools: Option<Arc<ToolSet>>,
    /// Text not yet given out: held-back content, or the open call's text after its opener.
    buf: String,
    open: Option<OpenCall>,
    calls: usize,
    /// Whitespace held back until it is known not to precede a call or end the answer.
    ws: String,
    /// Whether anything but whitespace has been seen (a bare `{` opens a call only first).
    started: bool,
    /// Whitespace right after a call is not content either.
    after_call: bool,
}

#[derive(Debug)]
struct OpenCall {
    opener: Opener,
    index: usize,
}

/// A fresh call id: `call_` and 24 hex digits.
fn call_id() -> String {
    let id = uuid::Uuid::new_v4().simple().to_string();
    format!("call_{}", &id[..24])
}

impl ToolCallParser {
    /// A parser for one answer to a request that offered `tools`.
    pub fn new(tools: Arc<ToolSet>) -> Self {
        Self {
            tools: Some(tools),
            ..Self::default()
        }
    }

    /// A parser that lets any well-formed call out (the format tests).
    #[cfg(test)]
    fn unchecked() -> Self {
        Self::default()
    }

    /// Calls seen so far.
    pub fn calls(&self) -> usize {
        self.calls
    }

    /// Takes the next piece of the answer.
    pub fn push(&mut self, text: &str) -> Vec<Delta> {
        self.buf.push_str(text);
        let mut out = Vec::new();
        self.advance(&mut out, false);
        out
    }

    /// The answer ended: gives what was held back, closing a call that was cut short.
    pub fn finish(&mut self) -> Vec<Delta> {
        let mut out = Vec::new();
        self.advance(&mut out, true);
        if !self.buf.is_empty() {
            let rest = std::mem::take(&mut self.buf);
            self.content(&mut out, &rest);
        }
        if self.calls == 0 && !self.ws.is_empty() {
            out.push(Delta::Content(std::mem::take(&mut self.ws)));
        }
        out
    }

    fn advance(&mut self, out: &mut Vec<Delta>, at_end: bool) {
        loop {
            if self.open.is_some() {
                if !self.step_call(out, at_end) {
                    return;
                }
                continue;
            }
            // Content up to the first opener; hold back what may begin one.
            if !self.started && self.buf.trim_start().is_empty() {
                return;
            }
            let found = TRIGGERS
                .iter()
                .filter_map(|o| self.buf.find(o.text()).map(|i| (i, *o)))
                .chain(self.line_brace().map(|i| (i, Opener::Bare)))
                .min_by_key(|(i, _)| *i);
            match found {
                Some((i, opener)) => {
                    let before: String = self.buf.drain(..i).collect();
                    self.content(out, &before);
                    self.buf.drain(..opener.text().len());
                    self.start_call(opener);
                }
                None => {
                    let keep = if at_end { 0 } else { held_back(&self.buf) };
                    let text: String = self.buf.drain(..self.buf.len() - keep).collect();
                    self.content(out, &text);
                    return;
                }
            }
        }
    }

    /// Where a `{` opens a bare call: the first one at the start of a line (or of the answer,
    /// or right after a call), with nothing but spaces before it on that line.
    fn line_brace(&self) -> Option<usize> {
        let at_line_start = !self.started || self.after_call || self.ws.contains('\n');
        let mut line_start = at_line_start.then_some(0);
        for (i, ch) in self.buf.char_indices() {
            match ch {
                '\n' => line_start = Some(i + 1),
                '{' if line_start.is_some() => return Some(i),
                ' ' | '\t' | '\r' => {}
                _ => line_start = None,
            }
        }
        None
    }

    fn start_call(&mut self, opener: Opener) {
        self.started = true;
        self.open = Some(OpenCall {
            opener,
            index: self.calls,
        });
    }

    /// Content out, with whitespace runs held back until something follows them.
    fn content(&mut self, out: &mut Vec<Delta>, text: &str) {
        let text = if self.after_call {
            text.trim_start()
        } else {
            text
        };
        if text.is_empty() {
            return;
        }
        self.after_call = false;
        let body = text.trim_end();
        if body.is_empty() {
            self.ws.push_str(text);
            return;
        }
        self.started = true;
        let mut s = std::mem::take(&mut self.ws);
        s.push_str(body);
        self.ws = text[body.len()..].to_string();
        match out.last_mut() {
            Some(Delta::Content(c)) => c.push_str(&s),
            _ => out.push(Delta::Content(s)),
        }
    }

    /// Moves the open call along; returns whether the loop should go on (it closed or failed).
    fn step_call(&mut self, out: &mut Vec<Delta>, at_end: bool) -> bool {
        let opener = self.open.as_ref().expect("an open call").opener;
        let progress = parse_call(&self.buf, opener);
        match progress {
            Progress::NotACall => {
                self.open = None;
                // The opener was content after all; go on scanning after it.
                let text = format!("{}{}", opener.text(), std::mem::take(&mut self.buf));
                let (head, rest) = split_after_opener(&text, opener);
                self.content(out, head);
                self.buf = rest.to_string();
                if opener == Opener::Bare {
                    self.started = true;
                }
                true
            }
            Progress::Open {
                name,
                args,
                args_done,
            } => {
                if at_end {
                    // Never finished (cut short by max_tokens, or never a call): content,
                    // unless only the closer is missing from a call that passes the check.
                    if let (Some(name), Some(args), true) = (name, args, args_done) {
                        if self.emit(out, &name, &args) {
                            self.buf.clear();
                            return true;
                        }
                    }
                    self.open = None;
                    let text = format!("{}{}", opener.text(), std::mem::take(&mut self.buf));
                    self.content(out, &text);
                    return false;
                }
                false
            }
            Progress::Done {
                name,
                args,
                used,
                more,
            } => {
                let raw: String = self.buf.drain(..used).collect();
                if !self.emit(out, &name, &args) {
                    // Written like a call, but not one the client could execute.
                    self.open = None;
                    self.content(out, &format!("{}{raw}", opener.text()));
                }
                if more {
                    self.start_call(Opener::MistralItem);
                }
                true
            }
        }
    }

    /// Sends the open call whole if it passes the check (its arguments written as a JSON
    /// string are decoded first) and closes it; returns whether it went out.
    fn emit(&mut self, out: &mut Vec<Delta>, name: &str, args: &str) -> bool {
        let decoded;
        let args = if args.starts_with('"') {
            // `"arguments": "{\"a\": 1}"`: the decoded string is the arguments.
            match serde_json::from_str::<String>(args) {
                Ok(d) => {
                    decoded = d;
                    decoded.as_str()
                }
                Err(_) => return false,
            }
        } else {
            args
        };
        let args = match &self.tools {
            Some(tools) => match tools.check(name, args) {
                Ok(a) => a,
                Err(why) => {
                    tracing::debug!(tool = name, reason = %why, "a written tool call stays content");
                    return false;
                }
            },
            None => args.to_string(),
        };
        let call = self.open.take().expect("an open call");
        self.ws.clear(); // whitespace before a call is not content
        out.push(Delta::CallStart {
            index: call.index,
            id: call_id(),
            name: name.to_string(),
        });
        if !args.is_empty() {
            out.push(Delta::CallArgs {
                index: call.index,
                fragment: args,
            });
        }
        self.calls += 1;
        self.after_call = true;
        true
    }
}

/// The opener's text as content and the rest to scan again (a bare `{` is content itself).
fn split_after_opener(text: &str, opener: Opener) -> (&str, &str) {
    let n = if opener == Opener::Bare {
        1
    } else {
        opener.text().len()
    };
    text.split_at(n.min(text.len()))
}

/// How much of the end of `buf` could be the start of an opener.
fn held_back(buf: &str) -> usize {
    TRIGGERS
        .iter()
        .map(|o| super::reasoning::held_back(buf, o.text()))
        .max()
        .unwrap_or(0)
}

/// A function name written before `marker` (`<function=NAME>`, `[TOOL_CALLS]NAME[ARGS]`): the
/// name and the bytes up to the marker's end; or, as the error, how far the call has got
/// (still open while the marker may come, not a call once a character in `not_in_name` shows
/// or the name is empty or spaced).
fn name_before(
    text: &str,
    marker: &str,
    not_in_name: &[char],
) -> Result<(String, usize), Progress> {
    let Some(end) = text.find(marker) else {
        return Err(if text.contains(not_in_name) {
            Progress::NotACall
        } else {
            Progress::Open {
                name: None,
                args: None,
                args_done: false,
            }
        });
    };
    let name = text[..end].trim();
    if name.is_empty() || name.contains(char::is_whitespace) {
        return Err(Progress::NotACall);
    }
    Ok((name.to_string(), end + marker.len()))
}

/// Parses the text after an opener as far as it goes.
fn parse_call(text: &str, opener: Opener) -> Progress {
    let mut s = Scanner { text, pos: 0 };
    let mut fixed_name = None;
    // In a Mistral list (`[TOOL_CALLS][{…}, {…}]`) each call ends at its `,` or the `]`.
    let mut in_list = opener == Opener::MistralItem;
    if opener == Opener::Mistral {
        s.skip_ws();
        match s.peek() {
            None => {
                return Progress::Open {
                    name: None,
                    args: None,
                    args_done: false,
                }
            }
            Some(b'[') => {
                s.pos += 1;
                in_list = true;
            }
            Some(b'{') => {}
            Some(_) => {
                // The newer form: `name[ARGS]{…}`.
                let (name, used) =
                    match name_before(&text[s.pos..], "[ARGS]", &['\n', '{', '"', ' ']) {
                        Ok(found) => found,
                        Err(progress) => return progress,
                    };
                fixed_name = Some(name);
                s.pos += used;
            }
        }
    }
    if opener == Opener::Function {
        let (name, used) = match name_before(text, ">", &['\n', '{', '<']) {
            Ok(found) => found,
            Err(progress) => return progress,
        };
        fixed_name = Some(name);
        s.pos = used;
    }
    s.skip_ws();
    if s.at_end() {
        return Progress::Open {
            name: fixed_name,
            args: None,
            args_done: false,
        };
    }
    let (name, args, args_done, after) = if let Some(name) = fixed_name {
        // `<function=name>` then the arguments object itself.
        let start = s.pos;
        match s.value_end() {
            Scan::Bad => return Progress::NotACall,
            Scan::Partial => {
                return Progress::Open {
                    name: Some(name),
                    args: Some(text[start..].to_string()),
                    args_done: false,
                }
            }
            Scan::End(end) => (name, text[start..end].to_string(), true, end),
        }
    } else {
        match s.call_object() {
            Obj::Bad => return Progress::NotACall,
            Obj::Partial { name, args } => {
                return Progress::Open {
                    name,
                    args,
                    args_done: false,
                }
            }
            Obj::End { name, args, end } => {
                let Some(name) = name else {
                    return Progress::NotACall;
                };
                (name, args.unwrap_or_else(|| "{}".into()), true, end)
            }
        }
    };
    // After the JSON: the closer (a bare call has none).
    let closer = opener.closer();
    let rest = &text[after..];
    let trimmed = rest.trim_start();
    let ws = rest.len() - trimmed.len();
    if in_list {
        return match trimmed.as_bytes().first() {
            None => Progress::Open {
                name: Some(name),
                args: Some(args),
                args_done,
            },
            Some(b',') => Progress::Done {
                name,
                args,
                used: after + ws + 1,
                more: true,
            },
            Some(b']') => Progress::Done {
                name,
                args,
                used: after + ws + 1,
                more: false,
            },
            Some(_) => Progress::Done {
                name,
                args,
                used: after,
                more: false,
            },
        };
    }
    if closer.is_empty() {
        return Progress::Done {
            name,
            args,
            used: after,
            more: false,
        };
    }
    if trimmed.starts_with(closer) {
        return Progress::Done {
            name,
            args,
            used: after + ws + closer.len(),
            more: false,
        };
    }
    if closer.starts_with(trimmed) {
        return Progress::Open {
            name: Some(name),
            args: Some(args),
            args_done,
        };
    }
    // Something else follows the JSON: the call is complete without its closer.
    Progress::Done {
        name,
        args,
        used: after,
        more: false,
    }
}

/// Where a JSON value ends.
enum Scan {
    End(usize),
    Partial,
    Bad,
}

/// A call object as far as it goes.
enum Obj {
    End {
        name: Option<String>,
        args: Option<String>,
        end: usize,
    },
    Partial {
        name: Option<String>,
        args: Option<String>,
    },
    Bad,
}

struct Scanner<'a> {
    text: &'a str,
    pos: usize,
}

impl Scanner<'_> {
    fn at_end(&self) -> bool {
        self.pos >= self.text.len()
    }

    fn peek(&self) -> Option<u8> {
        self.text.as_bytes().get(self.pos).copied()
    }

    fn skip_ws(&mut self) {
        while self.peek().is_some_and(|b| b.is_ascii_whitespace()) {
            self.pos += 1;
        }
    }

    /// Scans one JSON value from `pos` (strings, numbers, literals, nested containers).
    fn value_end(&mut self) -> Scan {
        let bytes = self.text.as_bytes();
        let start = self.pos;
        match self.peek() {
            None => Scan::Partial,
            Some(b'"') => self.string_end(),
            Some(b'{') | Some(b'[') => {
                let mut depth = 0usize;
                let mut i = start;
                while i < bytes.len() {
                    match bytes[i] {
                        b'"' => {
                            self.pos = i;
                            match self.string_end() {
                                Scan::End(e) => {
                                    i = e;
                                    continue;
                                }
                                other => return other,
                            }
                        }
                        b'{' | b'[' => depth += 1,
                        b'}' | b']' => {
                            depth -= 1;
                            if depth == 0 {
                                self.pos = i + 1;
                                return Scan::End(i + 1);
                            }
                        }
                        _ => {}
                    }
                    i += 1;
                }
                Scan::Partial
            }
            Some(b) if b == b'-' || b.is_ascii_alphanumeric() => {
                let mut i = start;
                while i < bytes.len()
                    && (bytes[i].is_ascii_alphanumeric() || b"+-.".contains(&bytes[i]))
                {
                    i += 1;
                }
                if i == bytes.len() {
                    return Scan::Partial;
                }
                self.pos = i;
                Scan::End(i)
            }
            Some(_) => Scan::Bad,
        }
    }

    /// Scans a string starting at `pos` (a quote), honouring escapes.
    fn string_end(&mut self) -> Scan {
        let bytes = self.text.as_bytes();
        let mut i = self.pos + 1;
        while i < bytes.len() {
            match bytes[i] {
                b'\\' => i += 2,
                b'"' => {
                    self.pos = i + 1;
                    return Scan::End(i + 1);
                }
                _ => i += 1,
            }
        }
        Scan::Partial
    }

    /// Scans `{"name": "…", "arguments": {…}}` (keys in any order; `parameters` is accepted for
    /// `arguments`, and a nested `{"function": {...}}` is not). Any other first key: not a call.
    fn call_object(&mut self) -> Obj {
        if self.peek() != Some(b'{') {
            return Obj::Bad;
        }
        self.pos += 1;
        let (mut name, mut args) = (None, None);
        let partial = |name: &Option<String>, args: &Option<String>| Obj::Partial {
            name: name.clone(),
            args: args.clone(),
        };
        loop {
            self.skip_ws();
            match self.peek() {
                None => return partial(&name, &None),
                Some(b'}') => {
                    self.pos += 1;
                    return Obj::End {
                        name,
                        args,
                        end: self.pos,
                    };
                }
                Some(b',') => {
                    self.pos += 1;
                    continue;
                }
                Some(b'"') => {}
                Some(_) => return Obj::Bad,
            }
            let key_start = self.pos;
            let key = match self.string_end() {
                Scan::End(e) => serde_json::from_str::<String>(&self.text[key_start..e]),
                _ => return partial(&name, &None),
            };
            let Ok(key) = key else { return Obj::Bad };
            let known = matches!(key.as_str(), "name" | "arguments" | "parameters");
            if !known && name.is_none() && args.is_none() {
                return Obj::Bad;
            }
            self.skip_ws();
            match self.peek() {
                None => return partial(&name, &None),
                Some(b':') => self.pos += 1,
                Some(_) => return Obj::Bad,
            }
            self.skip_ws();
            let value_start = self.pos;
            match self.value_end() {
                Scan::Bad => return Obj::Bad,
                Scan::Partial => {
                    let so_far = (key != "name").then(|| self.text[value_start..].to_string());
                    return partial(&name, &so_far.filter(|_| known));
                }
                Scan::End(e) => {
                    let raw = &self.text[value_start..e];
                    match key.as_str() {
                        "name" => match serde_json::from_str::<String>(raw) {
                            Ok(n) if !n.is_empty() => name = Some(n),
                            _ => return Obj::Bad,
                        },
                        "arguments" | "parameters" => args = Some(raw.to_string()),
                        _ => {}
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Content, and each call as (name, arguments), from a list of deltas.
    fn assemble(deltas: &[Delta]) -> (String, Vec<(String, String)>) {
        let mut content = String::new();
        let mut calls: Vec<(String, String)> = Vec::new();
        let mut ids = std::collections::HashSet::new();
        for d in deltas {
            match d {
                Delta::Content(c) => content.push_str(c),
                Delta::CallStart { index, id, name } => {
                    assert_eq!(*index, calls.len(), "{deltas:?}");
                    assert!(id.starts_with("call_") && id.len() == 29, "{id}");
                    assert!(ids.insert(id.clone()), "duplicate id");
                    calls.push((name.clone(), String::new()));
                }
                Delta::CallArgs { index, fragment } => calls[*index].1.push_str(fragment),
                Delta::Reasoning(_) => unreachable!("the parser gives no reasoning"),
            }
        }
        (content, calls)
    }

    /// Feeds `text` whole, then cut at every byte boundary (char-aligned) into two and into
    /// single characters, and checks that every way gives the same content and calls.
    fn parse_every_way(text: &str) -> (String, Vec<(String, String)>) {
        parse_every_way_with(text, ToolCallParser::unchecked)
    }

    /// [`parse_every_way`] with parsers made by `parser`.
    fn parse_every_way_with(
        text: &str,
        parser: impl Fn() -> ToolCallParser,
    ) -> (String, Vec<(String, String)>) {
        let whole = {
            let mut p = parser();
            let mut d = p.push(text);
            d.extend(p.finish());
            assemble(&d)
        };
        for cut in (0..=text.len()).filter(|&i| text.is_char_boundary(i)) {
            let mut p = parser();
            let mut d = p.push(&text[..cut]);
            d.extend(p.push(&text[cut..]));
            d.extend(p.finish());
            assert_eq!(assemble(&d), whole, "cut at {cut} of {text:?}");
        }
        let mut p = parser();
        let mut d = Vec::new();
        for ch in text.chars() {
            d.extend(p.push(&ch.to_string()));
        }
        d.extend(p.finish());
        assert_eq!(assemble(&d), whole, "char by char: {text:?}");
        whole
    }

    fn call(name: &str, args: &str) -> (String, String) {
        (name.to_string(), args.to_string())
    }

    #[test]
    fn hermes_calls_with_text_before_and_several_calls() {
        // As Qwen2.5 writes them.
        let text = "I'll read both.\n<tool_call>\n{\"name\": \"read_file\", \"arguments\": {\"path\": \"README.md\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"list_dir\", \"arguments\": {\"path\": \"src/{a}\\\"\"}}\n</tool_call>";
        let (content, calls) = parse_every_way(text);
        assert_eq!(content, "I'll read both.");
        assert_eq!(
            calls,
            [
                call("read_file", r#"{"path": "README.md"}"#),
                call("list_dir", r#"{"path": "src/{a}\""}"#)
            ]
        );
    }

    #[test]
    fn fenced_and_bare_json_calls_as_small_models_write_them() {
        // Recorded from Qwen2.5-Coder-0.5B-Instruct for "read the file README.md".
        let fenced = "```json\n{\n  \"name\": \"read_file\",\n  \"arguments\": {\n    \"path\": \"README.md\"\n  }\n}\n```";
        let (content, calls) = parse_every_way(fenced);
        assert_eq!(content, "");
        assert_eq!(
            calls,
            [call("read_file", "{\n    \"path\": \"README.md\"\n  }")]
        );
        let bare = "  {\"arguments\": {\"q\": [1, 2]}, \"name\": \"search\"}";
        assert_eq!(
            parse_every_way(bare),
            (String::new(), vec![call("search", r#"{"q": [1, 2]}"#)])
        );
        // Llama 3.x: JSON with `parameters`, bare or after <|python_tag|>.
        let llama = "{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Oslo\"}}";
        assert_eq!(
            parse_every_way(llama),
            (
                String::new(),
                vec![call("get_weather", r#"{"city": "Oslo"}"#)]
            )
        );
        let tagged = format!("<|python_tag|>{llama}");
        assert_eq!(
            parse_every_way(&tagged),
            (
                String::new(),
                vec![call("get_weather", r#"{"city": "Oslo"}"#)]
            )
        );
        let function = "<function=get_weather>{\"city\": \"Oslo\"}</function>";
        assert_eq!(
            parse_every_way(function),
            (
                String::new(),
                vec![call("get_weather", r#"{"city": "Oslo"}"#)]
            )
        );
        // Arguments as a JSON-encoded string are decoded.
        let stringy = "<tool_call>{\"name\": \"f\", \"arguments\": \"{\\\"a\\\": 1}\"}</tool_call>";
        assert_eq!(
            parse_every_way(stringy),
            (String::new(), vec![call("f", r#"{"a": 1}"#)])
        );
    }

    #[test]
    fn mistral_calls_in_both_of_its_forms() {
        // Mistral v0.3 / Nemo: one list, calls separated by commas, ids included.
        let list = "[TOOL_CALLS] [{\"name\": \"read_file\", \"arguments\": {\"path\": \"a\"}, \"id\": \"Ab3dE6gH9\"}, {\"name\": \"list_dir\", \"arguments\": {}}]";
        assert_eq!(
            parse_every_way(list),
            (
                String::new(),
                vec![
                    call("read_file", r#"{"path": "a"}"#),
                    call("list_dir", "{}")
                ]
            )
        );
        let with_text = "Reading it.[TOOL_CALLS][{\"name\": \"f\", \"arguments\": {\"x\": [1]}}]";
        assert_eq!(
            parse_every_way(with_text),
            ("Reading it.".into(), vec![call("f", r#"{"x": [1]}"#)])
        );
        // Magistral / Devstral: `name[ARGS]{…}`, one marker per call.
        let args = "[TOOL_CALLS]read_file[ARGS]{\"path\": \"a\"}[TOOL_CALLS]g[ARGS]{}";
        assert_eq!(
            parse_every_way(args),
            (
                String::new(),
                vec![call("read_file", r#"{"path": "a"}"#), call("g", "{}")]
            )
        );
        // Not calls after all.
        for text in ["[TOOL_CALLS] nothing here", "[TOOL_CALLS][1, 2]"] {
            let (content, calls) = parse_every_way(text);
            assert!(calls.is_empty(), "{text:?} gave {calls:?}");
            assert_eq!(content, text);
        }
    }

    #[test]
    fn constraints_follow_the_format_and_the_choice() {
        use serde_json::json;
        let tools = vec![
            Tool {
                name: "read_file".into(),
                description: None,
                parameters: json!({"type": "object", "properties": {"path": {"type": "string"}}}),
            },
            Tool {
                name: "ls".into(),
                description: Some("list".into()),
                parameters: json!({"type": "object"}),
            },
        ];
        let named = ToolChoice::Function("ls".into());
        let c = call_constraint(&tools, &named, ToolFormat::Hermes, true)
            .unwrap()
            .unwrap();
        assert_eq!(c.schema["properties"]["name"]["const"], "ls");
        assert_eq!(
            (c.prefix.as_str(), c.suffix.as_str()),
            ("<tool_call>", "</tool_call>")
        );
        assert!(
            c.triggers.is_empty() && !c.repeat,
            "forced: one call, from the start"
        );
        let auto = call_constraint(&tools, &ToolChoice::Auto, ToolFormat::Hermes, true)
            .unwrap()
            .unwrap();
        assert_eq!(auto.schema["anyOf"].as_array().unwrap().len(), 2);
        assert_eq!(auto.triggers, ["<tool_call>"]);
        assert!(auto.repeat);
        let llama = call_constraint(&tools, &ToolChoice::Required, ToolFormat::Llama3, true)
            .unwrap()
            .unwrap();
        assert!(llama.schema["anyOf"][0]["properties"]["parameters"].is_object());
        assert_eq!(llama.prefix, "");
        let mistral = call_constraint(&tools, &ToolChoice::Auto, ToolFormat::Mistral, false)
            .unwrap()
            .unwrap();
        assert_eq!(mistral.schema["type"], "array");
        assert_eq!(mistral.schema["maxItems"], 1);
        assert_eq!(mistral.prefix, "[TOOL_CALLS]");
        let missing = ToolChoice::Function("nope".into());
        let e = call_constraint(&tools, &missing, ToolFormat::Hermes, true).unwrap_err();
        assert!(e.contains("`nope`"), "{e}");
        assert!(call_constraint(&[], &ToolChoice::Required, ToolFormat::Hermes, true).is_err());
        assert_eq!(
            call_constraint(&[], &ToolChoice::Auto, ToolFormat::Hermes, true),
            Ok(None)
        );
        assert_eq!(
            call_constraint(&tools, &ToolChoice::None, ToolFormat::Hermes, true),
            Ok(None)
        );
    }

    #[test]
    fn json_and_code_that_are_not_calls_stay_content() {
        for text in [
            "```json\n{\"city\": \"Oslo\", \"temp\": 3}\n```",
            "{\"city\": \"Oslo\"} is the answer",
            "Use `<tool_call>` tags. Like <tool_call> this.",
            "Here: ```python\nprint(1)\n``` done",
            "a < b and c <function",
            "<function=two words>x</function>",
        ] {
            let (content, calls) = parse_every_way(text);
            assert!(calls.is_empty(), "{text:?} gave {calls:?}");
            assert_eq!(content, text, "content changed");
        }
    }

    #[test]
    fn truncated_calls_and_malformed_ones_are_content() {
        // Cut by max_tokens inside the arguments: not a call the client could execute.
        let text = "<tool_call>{\"name\": \"f\", \"arguments\": {\"a\": \"xy";
        assert_eq!(parse_every_way(text), (text.to_string(), vec![]));
        // Cut before the name ends: not a call.
        let text = "<tool_call>{\"na";
        assert_eq!(parse_every_way(text), (text.to_string(), vec![]));
        // A call without a closer, followed by text.
        let (content, calls) =
            parse_every_way("<tool_call>{\"name\": \"f\", \"arguments\": {}} then more");
        assert_eq!(calls, [call("f", "{}")]);
        assert_eq!(content, "then more");
        // A marker split across pieces never leaks: checked by parse_every_way above; and a
        // lone `<` or backtick at the very end is content.
        assert_eq!(parse_every_way("x <"), ("x <".to_string(), vec![]));
        assert_eq!(parse_every_way("x ``"), ("x ``".to_string(), vec![]));
    }

    #[test]
    fn a_call_goes_out_whole_once_its_json_has_ended() {
        let mut p = ToolCallParser::unchecked();
        assert!(p
            .push("<tool_call>{\"name\": \"read_file\", \"arguments\": {\"pa")
            .is_empty());
        let d = p.push("th\": \"x\"}}</tool_call>");
        assert!(
            matches!(&d[..], [Delta::CallStart { name, .. }, Delta::CallArgs { fragment, .. }] if name == "read_file" && fragment == "{\"path\": \"x\"}"),
            "{d:?}"
        );
        assert_eq!(p.calls(), 1);
        assert!(p.finish().is_empty());
    }

    /// [`parse_every_way`] with parsers that check against `tools`.
    fn checked(tools: &[Tool], text: &str) -> (String, Vec<(String, String)>) {
        let tools = Arc::new(ToolSet::new(tools));
        parse_every_way_with(text, || ToolCallParser::new(Arc::clone(&tools)))
    }

    fn openclaw_tools() -> Vec<Tool> {
        use serde_json::json;
        let t = |name: &str, description: &str, parameters: serde_json::Value| Tool {
            name: name.into(),
            description: Some(description.into()),
            parameters,
        };
        vec![
            t(
                "ls",
                "list directory entries in binary filename order, including dotfiles and links",
                json!({"type": "object", "properties": {"path": {"type": "string"}}}),
            ),
            t(
                "apply_patch",
                "apply a patch",
                json!({"type": "object", "properties": {"input": {"type": "string"}},
                       "required": ["input"]}),
            ),
            t(
                "session_status",
                "this session's status",
                json!({"type": "object", "properties": {}}),
            ),
        ]
    }

    #[test]
    fn recorded_calls_a_client_cannot_execute_stay_content() {
        let tools = openclaw_tools();
        // Recorded from Qwen2.5-Coder-0.5B under the real OpenClaw: a description as the name
        // with arguments that are not JSON; an undeclared name; a session key as a name.
        for text in [
            "<tool_call>\n{\"name\": \"list directory entries in binary filename order, including dotfiles and links\", \"arguments\": {\"path\": \".\"}}\n</tool_call>",
            "<function=ls>path=.</function>",
            "{\"name\": \"openclaw\", \"arguments\": {\"cmd\": \"status\"}}",
            "<tool_call>{\"name\": \"session:agent:bot1:load1\", \"arguments\": {}}</tool_call>",
            "<tool_call>{\"name\": \"apply_patch\", \"arguments\": \"\"}</tool_call>",
            "<tool_call>{\"name\": \"ls\", \"arguments\": {\"path\": 7}}</tool_call>",
        ] {
            let (content, calls) = checked(&tools, text);
            assert!(calls.is_empty(), "{text:?} gave {calls:?}");
            assert_eq!(content, text.trim(), "the text is kept as written");
        }
        // Empty-string arguments are `{}` where the schema allows an empty object.
        assert_eq!(
            checked(
                &tools,
                "<tool_call>{\"name\": \"session_status\", \"arguments\": \"\"}</tool_call>"
            ),
            (String::new(), vec![call("session_status", "{}")])
        );
        // A valid call between invalid ones keeps its index 0.
        let (content, calls) = checked(
            &tools,
            "<tool_call>{\"name\": \"openclaw\", \"arguments\": {}}</tool_call>\n<tool_call>{\"name\": \"ls\", \"arguments\": {\"path\": \"src\"}}</tool_call>",
        );
        assert_eq!(calls, [call("ls", r#"{"path": "src"}"#)]);
        assert!(content.contains("openclaw"), "{content:?}");
    }

    #[test]
    fn bare_calls_on_separate_lines_are_several_calls() {
        let tools = openclaw_tools();
        let text = "{\"name\": \"ls\", \"arguments\": {\"path\": \"a\"}}\n{\"name\": \"ls\", \"arguments\": {\"path\": \"b\"}}\n{\"name\": \"session_status\", \"arguments\": {}}";
        assert_eq!(
            checked(&tools, text),
            (
                String::new(),
                vec![
                    call("ls", r#"{"path": "a"}"#),
                    call("ls", r#"{"path": "b"}"#),
                    call("session_status", "{}")
                ]
            )
        );
        // After text, a call on its own line is a call too; JSON inside a line is not.
        let (content, calls) = parse_every_way(
            "Listing it.\n{\"name\": \"ls\", \"arguments\": {}}\nsee {\"name\": \"x\"} here",
        );
        assert_eq!(calls, [call("ls", "{}")]);
        assert_eq!(content, "Listing it.see {\"name\": \"x\"} here");
    }
}
