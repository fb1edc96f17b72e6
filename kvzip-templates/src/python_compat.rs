//! Python semantics that chat templates rely on and minijinja does not have: `json.dumps` (HF's
//! `tojson` filter), `repr`/`str` of values (`{{ True }}` prints `True`), `datetime.strftime`, and
//! `str.strip()`.

use std::fmt::Write as _;

use minijinja::value::{Kwargs, Value, ValueKind};
use minijinja::{Error, ErrorKind};

/// Python's `str.strip()` without arguments (Unicode whitespace plus the \x1c-\x1f separators).
pub fn python_strip(text: &str) -> &str {
    text.trim_matches(|c: char| c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c))
}

/// Deepest container nesting that `tojson` and printing walk (a namespace that holds itself is
/// infinitely deep: printed as `...` like Python's recursive repr, refused by `tojson`).
pub const MAX_VALUE_DEPTH: usize = 64;

/// Most values one print or `tojson` call visits (bounds the work on shared or cyclic values).
pub const MAX_VALUE_NODES: usize = 100_000;

/// Largest `tojson` indent (characters per level).
pub const MAX_INDENT: usize = 64;

/// HF's `tojson` filter: `json.dumps(x, ensure_ascii=False, indent=None, separators=None,
/// sort_keys=False)` with those keyword arguments accepted.
pub fn tojson_filter(value: Value, kwargs: Kwargs) -> Result<Value, Error> {
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    let indent: Option<Value> = kwargs.get("indent")?;
    let separators: Option<Vec<String>> = kwargs.get("separators")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    kwargs.assert_all_used()?;
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) => Some(if let Some(s) = v.as_str() {
            s.to_string()
        } else {
            let n = v
                .as_i64()
                .ok_or_else(|| invalid("tojson: indent must be an integer or a string"))?;
            if n > MAX_INDENT as i64 {
                return Err(invalid(&format!(
                    "tojson: indent {n} is over the limit of {MAX_INDENT}"
                )));
            }
            " ".repeat(usize::try_from(n).unwrap_or(0))
        }),
    };
    if indent
        .as_ref()
        .is_some_and(|s| s.chars().count() > MAX_INDENT)
    {
        return Err(invalid(&format!(
            "tojson: an indent string longer than {MAX_INDENT} characters"
        )));
    }
    let (item_sep, key_sep) = match separators.as_deref() {
        None if indent.is_some() => (",".to_string(), ": ".to_string()),
        None => (", ".to_string(), ": ".to_string()),
        Some([a, b]) => (a.clone(), b.clone()),
        Some(_) => return Err(invalid("tojson: separators must be a pair of strings")),
    };
    let dumper = JsonDumper {
        ensure_ascii: ensure_ascii.unwrap_or(false),
        indent,
        item_sep,
        key_sep,
        sort_keys: sort_keys.unwrap_or(false),
        nodes: std::cell::Cell::new(0),
    };
    let mut out = String::new();
    dumper.dump(&value, 0, &mut out)?;
    // Mark safe so that an auto-escaping environment would not escape it again (HF's does not escape).
    Ok(Value::from_safe_string(out))
}

fn invalid(message: &str) -> Error {
    Error::new(ErrorKind::InvalidOperation, message.to_string())
}

struct JsonDumper {
    ensure_ascii: bool,
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
    /// Values visited so far (bounded by [`MAX_VALUE_NODES`]).
    nodes: std::cell::Cell<usize>,
}

impl JsonDumper {
    fn dump(&self, value: &Value, depth: usize, out: &mut String) -> Result<(), Error> {
        if depth > MAX_VALUE_DEPTH {
            return Err(invalid(&format!(
                "tojson: value nested deeper than {MAX_VALUE_DEPTH} levels (a namespace that holds itself?)"
            )));
        }
        let visited = self.nodes.get() + 1;
        self.nodes.set(visited);
        if visited > MAX_VALUE_NODES {
            return Err(invalid(&format!(
                "tojson: value has more than {MAX_VALUE_NODES} items"
            )));
        }
        match value.kind() {
            ValueKind::Undefined | ValueKind::None => out.push_str("null"),
            ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
            ValueKind::Number => out.push_str(&python_number(value)),
            ValueKind::String => {
                json_string(value.as_str().unwrap_or_default(), self.ensure_ascii, out)
            }
            ValueKind::Map => {
                let mut entries = Vec::new();
                for key in value.try_iter()? {
                    let item = value.get_item(&key)?;
                    let key = match key.as_str() {
                        Some(s) => s.to_string(),
                        None => python_str(&key),
                    };
                    entries.push((key, item));
                }
                if self.sort_keys {
                    entries.sort_by(|a, b| a.0.cmp(&b.0));
                }
                self.container(out, depth, '{', '}', &entries, |(key, item), out| {
                    json_string(key, self.ensure_ascii, out);
                    out.push_str(&self.key_sep);
                    self.dump(item, depth + 1, out)
                })?;
            }
            ValueKind::Seq | ValueKind::Iterable => {
                let items: Vec<Value> = value.try_iter()?.collect();
                self.container(out, depth, '[', ']', &items, |item, out| {
                    self.dump(item, depth + 1, out)
                })?;
            }
            _ => json_string(&value.to_string(), self.ensure_ascii, out),
        }
        Ok(())
    }

    fn container<T>(
        &self,
        out: &mut String,
        depth: usize,
        open: char,
        close: char,
        items: &[T],
        mut write_item: impl FnMut(&T, &mut String) -> Result<(), Error>,
    ) -> Result<(), Error> {
        out.push(open);
        if items.is_empty() {
            out.push(close);
            return Ok(());
        }
        for (i, item) in items.iter().enumerate() {
            if i > 0 {
                out.push_str(&self.item_sep);
            }
            if let Some(indent) = &self.indent {
                out.push('\n');
                out.push_str(&indent.repeat(depth + 1));
            }
            write_item(item, out)?;
        }
        if let Some(indent) = &self.indent {
            out.push('\n');
            out.push_str(&indent.repeat(depth));
        }
        out.push(close);
        Ok(())
    }
}

/// `json.dumps` of a string: escapes `"`, `\`, control characters; non-ASCII as `\uXXXX` only
/// with `ensure_ascii`.
fn json_string(text: &str, ensure_ascii: bool, out: &mut String) {
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 || (ensure_ascii && (c as u32) > 0x7e) => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    let _ = write!(out, "\\u{unit:04x}");
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Python `repr` of an int or float (`1.0`, `1e+20`, `inf` as in `json.dumps`: `Infinity`).
fn python_number(value: &Value) -> String {
    if value.is_integer() {
        return value.to_string();
    }
    let Ok(x) = f64::try_from(value.clone()) else {
        return value.to_string();
    };
    if x.is_nan() {
        return "NaN".into();
    }
    if x.is_infinite() {
        return if x > 0.0 {
            "Infinity".into()
        } else {
            "-Infinity".into()
        };
    }
    let text = format!("{x:?}");
    match text.split_once('e') {
        // Python writes exponents with a sign and at least two digits: 1e+20, 1e-07.
        Some((mantissa, exp)) => {
            let (sign, digits) = exp.strip_prefix('-').map_or(("+", exp), |d| ("-", d));
            format!("{mantissa}e{sign}{digits:0>2}")
        }
        None => text,
    }
}

/// Python `str(value)`: strings as-is, `None`/`True`/`False`, containers with `repr` items.
pub fn python_str(value: &Value) -> String {
    match value.kind() {
        ValueKind::String => value.as_str().unwrap_or_default().to_string(),
        _ => python_repr(value),
    }
}

/// Python `repr(value)` for the value kinds templates use.
fn python_repr(value: &Value) -> String {
    python_repr_bounded(value, 0, &mut MAX_VALUE_NODES.clone())
}

/// [`python_repr`] that prints `...` past [`MAX_VALUE_DEPTH`] levels (Python prints a recursive
/// container as `[...]`) or once `nodes_left` values have been printed, so a namespace that
/// holds itself cannot recurse without end.
fn python_repr_bounded(value: &Value, depth: usize, nodes_left: &mut usize) -> String {
    if depth > MAX_VALUE_DEPTH || *nodes_left == 0 {
        return "...".into();
    }
    *nodes_left -= 1;
    match value.kind() {
        ValueKind::Undefined => String::new(),
        ValueKind::None => "None".into(),
        ValueKind::Bool => if value.is_true() { "True" } else { "False" }.into(),
        ValueKind::Number => {
            let text = python_number(value);
            match text.as_str() {
                "NaN" => "nan".into(),
                "Infinity" => "inf".into(),
                "-Infinity" => "-inf".into(),
                _ => text,
            }
        }
        ValueKind::String => {
            let s = value.as_str().unwrap_or_default();
            let quote = if s.contains('\'') && !s.contains('"') {
                '"'
            } else {
                '\''
            };
            let mut out = String::from(quote);
            for c in s.chars() {
                match c {
                    '\\' => out.push_str("\\\\"),
                    '\n' => out.push_str("\\n"),
                    '\r' => out.push_str("\\r"),
                    '\t' => out.push_str("\\t"),
                    c if c == quote => {
                        out.push('\\');
                        out.push(c);
                    }
                    c => out.push(c),
                }
            }
            out.push(quote);
            out
        }
        ValueKind::Seq | ValueKind::Iterable => match value.try_iter() {
            Ok(items) => format!(
                "[{}]",
                items
                    .map(|v| python_repr_bounded(&v, depth + 1, nodes_left))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            Err(_) => value.to_string(),
        },
        ValueKind::Map => match value.try_iter() {
            Ok(keys) => {
                let entries: Vec<String> = keys
                    .map(|k| {
                        let item = value.get_item(&k).unwrap_or_default();
                        let key = python_repr_bounded(&k, depth + 1, nodes_left);
                        format!(
                            "{key}: {}",
                            python_repr_bounded(&item, depth + 1, nodes_left)
                        )
                    })
                    .collect();
                format!("{{{}}}", entries.join(", "))
            }
            Err(_) => value.to_string(),
        },
        _ => value.to_string(),
    }
}

/// Python's `datetime.now().strftime(format)` evaluated in UTC (`%Y %m %d %H %M %S %y %b %B %a %A
/// %j %p %I %e %%`; other directives are kept verbatim).
pub fn strftime_now(format: &str) -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    format_utc(secs, format)
}

/// Formats `unix_seconds` (UTC) with a `strftime` format.
pub fn format_utc(unix_seconds: u64, format: &str) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] = [
        "Monday",
        "Tuesday",
        "Wednesday",
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
    ];
    let days = unix_seconds / 86_400;
    let secs_of_day = unix_seconds % 86_400;
    let (year, month, day) = civil_from_days(days as i64);
    let (hour, minute, second) = (secs_of_day / 3600, secs_of_day / 60 % 60, secs_of_day % 60);
    let weekday = ((days + 3) % 7) as usize; // 1970-01-01 was a Thursday (index 3 from Monday).
    let day_of_year = days as i64 - days_from_civil(year, 1, 1) + 1;
    let month_name = MONTHS[(month - 1) as usize];
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let _ = match chars.next() {
            Some('Y') => write!(out, "{year}"),
            Some('y') => write!(out, "{:02}", year.rem_euclid(100)),
            Some('m') => write!(out, "{month:02}"),
            Some('d') => write!(out, "{day:02}"),
            Some('e') => write!(out, "{day:>2}"),
            Some('H') => write!(out, "{hour:02}"),
            Some('I') => write!(out, "{:02}", if hour % 12 == 0 { 12 } else { hour % 12 }),
            Some('p') => write!(out, "{}", if hour < 12 { "AM" } else { "PM" }),
            Some('M') => write!(out, "{minute:02}"),
            Some('S') => write!(out, "{second:02}"),
            Some('j') => write!(out, "{day_of_year:03}"),
            Some('B') => write!(out, "{month_name}"),
            Some('b') => write!(out, "{}", &month_name[..3]),
            Some('A') => write!(out, "{}", DAYS[weekday]),
            Some('a') => write!(out, "{}", &DAYS[weekday][..3]),
            Some('%') => write!(out, "%"),
            Some(other) => write!(out, "%{other}"),
            None => write!(out, "%"),
        };
    }
    out
}

/// (year, month 1-12, day 1-31) of a day count since 1970-01-01 (proleptic Gregorian).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// Day count since 1970-01-01 of a civil date.
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let yoe = year.rem_euclid(400);
    let month = i64::from(month);
    let doy = (153 * (if month > 2 { month - 3 } else { month + 9 }) + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_formatting_matches_python() {
        // 2024-02-29 13:05:09 UTC, a Thursday, day 60.
        let t = 1_709_211_909;
        assert_eq!(format_utc(t, "%d %b %Y"), "29 Feb 2024");
        assert_eq!(
            format_utc(t, "%A %B %j %H:%M:%S %I%p %y %%"),
            "Thursday February 060 13:05:09 01PM 24 %"
        );
        assert_eq!(format_utc(0, "%Y-%m-%d %a"), "1970-01-01 Thu");
    }

    #[test]
    fn python_numbers() {
        assert_eq!(python_number(&Value::from(1.0)), "1.0");
        assert_eq!(python_number(&Value::from(1e20)), "1e+20");
        assert_eq!(python_number(&Value::from(1e-7)), "1e-07");
        assert_eq!(python_number(&Value::from(42)), "42");
    }

    #[test]
    fn python_repr_of_containers() {
        let v = Value::from_serialize(serde_json::json!(["a", "it's", null, true, 2]));
        assert_eq!(python_str(&v), "['a', \"it's\", None, True, 2]");
    }

    #[test]
    fn a_namespace_that_holds_itself_prints_bounded_and_tojson_refuses_it() {
        let cyclic = "{% set x = namespace(v='') %}{% set x.v = [x, 'a'] %}";
        let printed = crate::ChatTemplate::new(&format!("{cyclic}{{{{ x.v }}}}"), None, None)
            .unwrap()
            .render(&[], false)
            .unwrap();
        assert!(printed.contains("..."), "{printed}");
        let err = crate::ChatTemplate::new(&format!("{cyclic}{{{{ x.v | tojson }}}}"), None, None)
            .unwrap()
            .render(&[], false)
            .unwrap_err();
        assert!(err.to_string().contains("nested deeper"), "{err}");
    }

    #[test]
    fn tojson_refuses_an_absurd_indent() {
        let v = Value::from_serialize(serde_json::json!([1, 2]));
        let kwargs = Kwargs::from_iter([("indent", Value::from(101_000_000))]);
        let err = tojson_filter(v, kwargs).unwrap_err();
        assert!(err.to_string().contains("over the limit"), "{err}");
    }
}
